"""What every trainer here needs, written once: the trainers (`trainers/dreambooth.py`, `trainers/s2i.py`) use it,
with their command line from `arguments.py`, their checkpoints from `checkpoints.py` and their data order from
`data_order.py`.

- accelerate set-up, logging, trackers (TensorBoard by default) and a plain `train_log.jsonl`;
- loading the frozen SD parts, the optimizer (weight decay as the method table says), diffusers' LR
  schedulers, the step/epoch plan;
- the noise-prediction step: noisy latents and the `epsilon` / `v_prediction` target;
- the optimizer-step loop itself (`train_loop`): a trainer supplies only its loss; it stops a diverged run
  (`divergence.py`), logs loss, lr and every `--distance_logging_steps` the adapter's distances from the base
  model (`analysis.adapter_distances`), saves checkpoints and validation grids (`samples/step-NNNNNN.png`).

What only the main process writes (log lines, grids) goes through `processes.on_main`, so a failure there
(a full disk) stops every process with the same line instead of leaving the others waiting.
"""
import contextlib
import json
import logging
import math
import os
import shutil
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from . import divergence, hub, processes
from .adapter_file import ADAPTER_FILE, save_adapter
from .adapters import (TEXT_ENCODER_TARGETS, AdapterConfig, adapter_parameters, check_targets, inject_adapters,
                       text_encoder_config)
from .adapters.methods import METHODS
from .analysis import adapter_distances
from .arguments import adapter_config_from_args
from .checkpoints import load_checkpoint, save_checkpoint
from .data_order import resumable_dataloader, shared_seed
from .devices import TORCH_DTYPES, share_cpu_cores
from .errors import UserError, writing
from .grids import save_grid
from .pipelines import model_load_errors
from .run_folder import SAMPLES_DIR, TRAIN_LOG, check_final_step, release_output_dir

logger = logging.getLogger(__name__)


# ============================================================================================ models
def load_models(args, model_path, adapter_config: AdapterConfig | None):
    """Tokenizer, text encoder, VAE, UNet (frozen, on CPU, float32) and the training noise scheduler, with its
    training target set (`--prediction_type`); the adapter (if any) is checked to fit the UNet, and with
    --train_text_encoder the text encoder (not injected yet)."""
    kw = dict(revision=args.revision, cache_dir=args.cache_dir)
    with model_load_errors(args.tokenizer_name or args.pretrained_model_name_or_path):
        if args.tokenizer_name:  # diffusers' --tokenizer_name: a tokenizer of its own (hub id or folder)
            tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer_name, **kw)
        else:
            tokenizer = CLIPTokenizer.from_pretrained(model_path, subfolder="tokenizer", **kw)
    with model_load_errors(args.pretrained_model_name_or_path):
        text_encoder = CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder", variant=args.variant, **kw)
        vae = AutoencoderKL.from_pretrained(model_path, subfolder="vae", variant=args.variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", variant=args.variant, **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(model_path, subfolder="scheduler", **kw)
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
    if adapter_config is not None:
        check_targets(unet, adapter_config)  # the adapter fits (layer names, widths) before anything expensive
        if trains_text_encoder(args):
            check_targets(text_encoder, text_encoder_config(adapter_config))
    configure_prediction_type(noise_scheduler, args.prediction_type)
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def trains_text_encoder(args) -> bool:
    """--train_text_encoder (DreamBooth's; the S2I trainer has no such flag)."""
    return getattr(args, "train_text_encoder", False)


def inject_for_training(accelerator, args, adapter_config: AdapterConfig | None, text_encoder, vae, unet) -> torch.dtype:
    """Frozen weights to the device in the mixed-precision dtype, then the adapters (injected afterwards, so
    they stay float32; none for `--method none`; on the text encoder's attention too with
    --train_text_encoder), xformers and gradient checkpointing as asked. Returns the frozen weights' dtype."""
    weight_dtype = weight_dtype_of(accelerator)
    for module in (text_encoder, vae, unet):
        module.to(accelerator.device, dtype=weight_dtype)
    if adapter_config is not None:
        inject_adapters(unet, adapter_config)
        if trains_text_encoder(args):
            inject_adapters(text_encoder, text_encoder_config(adapter_config))
    if args.enable_xformers_memory_efficient_attention:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as e:
            raise UserError(f"--enable_xformers_memory_efficient_attention: {e}") from None
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if trains_text_encoder(args):  # non-reentrant, as torch recommends
            text_encoder.activation_checkpointing_enable({"use_reentrant": False})
    return weight_dtype


def encode_prompt(tokenizer, text_encoder, prompt, device) -> torch.Tensor:
    """Text embeddings of one prompt (1, 77, d) or a list of prompts (B, 77, d); with gradients where the
    text encoder has trainable adapters (--train_text_encoder)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


def validation_pipeline(accelerator, tokenizer, text_encoder, vae, unet, noise_scheduler,
                        scheduler: str = "DPMSolverMultistepScheduler"):
    """A pipeline around the in-memory modules: nothing is reloaded and nothing is cast. `scheduler`: the
    sampler's class name in diffusers (`--validation_scheduler`)."""
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=accelerator.unwrap_model(text_encoder), tokenizer=tokenizer, unet=accelerator.unwrap_model(unet),
        scheduler=getattr(diffusers, scheduler).from_config(noise_scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_latents(vae, pixel_values, weight_dtype) -> torch.Tensor:
    """Images in [-1, 1] -> scaled VAE latents (sampled from the posterior, with torch's global RNG). The VAE
    encoder at full resolution is where a batch too large for the device runs out of memory first: that is
    one line saying what to lower, not the allocator's message."""
    try:
        return vae.encode(pixel_values.to(dtype=weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
    except RuntimeError as e:  # torch.OutOfMemoryError is one; the CPU allocator raises a plain RuntimeError
        if not is_out_of_memory(e):
            raise
        n, _, height, width = pixel_values.shape
        raise UserError(f"out of memory on {vae.device} encoding a batch of {n} images of {width}x{height} px: lower "
                        "--train_batch_size (raise --gradient_accumulation_steps to keep the batch) or --resolution, "
                        "or use --mixed_precision fp16/bf16") from None


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or any(
        text in str(error) for text in ("out of memory", "not enough memory"))


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
    everything with `--seed` and creates output_dir (main process). Several CPU processes on one machine
    share its cores (`devices.share_cpu_cores`)."""
    log_with = None if args.report_to in (None, "", "none") else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=str(Path(args.output_dir, args.logging_dir))),
    )
    logger.info(accelerator.state)
    share_cpu_cores(accelerator)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.seed is not None:
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
    decay = args.adam_weight_decay if METHODS[cfg.method].weight_decay else 0.0
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
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factors.
    return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=args.max_train_steps * num_processes, num_cycles=args.lr_num_cycles,
                         power=args.lr_power)


def prepare_training(accelerator, args, model, optimizer, dataset, collate_fn=None):
    """The resumable loader over `dataset`, the step plan, the LR schedule, and `accelerator.prepare`.
    Returns (model, optimizer, dataloader, sampler, lr_scheduler, steps_per_epoch)."""
    dataloader, sampler = resumable_dataloader(dataset, shared_seed(accelerator, args.seed), args.train_batch_size,
                                               num_workers=args.dataloader_num_workers, collate_fn=collate_fn,
                                               num_processes=accelerator.num_processes)
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


def noisy_latents_and_target(noise_scheduler, latents, noise_offset: float = 0.0):
    """Forward diffusion at uniformly drawn timesteps; returns (noisy latents, timesteps, target).
    `noise_offset` (`--noise_offset`): a per-image, per-channel constant of that scale added to the noise, as
    diffusers' examples do (https://www.crosslabs.org/blog/diffusion-with-offset-noise)."""
    noise = torch.randn_like(latents)
    if noise_offset:
        noise += noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              device=latents.device).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    return noisy, timesteps, diffusion_target(noise_scheduler, latents, noise, timesteps)


def diffusion_loss(noise_scheduler, model_pred, target, timesteps, snr_gamma: float | None = None,
                   x0_max_weight: float | None = None) -> torch.Tensor:
    """MSE of the prediction, each example weighted (at most one of the two; default: plain MSE):
    - `snr_gamma` (`--snr_gamma`): Min-SNR, min(SNR, gamma) / SNR (+1 for v-prediction), as diffusers' examples
      do (arXiv 2303.09556, section 3.4): the cleanest timesteps count less;
    - `x0_max_weight` (`--x0_loss_max_weight`): 1 / SNR (1 / (SNR + 1) for v-prediction), the factor that turns
      the prediction's error into the error of the clean latents it implies, at most `x0_max_weight`. The noisiest
      timesteps, where a picture's layout is decided, then count most: their noise error is tiny, so plain MSE
      hardly trains what a control signal must steer (docs/toy_world.md, `make demo-s2i`)."""
    if snr_gamma is None and x0_max_weight is None:
        return F.mse_loss(model_pred.float(), target.float())
    snr = compute_snr(noise_scheduler, timesteps)
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    if snr_gamma is not None:
        weights = snr.clamp(max=snr_gamma) / snr + (1 if v_prediction else 0)
    else:
        weights = (1 / (snr + 1 if v_prediction else snr)).clamp(max=x0_max_weight)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()


# ============================================================================================ logs and images
class TrainLog:
    """`train_log.jsonl`: one JSON object per optimizer step (loss, lr, and whatever else a step logs).

    A resumed run drops the lines after the checkpoint it resumed from, so the file reads as one run; it is
    rewritten whole or not at all (a full disk then leaves the old log), and a line cut short by a full disk
    or a kill is dropped on the next resume."""

    def __init__(self, path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    pass
        tmp = self.path.with_name(self.path.name + ".tmp")
        with writing(self.path):
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)

    def write(self, step: int, values: dict):
        with writing(self.path), self.path.open("a") as f:
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
    pipe = validation_pipeline(accelerator, tokenizer, text_encoder, vae, unet, noise_scheduler, args.validation_scheduler)
    with evaluation_mode(accelerator, unet, text_encoder):
        grid = draw(pipe)
    return save_samples(accelerator, grid, args.output_dir, step, tag=tag, name=name)


def save_samples(accelerator, grid, output_dir, step: int, tag: str = "validation", name: str | None = None) -> Path:
    """`samples/step-NNNNNN.png` (or `samples/<name>`), also logged to the trackers."""
    path = Path(output_dir, SAMPLES_DIR, name or f"step-{step:06d}.png")
    with writing(path):
        save_grid(grid, path)
    log_image(accelerator, tag, grid, step)
    return path


# ============================================================================================ the run
def start_run(accelerator, args, project: str, resume_from, model, optimizer, lr_scheduler, sampler,
              cfg: AdapterConfig | None, load_extra=None, text_encoder=None):
    """Trackers, then resume (adapter, optimizer, scheduler, RNG, data seed) if asked, then the train log.
    Returns (global_step, train_log); train_log is None off the main process.

    `resume_from` is `run_folder.claim`'s answer (a whole checkpoint of this run); a run that would end
    before it, or before the finished adapter already in output_dir, is refused here, where its length is
    known (`--num_train_epochs` decides it once the data is prepared)."""
    check_final_step(args.output_dir, args.max_train_steps, resume_from)
    global_step = 0
    if resume_from is not None:
        state = processes.everywhere(accelerator, lambda: load_checkpoint(
            accelerator, resume_from, model, optimizer, lr_scheduler, cfg, load_extra=load_extra,
            text_encoder=text_encoder))[accelerator.process_index]
        global_step, sampler.seed = state["global_step"], state["data_seed"]
        accelerator.print(f"resumed from {resume_from} at step {global_step}")
    train_log = None

    def open_logs():
        nonlocal train_log
        accelerator.init_trackers(project, config=tracker_config(args))
        train_log = TrainLog(Path(args.output_dir, TRAIN_LOG), resume_step=global_step if resume_from else None)

    processes.on_main(accelerator, open_logs)
    return global_step, train_log


def log_method(args):
    """The run's first log line (each trainer's first call): what trains, how big, where and how fast (the
    trainable count follows in `log_run_start`, once the model is loaded)."""
    cfg = adapter_config_from_args(args)
    shape = METHODS[cfg.method].shape(cfg) if cfg else "no adapter"
    logger.info(f"  Method = {args.method} ({shape}), targets = {','.join(args.target_modules)}, "
                f"learning rate = {args.learning_rate:g}")
    if trains_text_encoder(args):
        logger.info(f"  Text encoder: {args.method} ({shape}), targets = {','.join(TEXT_ENCODER_TARGETS)}, "
                    f"learning rate = {args.text_encoder_lr:g}")


def log_run_start(args, num_examples: int, batches_per_epoch: int, parameter_counts: dict[str, int]):
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {num_examples}, batches per epoch = {batches_per_epoch}")
    for what, count in parameter_counts.items():
        logger.info(f"  {what} = {count:,}")
    logger.info(f"  Batch size per device = {args.train_batch_size}, accumulation = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}, learning rate = {args.learning_rate:g}")


def adapter_distance_logs(accelerator, model) -> dict[str, float]:
    """`analysis.adapter_distances` of the unwrapped model: transform_distance, transform_distance_per_block
    (not for LoRA, which is additive) and weight_distance."""
    return adapter_distances(accelerator.unwrap_model(model))


def write_step_logs(accelerator, args, model, train_log, step: int, logs: dict):
    """One step's values (and every `--distance_logging_steps` the adapter's distances) to the trackers and
    `train_log` (main process)."""
    if args.distance_logging_steps and step % args.distance_logging_steps == 0:
        logs.update(adapter_distance_logs(accelerator, model))
    accelerator.log(logs, step=step)
    if train_log is not None:
        train_log.write(step, logs)


def train_loop(accelerator, args, model, optimizer, lr_scheduler, dataloader, sampler, compute_loss, *,
               global_step: int, steps_per_epoch: int, settings: dict, train_log=None, adapter_metadata=None,
               save_extra=None, validate=None, validation_epochs: int | None = None, text_encoder=None):
    """The optimizer-step loop both trainers share; returns (global_step, last_validation).

    `compute_loss(batch)` returns the loss of one micro-batch (called inside `accelerator.accumulate`).
    After each optimizer step: a diverged step stops the run (`divergence.check_step`); loss and lr (and every
    `--distance_logging_steps` the adapter distances) go to the trackers and `train_log`; every
    `--checkpointing_steps` a checkpoint is saved (with `save_extra`, and `settings`, the run's
    `checkpoints.run_settings`, which a resumed run must match); every `--validation_steps` the main process
    calls `validate(step) -> Path`, and `last_validation` is (step, path) of the last such grid, or None.
    With `validation_epochs` (DreamBooth's `--validation_epochs`) it is also called at the end of every epoch
    whose 0-based index divides by it, as diffusers' train_dreambooth_lora.py does (after the first epoch, then
    every N), unless that step already has its grid. `text_encoder` (--train_text_encoder) trains beside
    `model`: accumulated, clipped and checkpointed with it.
    """
    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    models = [model] + ([text_encoder] if text_encoder is not None else [])
    trainable = [p for m in models for p in m.parameters() if p.requires_grad]
    last_validation = None
    for m in models:
        m.train()
    with progress_bar:  # closed before an error is printed, so the error is the last line
        for epoch in range(global_step // steps_per_epoch, args.num_train_epochs):
            if global_step >= args.max_train_steps:
                break
            # Skip what this epoch already consumed before the checkpoint, without loading it.
            done = global_step - epoch * steps_per_epoch
            sampler.start_epoch(epoch, skip=done * args.gradient_accumulation_steps * args.train_batch_size
                                * accelerator.num_processes)
            step_loss = 0.0
            for batch in dataloader:
                with accelerator.accumulate(*models):
                    loss = compute_loss(batch)
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=args.set_grads_to_none)
                step_loss += accelerator.gather(loss.detach()).mean().item() / args.gradient_accumulation_steps

                if not accelerator.sync_gradients:
                    continue
                # One optimizer step done. Diverged: every process stops before anything of it is written.
                global_step += 1
                divergence.check_step(accelerator, args, global_step, step_loss, grad_norm, trainable)
                progress_bar.update(1)
                logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}
                step_loss = 0.0
                processes.on_main(accelerator, lambda: write_step_logs(accelerator, args, model, train_log, global_step, logs))
                progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")

                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args.output_dir, global_step, model, optimizer, lr_scheduler,
                                    state={"epoch": epoch, "data_seed": sampler.seed, "settings": settings,
                                           "args": vars(args)},
                                    total_limit=args.checkpoints_total_limit, adapter_metadata=adapter_metadata,
                                    save_extra=save_extra, text_encoder=text_encoder)
                if validate is not None and global_step % args.validation_steps == 0:
                    last_validation = (global_step, processes.on_main(accelerator, lambda: validate(global_step)))
                if global_step >= args.max_train_steps:
                    break
            if (validate is not None and validation_epochs and epoch % validation_epochs == 0
                    and (last_validation is None or last_validation[0] != global_step)):
                last_validation = (global_step, processes.on_main(accelerator, lambda: validate(global_step)))
    return global_step, last_validation


def save_final_adapter(accelerator, model, output_dir, metadata: dict, step: int, text_encoder=None) -> Path:
    """`<output_dir>/adapter.safetensors` of the unwrapped model (and text encoder, --train_text_encoder), its
    header naming the step it was trained to."""
    path = Path(output_dir, ADAPTER_FILE)
    with writing(path):
        save_adapter(accelerator.unwrap_model(model), path, extra_metadata={**metadata, "steps": step},
                     text_encoder=accelerator.unwrap_model(text_encoder) if text_encoder is not None else None)
    return path


def finish_run(accelerator, args, save_outputs, repo_id: str | None = None):
    """The end of every trainer: the main process writes the outputs (`save_outputs`; a failure, a full disk,
    stops every process with its line) and pushes the folder to the hub repo `repo_id` (--push_to_hub), the
    trackers close, and the output folder is free for the next run."""
    def save_and_push():
        save_outputs()
        if repo_id is not None:
            accelerator.print(f"pushed {args.output_dir} to {hub.push_output(args, repo_id)}")

    processes.on_main(accelerator, save_and_push)
    accelerator.end_training()
    release_output_dir(args.output_dir)


def save_final_grid(output_dir, global_step: int, last_validation, validate) -> Path:
    """`samples/final.png`: a copy of the last validation grid if it was made at the final step (the same
    modules, inputs and seed: no need to sample twice), else `validate(step, name=..., tag="final")`."""
    final = Path(output_dir, SAMPLES_DIR, "final.png")
    if last_validation is not None and last_validation[0] == global_step:
        with writing(final):
            shutil.copyfile(last_validation[1], final)
    else:
        validate(global_step, name=final.name, tag="final")
    return final
