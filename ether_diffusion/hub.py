"""`--push_to_hub`, `--hub_model_id`, `--hub_token`: the output folder and its model card uploaded to the
Hugging Face Hub at the end of a run, as diffusers' examples do it (`create_repo` at the start, `upload_folder`
at the end). Everything that can be known to fail is checked before any work: offline mode while parsing,
the repository (network, token, name) before the model is loaded."""
from pathlib import Path

from huggingface_hub import constants, create_repo, upload_folder

from .errors import UserError, first_line
from .run_folder import LOCK_FILE

# Not uploaded: resumable training state and the class images are the run's working files, not the model.
IGNORED = ["checkpoint-*", "class-images/*", LOCK_FILE, "*.tmp"]


def add_hub_args(group):
    group.add_argument("--push_to_hub", action="store_true",
                       help="Upload the output folder (adapter, model card, samples, logs) to the Hugging Face Hub "
                            "at the end.")
    group.add_argument("--hub_token", type=str, default=None,
                       help="The token to push with (default: the one `hf auth login` saved).")
    group.add_argument("--hub_model_id", type=str, default=None,
                       help="The repository to push to (default: the output folder's name under your account).")


def check_hub_args(args):
    """While parsing: offline mode, and hub settings without --push_to_hub (they would do nothing)."""
    if not args.push_to_hub:
        for flag in ("hub_model_id", "hub_token"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag} is only used with --push_to_hub")
        return
    if constants.HF_HUB_OFFLINE:
        raise UserError("--push_to_hub: the hub is offline (HF_HUB_OFFLINE=1): unset it, or train without "
                        "--push_to_hub and upload the output folder later")
    if args.hub_token is not None and args.report_to in ("wandb", "all"):
        # diffusers' rule: the trackers log every argument, the token included
        raise UserError("--hub_token with --report_to wandb would log the token: log in with `hf auth login` instead")


def repo_name(args) -> str:
    return args.hub_model_id or Path(args.output_dir).resolve().name


def create_hub_repo(args) -> str:
    """The repository pushed to at the end, created now (exist_ok) so that a missing network, a bad token or a
    name taken by someone else fail before training. Returns its id."""
    try:
        return create_repo(repo_name(args), exist_ok=True, token=args.hub_token).repo_id
    except Exception as e:  # connection errors, 401/403, a bad name: all one line
        raise UserError(f"--push_to_hub: cannot create the hub repository {repo_name(args)!r}: {first_line(e)}") from None


def push_output(args, repo_id: str) -> str:
    """Upload the finished output folder (with its model card, README.md) to `repo_id`; returns its URL."""
    try:
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="End of training",
                      ignore_patterns=IGNORED, token=args.hub_token)
    except Exception as e:
        raise UserError(f"--push_to_hub: uploading {args.output_dir} to {repo_id} failed ({first_line(e)}); the "
                        f"run's files are complete there: upload them with `hf upload {repo_id} {args.output_dir}`") from None
    return f"https://huggingface.co/{repo_id}"
