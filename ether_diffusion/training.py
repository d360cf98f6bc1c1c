"""What every trainer here needs, written once: train_dreambooth.py and train_controlnet_s2i.py use it.

- arguments: diffusers' `examples/` names and defaults in groups, plus `--method/--n_blocks/--target_modules`
  and `--config FILE.yaml` (keys = argument names; the command line wins);
- accelerate set-up, logging, trackers (TensorBoard by default) and a plain `train_log.jsonl`;
- loading the frozen SD parts, the optimizer (no weight decay on ETHER/ETHER+), diffusers' LR schedulers,
  the step/epoch plan;
- the noise-prediction step: noisy latents and the `epsilon` / `v_prediction` target;
- the optimizer-step loop itself (`train_loop`): a trainer supplies only its loss;
- adapter-only checkpoints (`checkpoint-N/`: adapter, optimizer, scheduler, RNG, plus what a trainer adds,
  e.g. the S2I control encoder), written atomically, pruned, and exact resume: the data order is a function
  of (seed, epoch) and the batches already seen are skipped without being loaded;
- loss, lr and every `--distance_logging_steps` the adapter's distances from the base model
  (`analysis.adapter_distances`) to the trackers and `train_log.jsonl`;
- validation grids saved as `samples/step-NNNNNN.png` and logged.

Every bad value is a `UserError` (one line, exit 2 through `errors.run_cli`).
"""
import argparse
import contextlib
import difflib
import json
import logging
import math
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from .adapter_file import config_difference, config_from_metadata, read_adapter_metadata, save_adapter
from .adapters import ATTENTION_TARGETS, METHODS, AdapterConfig, adapter_parameters, check_targets, inject_adapters
from .errors import UserError, first_line
from .files import replace_folder
from .pipelines import TORCH_DTYPES, model_load_errors

logger = logging.getLogger(__name__)

# The paper sets weight decay to 0 for ETHER methods: the vectors are normalised in every forward, so decay
# would only shrink their length (changing nothing but the effective step size).
NO_WEIGHT_DECAY_METHODS = ("ether", "ether+")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_STATE = "state.json"  # written last inside the temporary folder
TRAIN_LOG = "train_log.jsonl"
SAMPLES_DIR = "samples"


# ============================================================================================ arguments
class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are `UserError`s: one line naming the problem, no usage dump, exit code 2."""

    def error(self, message):
        raise UserError(message)


def comma_list(value) -> list[str]:
    """`to_q,to_k` -> ["to_q", "to_k"]; a YAML list is taken as is."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def add_config_arg(parser):
    parser.add_argument(
        "--config", type=str, default=None, metavar="FILE.yaml",
        help="YAML file whose keys are argument names (e.g. `learning_rate: 6.0e-3`); the command line overrides "
             "it. Paths in it are relative to the current directory, as on the command line.",
    )


def add_model_args(parser, output_dir: str, resolution: int = 512):
    g = parser.add_argument_group("model and output")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="Hub id, local diffusers folder, or `builtin:tiny-sd` (a tiny random SD built offline).")
    g.add_argument("--revision", type=str, default=None, help="Revision of the hub model.")
    g.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    g.add_argument("--output_dir", type=str, default=output_dir,
                   help="Where the adapter, checkpoints, samples and logs are written.")
    g.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    g.add_argument("--resolution", type=int, default=resolution,
                   help="Training images are resized and cropped to this size (a multiple of 8).")


def add_adapter_args(parser, default_targets=ATTENTION_TARGETS):
    g = parser.add_argument_group("adapter")
    g.add_argument("--method", type=str, default="ether+", choices=METHODS, help="Finetuning method.")
    g.add_argument("--n_blocks", type=int, default=1,
                   help="Block-diagonal blocks for ETHER/ETHER+/OFT/Naive (must divide every target's width).")
    g.add_argument("--target_modules", type=comma_list, default=list(default_targets),
                   help=f"Comma-separated module names to adapt (default: {','.join(default_targets)}).")
    g.add_argument("--rank", type=int, default=4, help="LoRA rank / number of HRA reflections.")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: equal to the rank).")


def add_training_args(parser, learning_rate_help: str, learning_rate=None, train_batch_size: int = 4):
    g = parser.add_argument_group("training")
    g.add_argument("--train_batch_size", type=int, default=train_batch_size, help="Batch size per device.")
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="Total number of optimization steps. If provided, overrides num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Number of update steps to accumulate before performing a backward/update pass.")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Save memory at the expense of a slower backward pass.")
    g.add_argument("--learning_rate", type=float, default=learning_rate, help=learning_rate_help)
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
                   help="Weight decay (AdamW). Not applied to ETHER/ETHER+ vectors: they are normalised in every "
                        "forward, so decay would only change their length (the paper uses 0).")
    g.add_argument("--adam_epsilon", type=float, default=1e-08)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
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
    g.add_argument("--validation_prompt", type=str, action="append", default=None,
                   help="A prompt sampled during training (repeat the flag for several: one grid row each).")
    g.add_argument("--num_validation_images", type=int, default=4, help="Images per validation prompt.")
    g.add_argument("--validation_steps", type=int, default=validation_steps,
                   help="Sample a validation grid every X updates.")
    g.add_argument("--validation_inference_steps", type=int, default=25, help="Denoising steps of validation.")
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
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {first_line(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of argument names to values, not a {type(data).__name__}")
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
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        return None if value is None else [_convert(action, where, v) for v in (value if isinstance(value, list) else [value])]
    return _convert(action, where, value)


def _convert(action, where: str, value):
    if value is None:
        return None
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
        except ValueError:
            raise UserError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    else:
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where}: invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})")
    return value


def check_common_args(args, required=("pretrained_model_name_or_path",)):
    """Checks that need no file or model: they fail at once, before anything is loaded."""
    for name in required:
        if getattr(args, name) in (None, ""):
            raise UserError(f"--{name} is required (on the command line or in --config)")
    if args.resolution <= 0 or args.resolution % 8:
        raise UserError(f"--resolution {args.resolution} is not a positive multiple of 8")
    positive = ["train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "checkpointing_steps",
                "n_blocks", "rank"]
    positive += [n for n in ("max_train_steps", "checkpoints_total_limit") if getattr(args, n) is not None]
    positive += [n for n in ("validation_steps", "num_validation_images", "validation_inference_steps") if hasattr(args, n)]
    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.seed is not None and args.seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {args.seed}")
    if args.learning_rate is not None and args.learning_rate <= 0:
        raise UserError(f"--learning_rate must be positive, got {args.learning_rate}")
    for name in ("lr_warmup_steps", "dataloader_num_workers", "distance_logging_steps"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} cannot be negative, got {getattr(args, name)}")
    if not args.target_modules:
        raise UserError("--target_modules is empty")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise UserError(f"--output_dir {args.output_dir} is a file, not a folder")


def adapter_config_from_args(args) -> AdapterConfig:
    return AdapterConfig(method=args.method, n_blocks=args.n_blocks, target_modules=list(args.target_modules),
                         rank=args.rank, alpha=args.lora_alpha)


# ============================================================================================ models
def load_models(args, model_path, adapter_config: AdapterConfig):
    """Tokenizer, text encoder, VAE, UNet (frozen, on CPU, float32) and the training noise scheduler, with its
    training target set (`--prediction_type`); the adapter is checked to fit the UNet (not injected yet)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = dict(revision=args.revision)
    with model_load_errors(args.pretrained_model_name_or_path):
        tokenizer = CLIPTokenizer.from_pretrained(model_path, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder", variant=args.variant, **kw)
        vae = AutoencoderKL.from_pretrained(model_path, subfolder="vae", variant=args.variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", variant=args.variant, **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(model_path, subfolder="scheduler", **kw)
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
    check_targets(unet, adapter_config)  # the adapter fits (layer names, widths) before anything expensive
    configure_prediction_type(noise_scheduler, args.prediction_type)
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def inject_for_training(accelerator, args, adapter_config: AdapterConfig, text_encoder, vae, unet) -> torch.dtype:
    """Frozen weights to the device in the mixed-precision dtype, then the adapters (injected afterwards, so
    they stay float32), xformers and gradient checkpointing as asked. Returns the frozen weights' dtype."""
    weight_dtype = weight_dtype_of(accelerator)
    for module in (text_encoder, vae, unet):
        module.to(accelerator.device, dtype=weight_dtype)
    inject_adapters(unet, adapter_config)
    if args.enable_xformers_memory_efficient_attention:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as e:
            raise UserError(f"--enable_xformers_memory_efficient_attention: {e}") from None
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return weight_dtype


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompt, device) -> torch.Tensor:
    """Text embeddings of one prompt (1, 77, d) or a list of prompts (B, 77, d)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


def validation_pipeline(accelerator, tokenizer, text_encoder, vae, unet, noise_scheduler):
    """A pipeline around the in-memory modules: nothing is reloaded and nothing is cast."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=accelerator.unwrap_model(unet),
        scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_latents(vae, pixel_values, weight_dtype) -> torch.Tensor:
    """Images in [-1, 1] -> scaled VAE latents (sampled from the posterior, with torch's global RNG)."""
    return vae.encode(pixel_values.to(dtype=weight_dtype)).latent_dist.sample() * vae.config.scaling_factor


def tracker_config(args) -> dict:
    """`vars(args)` with values TensorBoard's hparams accept (lists joined, None as "None")."""
    out = {}
    for key, value in vars(args).items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


# ============================================================================================ accelerate
def setup_logging():
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO)


def setup_accelerator(args):
    """An `Accelerator` writing trackers to output_dir/logging_dir, quiet library logs on every process; seeds
    everything with `--seed` and creates output_dir (main process)."""
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    log_with = None if args.report_to in (None, "", "none") else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=str(Path(args.output_dir, args.logging_dir))),
    )
    logger.info(accelerator.state)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.seed is not None:
        from accelerate.utils import set_seed

        set_seed(args.seed)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    return accelerator


def weight_dtype_of(accelerator) -> torch.dtype:
    """The dtype of the frozen weights: fp16/bf16 under mixed precision. Adapter parameters stay float32."""
    return TORCH_DTYPES.get(accelerator.mixed_precision, torch.float32)


@contextlib.contextmanager
def evaluation_mode(accelerator, *models):
    """Sampling from the training modules as they are: eval mode, no grad, autocast under mixed precision.

    The modules are never cast (`.to(dtype)`): the float32 adapter parameters stay float32, so the optimizer
    never meets fp16 gradients afterwards (the "Attempting to unscale FP16 gradients" bug of scripts that cast
    the UNet for validation). Train mode is restored on exit."""
    modes = [m.training for m in models]
    dtype = weight_dtype_of(accelerator)
    for m in models:
        m.eval()
    try:
        with torch.no_grad(), torch.autocast(accelerator.device.type, dtype=dtype, enabled=dtype != torch.float32):
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


# ============================================================================================ optimizer
def adapter_param_group(model, cfg: AdapterConfig, args) -> dict:
    decay = 0.0 if cfg.method in NO_WEIGHT_DECAY_METHODS else args.adam_weight_decay
    return {"params": adapter_parameters(model), "weight_decay": decay}


def make_optimizer(args, param_groups: list[dict]):
    """AdamW over param groups (each may set its own lr / weight_decay, e.g. the S2I encoder's lr cap)."""
    optimizer_cls = torch.optim.AdamW
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        optimizer_cls = bnb.optim.AdamW8bit
    return optimizer_cls(param_groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                         weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def plan_steps(args, batches_per_epoch: int) -> int:
    """Fill in max_train_steps / num_train_epochs (diffusers' rule); returns optimizer steps per epoch."""
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    return steps_per_epoch


def make_lr_scheduler(args, optimizer, num_processes: int):
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factors.
    return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=args.max_train_steps * num_processes, num_cycles=args.lr_num_cycles,
                         power=args.lr_power)


def prepare_training(accelerator, args, model, optimizer, dataset, collate_fn=None):
    """The resumable loader over `dataset`, the step plan, the LR schedule, and `accelerator.prepare`.
    Returns (model, optimizer, dataloader, sampler, lr_scheduler, steps_per_epoch)."""
    dataloader, sampler = resumable_dataloader(dataset, shared_seed(accelerator, args.seed), args.train_batch_size,
                                               num_workers=args.dataloader_num_workers, collate_fn=collate_fn)
    # Plan with the per-process length the prepared (sharded) loader will have: the scheduler needs it now.
    plan_steps(args, math.ceil(len(dataloader) / accelerator.num_processes))
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator.num_processes)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    steps_per_epoch = plan_steps(args, len(dataloader))
    return model, optimizer, dataloader, sampler, lr_scheduler, steps_per_epoch


# ============================================================================================ the diffusion step
def configure_prediction_type(noise_scheduler, prediction_type=None) -> str:
    """Set the training target on the scheduler (validation schedulers built from its config follow)."""
    if prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    ptype = noise_scheduler.config.prediction_type
    if ptype not in ("epsilon", "v_prediction"):
        raise UserError(f"prediction type {ptype!r} is not supported (epsilon or v_prediction)")
    return ptype


def diffusion_target(noise_scheduler, latents, noise, timesteps):
    """What the UNet learns to predict: the noise (`epsilon`) or the velocity (`v_prediction`)."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


def noisy_latents_and_target(noise_scheduler, latents):
    """Forward diffusion at uniformly drawn timesteps; returns (noisy latents, timesteps, target)."""
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              device=latents.device).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    return noisy, timesteps, diffusion_target(noise_scheduler, latents, noise, timesteps)


# ============================================================================================ data order
class ResumableSampler(torch.utils.data.Sampler):
    """A shuffled order that is a function of (seed, epoch) only, with a per-sample augmentation seed.

    Yields `(index, sample_seed)`: datasets take that key and draw their random crops from
    `torch.Generator().manual_seed(sample_seed)`, never from the global RNG, so neither skipping batches on
    resume nor data-loader workers change what a sample looks like. `start_epoch(epoch, skip)` drops the
    first `skip` samples of the epoch without loading them. (Not named `set_epoch`: accelerate's prepared
    loaders call `sampler.set_epoch(<their own iteration count>)`, which would undo both on resume.)
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def start_epoch(self, epoch: int, skip: int = 0):
        self.epoch, self.skip = epoch, skip

    def _order(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        sample_seeds = torch.randint(0, 2**62, (self.num_samples,), generator=g).tolist()
        return list(zip(order, sample_seeds))

    def __iter__(self):
        return iter(self._order()[self.skip:])

    def __len__(self):
        return max(self.num_samples - self.skip, 0)


def resumable_dataloader(dataset, seed: int, batch_size: int, num_workers: int = 0, collate_fn=None):
    """A DataLoader over a `ResumableSampler`; returns (dataloader, sampler).

    The loader gets its own generator: torch draws a base seed for workers from it each time an iterator is
    created (once per epoch), which would otherwise come from the global RNG, and a resumed run, which
    creates its iterator after restoring the RNG, would then draw its noise one step out of line.
    """
    sampler = ResumableSampler(len(dataset), seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                         collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def shared_seed(accelerator, seed) -> int:
    """`seed`, or one random seed agreed by all processes (the data order must be the same everywhere)."""
    if seed is not None:
        return int(seed)
    value = [random.SystemRandom().randrange(2**31)]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(value)
    return value[0]


# ============================================================================================ RNG state
def rng_state() -> dict:
    """Python, NumPy and torch RNG states, as types `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ============================================================================================ checkpoints
def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete `checkpoint-N` folders by step. A `.tmp` folder (a save that did not finish) never counts."""
    output_dir = Path(output_dir)
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and (p / CHECKPOINT_STATE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def find_resume_checkpoint(output_dir, value) -> Path | None:
    """`--resume_from_checkpoint`: None, "latest" (None if there is none yet, as in diffusers) or a folder."""
    if not value:
        return None
    if value == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            logger.info("no checkpoint in %s yet: starting a new run", output_dir)
        return path
    path = Path(value)
    if not path.exists() and not path.is_absolute():
        path = Path(output_dir, value)
    if not (path / CHECKPOINT_STATE).is_file():
        raise UserError(f"checkpoint not found: {value} (no {CHECKPOINT_STATE} in {path})")
    return path


def check_checkpoint_matches(checkpoint: Path, cfg: AdapterConfig):
    """Resuming with another adapter than the checkpoint's is an error (checked before any model load)."""
    file_cfg = config_from_metadata(read_adapter_metadata(checkpoint / "adapter.safetensors"))
    difference = config_difference(file_cfg, cfg)
    if difference:
        key, have, want = difference
        raise UserError(f"{checkpoint} was trained with {key}={have!r} but this run asks for {key}={want!r}; "
                        "resume with the same setting or use another --output_dir")


def save_checkpoint(accelerator, output_dir, step: int, model, optimizer, lr_scheduler, state: dict,
                    total_limit: int | None = None, adapter_metadata: dict | None = None, save_extra=None) -> Path:
    """Write `checkpoint-<step>/` atomically and prune to `total_limit`.

    Everything goes to `checkpoint-<step>.tmp/` first (state.json last), which is then renamed: a crash during
    the save leaves the older checkpoints intact and `latest` only ever sees complete folders. Adapter-only:
    the frozen model is not saved (SD-1.5 would be 3.4 GB per checkpoint). `save_extra(folder)` (main process)
    writes whatever else a trainer trains, e.g. the S2I control encoder.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")  # each process has its own RNG
    if accelerator.is_main_process:
        save_adapter(accelerator.unwrap_model(model), tmp / "adapter.safetensors", extra_metadata=adapter_metadata)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        if save_extra is not None:
            save_extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / CHECKPOINT_STATE).write_text(json.dumps({"global_step": step, **state}, indent=2, default=str))
        replace_folder(tmp, final)  # the same step saved again (a rerun in the same output_dir) replaces it
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir, total_limit: int | None):
    """Keep the `total_limit` newest complete checkpoints; remove leftovers of interrupted saves."""
    output_dir = Path(output_dir)
    for p in output_dir.glob("checkpoint-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    if total_limit is None:
        return
    found = list_checkpoints(output_dir)
    for _, path in found[: max(len(found) - total_limit, 0)]:
        logger.info("removing old checkpoint %s", path.name)
        shutil.rmtree(path)


def load_checkpoint(accelerator, checkpoint: Path, model, optimizer, lr_scheduler, cfg: AdapterConfig,
                    load_extra=None) -> dict:
    """Restore adapter, optimizer, scheduler, grad scaler and RNG (and `load_extra(folder)`: what `save_extra`
    wrote); returns the saved state (global_step...)."""
    from .adapter_file import load_adapter

    def load(name):
        return torch.load(checkpoint / name, map_location="cpu", weights_only=True)

    state = json.loads((checkpoint / CHECKPOINT_STATE).read_text())
    load_adapter(accelerator.unwrap_model(model), checkpoint / "adapter.safetensors", config=cfg)
    if load_extra is not None:
        load_extra(checkpoint)
    optimizer.load_state_dict(load("optimizer.pt"))
    lr_scheduler.load_state_dict(load("scheduler.pt"))
    if accelerator.scaler is not None and (checkpoint / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(load("scaler.pt"))
    rng_file = checkpoint / f"rng-{accelerator.process_index}.pt"
    if not rng_file.is_file():
        logger.warning("%s has no RNG state for process %d: the resumed run is not bit-exact",
                       checkpoint, accelerator.process_index)
        rng_file = checkpoint / "rng-0.pt"
    set_rng_state(torch.load(rng_file, weights_only=True))
    return state


# ============================================================================================ logs and images
class TrainLog:
    """`train_log.jsonl`: one JSON object per optimizer step (loss, lr, and whatever else a step logs).

    A resumed run drops the lines after the checkpoint it resumed from, so the file reads as one run."""

    def __init__(self, path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError):
                    pass
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, values: dict):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def log_image(accelerator, tag: str, image, step: int):
    """Log a PIL image to every tracker that takes images."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: wandb.Image(image)}, step=step)


def validation_grid(accelerator, args, models, draw, step: int, tag: str = "validation", name: str | None = None) -> Path:
    """Sample from the training modules as they are and save the grid (see `save_samples`).

    `models` = (tokenizer, text_encoder, vae, unet, noise_scheduler); `draw(pipe) -> PIL grid` samples from a
    `validation_pipeline` around them, in `evaluation_mode` (no grad, autocast, nothing cast)."""
    tokenizer, text_encoder, vae, unet, noise_scheduler = models
    pipe = validation_pipeline(accelerator, tokenizer, text_encoder, vae, unet, noise_scheduler)
    with evaluation_mode(accelerator, unet):
        grid = draw(pipe)
    return save_samples(accelerator, grid, args.output_dir, step, tag=tag, name=name)


def save_samples(accelerator, grid, output_dir, step: int, tag: str = "validation", name: str | None = None) -> Path:
    """`samples/step-NNNNNN.png` (or `samples/<name>`), also logged to the trackers."""
    path = Path(output_dir, SAMPLES_DIR, name or f"step-{step:06d}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    log_image(accelerator, tag, grid, step)
    return path


# ============================================================================================ the run
def start_run(accelerator, args, project: str, resume_from, model, optimizer, lr_scheduler, sampler,
              cfg: AdapterConfig, load_extra=None):
    """Trackers, then resume (adapter, optimizer, scheduler, RNG, data seed) if asked, then the train log.
    Returns (global_step, train_log); train_log is None off the main process."""
    if accelerator.is_main_process:
        accelerator.init_trackers(project, config=tracker_config(args))
    global_step = 0
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, model, optimizer, lr_scheduler, cfg, load_extra=load_extra)
        global_step, sampler.seed = state["global_step"], state["data_seed"]
        accelerator.print(f"resumed from {resume_from} at step {global_step}")
    train_log = None
    if accelerator.is_main_process:
        train_log = TrainLog(Path(args.output_dir, TRAIN_LOG), resume_step=global_step if resume_from else None)
    return global_step, train_log


def log_run_start(args, num_examples: int, batches_per_epoch: int, parameter_counts: dict[str, int]):
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {num_examples}, batches per epoch = {batches_per_epoch}")
    logger.info(f"  Method = {args.method}, n_blocks = {args.n_blocks}, targets = {','.join(args.target_modules)}")
    for what, count in parameter_counts.items():
        logger.info(f"  {what} = {count:,}")
    logger.info(f"  Batch size per device = {args.train_batch_size}, accumulation = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}, learning rate = {args.learning_rate:g}")


def adapter_distance_logs(accelerator, model) -> dict[str, float]:
    """`analysis.adapter_distances` of the unwrapped model: transform_distance, transform_distance_per_block
    (not for LoRA, which is additive) and weight_distance."""
    from .analysis import adapter_distances

    return adapter_distances(accelerator.unwrap_model(model))


def train_loop(accelerator, args, model, optimizer, lr_scheduler, dataloader, sampler, compute_loss, *,
               global_step: int, steps_per_epoch: int, train_log=None, adapter_metadata=None, save_extra=None,
               validate=None):
    """The optimizer-step loop both trainers share; returns (global_step, last_validation).

    `compute_loss(batch)` returns the loss of one micro-batch (called inside `accelerator.accumulate`).
    After each optimizer step: loss and lr (and every `--distance_logging_steps` the adapter distances) go to
    the trackers and `train_log`; every `--checkpointing_steps` a checkpoint is saved (with `save_extra`);
    every `--validation_steps` the main process calls `validate(step) -> Path`, and `last_validation` is
    (step, path) of the last such grid, or None.
    """
    from tqdm.auto import tqdm

    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    trainable = [p for p in model.parameters() if p.requires_grad]
    last_validation = None
    model.train()
    for epoch in range(global_step // steps_per_epoch, args.num_train_epochs):
        if global_step >= args.max_train_steps:
            break
        # Skip what this epoch already consumed before the checkpoint, without loading it.
        done = global_step - epoch * steps_per_epoch
        sampler.start_epoch(epoch, skip=done * args.gradient_accumulation_steps * args.train_batch_size
                            * accelerator.num_processes)
        step_loss = 0.0
        for batch in dataloader:
            with accelerator.accumulate(model):
                loss = compute_loss(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            step_loss += accelerator.gather(loss.detach()).mean().item() / args.gradient_accumulation_steps

            if not accelerator.sync_gradients:
                continue
            # One optimizer step done.
            global_step += 1
            progress_bar.update(1)
            logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}
            step_loss = 0.0
            if args.distance_logging_steps and global_step % args.distance_logging_steps == 0 and accelerator.is_main_process:
                logs.update(adapter_distance_logs(accelerator, model))
            progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)
            if train_log is not None:
                train_log.write(global_step, logs)

            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, global_step, model, optimizer, lr_scheduler,
                                state={"epoch": epoch, "data_seed": sampler.seed, "method": args.method,
                                       "n_blocks": args.n_blocks, "args": vars(args)},
                                total_limit=args.checkpoints_total_limit, adapter_metadata=adapter_metadata,
                                save_extra=save_extra)
            if validate is not None and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                last_validation = (global_step, validate(global_step))
            if global_step >= args.max_train_steps:
                break
    progress_bar.close()
    return global_step, last_validation


def save_final_grid(output_dir, global_step: int, last_validation, validate) -> Path:
    """`samples/final.png`: a copy of the last validation grid if it was made at the final step (the same
    modules, inputs and seed: no need to sample twice), else `validate(step, name=..., tag="final")`."""
    final = Path(output_dir, SAMPLES_DIR, "final.png")
    if last_validation is not None and last_validation[0] == global_step:
        shutil.copyfile(last_validation[1], final)
    else:
        validate(global_step, name=final.name, tag="final")
    return final
