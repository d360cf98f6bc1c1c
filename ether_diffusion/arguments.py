"""The trainers' command line: diffusers' `examples/` argument names and defaults in groups, plus
`--method/--n_blocks/--target_modules`, and `--config FILE.yaml` (keys = argument names; the command line
wins). Every check here runs on the values alone, before any file is read or model loaded.

Every bad value is a `UserError` (one line, exit 2 through `errors.run_cli`).
"""
import argparse
import difflib

from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType

from . import checks, hub, packages
from .adapters import ATTENTION_TARGETS, AdapterConfig
from .adapters.methods import BLOCKS, METHODS, SETTING_FLAGS, learning_rate_help
from .diffusers_flags import Refused, add_refused_args
from .errors import ArgumentParser, UserError, number_problem
from .files import check_output_folder, read_yaml_mapping

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def comma_list(value) -> list[str]:
    """`to_q,to_k` -> ["to_q", "to_k"]; a YAML list is taken as is."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def trainer_parser(prog: str, output_dir: str, description: str, refused=()) -> ArgumentParser:
    """What every trainer's command line starts with: --config, the model and output arguments, and the
    diffusers flags it refuses (`refused`, names from `diffusers_flags`: each a one-line error when given)."""
    parser = ArgumentParser(prog=prog, description=description)
    add_config_arg(parser)
    add_model_args(parser, output_dir=output_dir)
    add_refused_args(parser, refused)
    return parser


def add_config_arg(parser):
    parser.add_argument(
        "--config", type=str, default=None, metavar="FILE.yaml",
        help="YAML file whose keys are argument names (e.g. `learning_rate: 6.0e-3`); the command line overrides "
             "it. Paths in it are relative to the current directory, as on the command line.",
    )


def add_model_args(parser, output_dir: str, resolution: int = 512):
    g = parser.add_argument_group("model and output")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="Hub id, local diffusers folder, `builtin:toy-sd` (the toy world's SD) or `builtin:tiny-sd` "
                        "(a tiny random SD built offline).")
    g.add_argument("--revision", type=str, default=None, help="Revision of the hub model.")
    g.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    g.add_argument("--tokenizer_name", type=str, default=None,
                   help="A tokenizer (hub id or folder) other than the model's own `tokenizer/`.")
    g.add_argument("--cache_dir", type=str, default=None, help="Where models downloaded from the hub are stored.")
    g.add_argument("--output_dir", type=str, default=output_dir,
                   help="Where the adapter, checkpoints, samples and logs are written; one run per folder (a second "
                        "trainer on it stops; a folder with another run's checkpoints or adapter needs "
                        "--resume_from_checkpoint or --overwrite_output_dir).")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Start a new run in an --output_dir that holds another: its checkpoints, adapter, train log, "
                        "samples and TensorBoard logs are deleted first (class images and built-in data are kept), "
                        "only what runs recorded in run_files.json; other files stay, and are never written over.")
    g.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    hub.add_hub_args(g)
    g.add_argument("--local_rank", type=int, default=-1,
                   help="Accepted from launchers that pass it; as in diffusers, the process's rank is read from the "
                        "environment (LOCAL_RANK).")
    g.add_argument("--resolution", type=int, default=resolution,
                   help="Training images are resized and cropped to this size (a multiple of 8).")


NO_ADAPTER = "none"  # --method none: no adapter at all (S2I: the signal encoder alone, the paper's "Encoder-only")


def add_adapter_args(parser, default_targets=ATTENTION_TARGETS, allow_no_adapter: bool = False):
    g = parser.add_argument_group("adapter")
    methods = list(METHODS) + ([NO_ADAPTER] if allow_no_adapter else [])
    g.add_argument("--method", type=str, default="ether+", choices=methods,
                   help="Finetuning method" + (f"; `{NO_ADAPTER}`: no adapter, the UNet stays as it is" if allow_no_adapter
                                               else "") + ".")
    g.add_argument("--n_blocks", type=int, default=None,
                   help=f"Block-diagonal blocks for {'/'.join(m.title for m in METHODS.values() if m.settings == BLOCKS)} "
                        "(default 1; must divide every target's width).")
    g.add_argument("--target_modules", type=comma_list, default=list(default_targets),
                   help=f"Comma-separated module names to adapt (default: {','.join(default_targets)}).")
    g.add_argument("--rank", type=int, default=None, help="LoRA rank / number of HRA reflections (default 4).")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: equal to the rank).")


def add_training_args(parser, task: str, train_batch_size: int = 4):
    """`task` ("dreambooth" or "s2i") picks the default learning rates (`methods.METHODS`) named in --help;
    `finish_learning_rate` fills them in after parsing."""
    g = parser.add_argument_group("training")
    g.add_argument("--train_batch_size", type=int, default=train_batch_size, help="Batch size per device.")
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="Total number of optimization steps. If provided, overrides num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Number of update steps to accumulate before performing a backward/update pass.")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Save memory at the expense of a slower backward pass.")
    g.add_argument("--learning_rate", type=float, default=None,
                   help=f"Learning rate; default: the method's (the paper's where it has one): {learning_rate_help(task)}.")
    g.add_argument("--scale_lr", action="store_true",
                   help="Scale the learning rate by the number of GPUs, accumulation steps and batch size.")
    g.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS,
                   help="diffusers' learning-rate schedule.")
    g.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up steps of the schedule.")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Hard resets of cosine_with_restarts.")
    g.add_argument("--lr_power", type=float, default=1.0, help="Power factor of the polynomial schedule.")
    g.add_argument("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes.")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2,
                   help=f"Weight decay (AdamW). Not applied to {'/'.join(m.name for m in METHODS.values() if not m.weight_decay)}: "
                        "their vectors are normalised in every forward, so decay would only change their length "
                        "(the paper uses 0).")
    g.add_argument("--adam_epsilon", type=float, default=1e-08)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="Min-SNR loss weighting (Hang et al. 2023) with this gamma, as diffusers' examples do; 5.0 is "
                        "the recommended value. Default: plain MSE.")
    g.add_argument("--x0_loss_max_weight", type=float, default=None,
                   help="Weight each example's loss by 1/SNR (the error of the clean latents it implies), at most "
                        "this: the noisiest steps, which lay out the picture, count most. Default: plain MSE.")
    g.add_argument("--noise_offset", type=float, default=0.0,
                   help="Offset noise of this scale (a per-channel constant added to the noise), as diffusers' "
                        "train_text_to_image.py does.")
    g.add_argument("--offset_noise", action="store_true",
                   help="diffusers train_dreambooth.py's offset noise: --noise_offset 0.1.")
    g.add_argument("--set_grads_to_none", action="store_true",
                   help="Set gradients to None instead of zero after each step (saves memory).")
    g.add_argument("--prediction_type", type=str, default=None, choices=["epsilon", "v_prediction"],
                   help="Training target; default: the model scheduler's prediction_type.")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="Frozen weights in this precision, adapter parameters stay float32. Default: accelerate's.")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere GPUs.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="Use xformers attention (the adapters wrap Linear layers, so any kernel works).")


def add_checkpoint_args(parser):
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="Save an adapter-only checkpoint (adapter, optimizer, scheduler, RNG) every X updates.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Max number of checkpoints to keep.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help='A `checkpoint-N` folder, or "latest" for the newest complete one in output_dir.')


def add_logging_args(parser):
    g = parser.add_argument_group("logging")
    g.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard folder, relative to output_dir.")
    g.add_argument("--report_to", type=str, default="tensorboard",
                   help='"tensorboard" (default), "wandb", "comet_ml", "all" or "none".')
    g.add_argument("--distance_logging_steps", type=int, default=50,
                   help="Log the adapter's transformation and weight distances from the base model every X updates "
                        "(0: never). ~10 s on CPU for SD-1.5, milliseconds on a GPU.")


def add_validation_args(parser, validation_steps: int = 100):
    g = parser.add_argument_group("validation")
    g.add_argument("--validation_prompt", type=str, action="extend", nargs="+", default=None,
                   help="Prompts sampled during training, one grid row each (several values, or the flag repeated).")
    g.add_argument("--num_validation_images", type=int, default=4, help="Images per validation prompt.")
    g.add_argument("--validation_steps", type=int, default=validation_steps,
                   help="Sample a validation grid every X updates.")
    g.add_argument("--validation_inference_steps", type=int, default=25, help="Denoising steps of validation.")
    g.add_argument("--validation_scheduler", type=str, default="DPMSolverMultistepScheduler",
                   choices=["DPMSolverMultistepScheduler", "DDPMScheduler"], help="The sampler of validation grids.")
    return g


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse `argv` on top of the `--config` YAML file, if any: the file's values become the parser's
    defaults (checked and converted like command-line values), so the command line overrides them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    values = load_config(parser, known.config) if known.config else {}
    append_dests = {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)}
    parser.set_defaults(**{k: v for k, v in values.items() if k not in append_dests})
    args = parser.parse_args(argv)
    # A repeatable flag given on the command line replaces the file's list instead of extending it.
    for dest in append_dests & values.keys():
        if getattr(args, dest) is None:
            setattr(args, dest, values[dest])
    return args


def load_config(parser: argparse.ArgumentParser, path) -> dict:
    """The YAML file as {dest: value}; unknown keys and ill-typed values are `UserError`s naming key and file."""
    data = read_yaml_mapping(path)
    if not data:
        return {}
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            close = difflib.get_close_matches(dest, actions, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{path}: unknown key {key!r}{hint}")
        values[dest] = _config_value(actions[dest], f"{path}: {key}", value)
    return values


def _config_value(action, where: str, value):
    if isinstance(action, Refused):
        action.refuse()
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        return None if value is None else [_convert(action, where, v) for v in (value if isinstance(value, list) else [value])]
    return _convert(action, where, value)


def _convert(action, where: str, value):
    if value is None:  # `key:` left empty, or `key: null`
        if action.default is None:  # "not set" is what the argument means without the key too
            return None
        raise UserError(f"{where} has no value: give one, or remove the key for the default {action.default!r}")
    kind = action.type
    if kind is comma_list:
        value = comma_list(value)
    elif isinstance(value, (list, dict)):
        raise UserError(f"{where} must be a single value, got {value!r}")
    elif kind in (int, float):
        # YAML reads `6e-3` (no dot) as a string, so strings are converted; booleans and 1.5-as-int are not values.
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise UserError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        try:
            value = kind(value)
        except (ValueError, TypeError):  # TypeError: a YAML date
            raise UserError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        problem = number_problem(value)
        if problem:
            raise UserError(f"{where} {problem}")
    else:
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where}: invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})")
    return value


TRACKERS = [t.value for t in LoggerType] + ["none"]


def check_common_args(args, required=("pretrained_model_name_or_path",)):
    """Checks that need no file or model: they fail at once, before anything is loaded. Every number is in
    its range here (NaN, infinity and integers beyond 64 bits were refused while parsing)."""
    for name in required:
        if getattr(args, name) in (None, ""):
            raise UserError(f"--{name} is required (on the command line or in --config)")
        if not str(getattr(args, name)).strip():
            raise UserError(f"--{name} {getattr(args, name)!r} is blank")
    checks.resolution(args, "resolution")
    checks.at_least(args, 1, "train_batch_size", "num_train_epochs", "gradient_accumulation_steps",
                    "checkpointing_steps", "n_blocks", "rank", "max_train_steps", "checkpoints_total_limit",
                    "lr_num_cycles")
    checks.at_least(args, 1, *[n for n in ("validation_steps", "num_validation_images", "validation_inference_steps")
                               if hasattr(args, n)])
    checks.seed(args, "seed")
    checks.positive(args, "learning_rate", "adam_epsilon", "max_grad_norm", "lr_power", "lora_alpha", "snr_gamma",
                    "x0_loss_max_weight")
    if args.snr_gamma is not None and args.x0_loss_max_weight is not None:
        raise UserError("--snr_gamma and --x0_loss_max_weight are two loss weightings: give one of them")
    checks.fraction_below_one(args, "adam_beta1", "adam_beta2")
    checks.not_negative(args, "adam_weight_decay", "lr_warmup_steps", "dataloader_num_workers", "distance_logging_steps",
                        "noise_offset")
    if args.offset_noise:
        if args.noise_offset:
            raise UserError("--offset_noise is --noise_offset 0.1: give one of them")
        args.noise_offset = 0.1
    if not args.target_modules:
        raise UserError("--target_modules is empty")
    check_method_settings(args)
    check_report_to(args.report_to)
    packages.check_packages(args)
    hub.check_hub_args(args)
    check_output_folder(args.output_dir, "--output_dir")


def check_method_settings(args):
    """A setting the chosen method does not use (`--rank` with ETHER+, `--n_blocks` with LoRA) is refused, not
    silently ignored."""
    method = METHODS.get(args.method)
    for key, flag in SETTING_FLAGS.items():
        if getattr(args, flag, None) is not None and (method is None or key not in method.settings):
            takes = ", ".join(f"--{SETTING_FLAGS[k]}" for k in method.settings) if method else "no adapter settings"
            raise UserError(f"--{flag} does not apply to --method {args.method} (it takes {takes})")


def check_report_to(value):
    """accelerate's tracker names; a tracker whose package is missing would be dropped without a word."""
    if value not in TRACKERS:
        raise UserError(f"--report_to {value!r} is not a tracker (choose from {', '.join(TRACKERS)})")
    if value not in ("all", "none") and LoggerType(value) not in get_available_trackers():
        raise UserError(f"--report_to {value}: its package is not installed (install it, or use --report_to none)")


def finish_learning_rate(args, task: str):
    """`--learning_rate` not given: the method's default for `task` from the method table."""
    if args.learning_rate is None:
        args.learning_rate = getattr(METHODS[args.method], f"{task}_lr")


def adapter_config_from_args(args) -> AdapterConfig | None:
    """The adapter the arguments ask for; None for `--method none`."""
    if args.method == NO_ADAPTER:
        return None
    settings = {key: getattr(args, flag) for key, flag in SETTING_FLAGS.items() if getattr(args, flag) is not None}
    return AdapterConfig(method=args.method, target_modules=list(args.target_modules), **settings)
