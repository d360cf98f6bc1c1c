"""Semantic map -> image (S2I) on ADE20K with ETHER / ETHER+ (and the paper's baselines) on Stable Diffusion.

A ControlNet-style signal encoder (diffusers' `ControlNetConditioningEmbedding`, last conv zero-initialised)
reads the palette-coloured map and its output is added to the UNet's `conv_in` output
(`ether_diffusion.control`). The encoder is trained fully; the UNet is frozen and finetuned through adapters
on attention q/k/v/out and the feed-forward input projection `ff.net.0.proj`. An accelerate script with the
argument names of diffusers' examples (see train_dreambooth.py), plus --method, --n_blocks, --target_modules,
--config FILE.yaml and the data arguments below:

    accelerate launch train_controlnet_s2i.py --config configs/s2i/etherplus.yaml \\
        --train_data_dir data/ADEChallengeData2016 --caption_file data/ade20k_captions.jsonl \\
        --output_dir runs/s2i/etherplus

Writes <output_dir>/adapter.safetensors, control_encoder.safetensors and control_encoder.json (load them
with `ether_diffusion.control.S2IPipeline.from_output(model, output_dir)`, or evaluate/s2i.py
--control_dir), samples/ (map | generated grids), checkpoint-N/ folders (each also loadable by
`from_output`), train_log.jsonl, TensorBoard logs and a README.md model card; with --export_lora kohya|diffusers
also the UNet's adapter as an exact LoRA file (the signal encoder stays in its own file). One run per output
folder (`ether_diffusion.run_folder`): a folder with another run in it needs --resume_from_checkpoint latest or
--overwrite_output_dir.

`--method none` trains the signal encoder alone (the paper's "Encoder-only" row): no adapter file is written,
and `from_output` then loads the encoder only.

The encoder's learning rate is capped at 1e-4 (the paper's setting): by default it is
min(--learning_rate, 1e-4), and an --encoder_learning_rate above the cap is an error rather than silently
clamped, so a config file always says what a run used.
"""
import logging
from pathlib import Path

from .. import arguments, checkpoints, checks, diffusers_flags, export, hub, processes, run_folder, training
from ..adapters import CONTROL_TARGETS, count_adapter_parameters
from ..ade20k import ADE20KDataset, load_control_map
from ..builtin import resolve_data_dir, resolve_model_path
from ..control import (ENCODER_CONFIG, ENCODER_WEIGHTS, S2IPipeline, attach_control_encoder, encoder_config,
                                     load_control_encoder, make_control_encoder, save_control_encoder, use_control,
                                     vae_scale_factor)
from ..errors import UserError, run_cli, writing
from ..grids import sample_control_grid

logger = logging.getLogger(__name__)

ENCODER_LR_CAP = 1e-4
DEFAULT_VALIDATION_MAPS = 4  # training maps shown when no --validation_maps are given


def make_parser():
    parser = arguments.trainer_parser(
        "train_controlnet_s2i.py", output_dir="s2i-adapter",
        description="Semantic map -> image (ADE20K) with ETHER / ETHER+ and a signal encoder.",
        refused=diffusers_flags.CONTROLNET_REFUSED)
    g = parser.add_argument_group("data")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="ADEChallengeData2016 folder (or its parent): images/training/*.jpg + annotations/training/*.png. "
                        "`builtin:tiny-ade20k`: a tiny random folder written into <output_dir>/tiny-ade20k (demo).")
    g.add_argument("--caption_file", type=str, default=None,
                   help='metadata.jsonl: {"file_name": "ADE_train_00000001.jpg", "text": "..."} per line. '
                        "Without one (or for images it lacks), captions list the map's class names.")
    g.add_argument("--conditioning_is_rgb", action="store_true",
                   help="The annotations (and --validation_maps) are maps coloured in the ADE20K palette, not labels.")
    g.add_argument("--max_train_samples", type=int, default=None, help="Train on the first N pairs only.")
    g.add_argument("--center_crop", action="store_true",
                   help="Center crop to the resolution (default: random crop) after resizing the shorter side.")
    g.add_argument("--encoder_learning_rate", type=float, default=None,
                   help=f"Learning rate of the signal encoder, at most {ENCODER_LR_CAP:g} (a larger value is an error); "
                        f"default: min(--learning_rate, {ENCODER_LR_CAP:g}).")
    arguments.add_adapter_args(parser, default_targets=CONTROL_TARGETS, allow_no_adapter=True)
    arguments.add_training_args(parser, task="s2i")
    arguments.add_checkpoint_args(parser)
    export.add_export_args(parser)
    g = arguments.add_validation_args(parser)
    g.add_argument("--validation_maps", type=arguments.comma_list, default=None,
                   help="Comma-separated map files (same format as the annotations) sampled every --validation_steps; "
                        "default: the first four training maps. --validation_prompt: one for all maps or one per map; "
                        "default: each map's caption (caption file by name, else its class names).")
    arguments.add_logging_args(parser)
    return parser


def parse_args(argv=None):
    args = arguments.parse_args(make_parser(), argv)

    arguments.check_common_args(args, required=("pretrained_model_name_or_path", "train_data_dir"))
    checks.at_least(args, 1, "max_train_samples")
    if args.method == arguments.NO_ADAPTER:  # only the encoder trains: its rate is the only one
        if args.export_lora:
            raise UserError(f"--export_lora {args.export_lora}: --method none trains no adapter to export")
        if args.learning_rate is None:
            args.learning_rate = ENCODER_LR_CAP
    else:
        arguments.finish_learning_rate(args, task="s2i")
        export.check_export_args(args)
    if args.encoder_learning_rate is None:
        args.encoder_learning_rate = min(args.learning_rate, ENCODER_LR_CAP)
    if not 0 < args.encoder_learning_rate <= ENCODER_LR_CAP:
        raise UserError(f"--encoder_learning_rate {args.encoder_learning_rate:g} is not in (0, {ENCODER_LR_CAP:g}]: the "
                        "signal encoder's rate is capped at 1e-4 (the paper's setting)")
    return args


def load_validation_inputs(args, dataset):
    """(coloured PIL maps, prompts) for the validation grids, read and checked before training starts."""
    if args.validation_maps:
        maps = [(path, *load_control_map(path, args.resolution, args.conditioning_is_rgb))
                for path in args.validation_maps]
    else:  # the training maps themselves, centre-cropped
        maps = [(image, *load_control_map(annotation, args.resolution, args.conditioning_is_rgb))
                for image, annotation in dataset.pairs[:DEFAULT_VALIDATION_MAPS]]
    prompts = args.validation_prompt or [dataset.caption_for(Path(path).name, labels) for path, _, labels in maps]
    if len(prompts) == 1:
        prompts = prompts * len(maps)
    if len(prompts) != len(maps):
        raise UserError(f"{len(args.validation_prompt)} --validation_prompt values for {len(maps)} --validation_maps: "
                        "give one prompt for all maps or one per map")
    return [control for _, control, _ in maps], prompts


def add_encoder(unet, scale_factor: int):
    """A fresh signal encoder into the UNet's conv_in, after `inject_adapters` (which freezes everything): the
    encoder stays trainable, float32 under mixed precision too, and out of the adapter file."""
    encoder = make_control_encoder(unet, scale_factor).to(unet.device)
    attach_control_encoder(unet, encoder)
    return encoder


def load_encoder_into(encoder, folder):
    """Copy the encoder saved in `folder` (a checkpoint) into `encoder`, refusing one of another shape."""
    saved = load_control_encoder(folder)
    if encoder_config(saved) != encoder_config(encoder):
        raise UserError(f"{Path(folder, ENCODER_CONFIG)} describes {encoder_config(saved)}, but this model needs "
                        f"{encoder_config(encoder)}: resume with the same base model")
    encoder.load_state_dict(saved.state_dict())


def main(argv=None):
    args = parse_args(argv)
    training.setup_logging()
    training.log_method(args)

    # Everything that can be wrong with the input fails here, before a model is loaded or a file written:
    # the layout and caption file when the dataset is built, then every map (labels, colours, sizes).
    data_dir = resolve_data_dir(args.train_data_dir, args.output_dir)
    dataset = ADE20KDataset(data_dir, "training", resolution=args.resolution, caption_file=args.caption_file,
                            conditioning_is_rgb=args.conditioning_is_rgb, max_samples=args.max_train_samples,
                            center_crop=args.center_crop)
    dataset.check_maps(progress=True)
    validation_maps, validation_prompts = load_validation_inputs(args, dataset)
    adapter_config = arguments.adapter_config_from_args(args)
    model_path = resolve_model_path(args.pretrained_model_name_or_path)  # a built-in one built (a cache to write)

    accelerator = training.setup_accelerator(args)
    # The output folder is this run's alone (locked), and a checkpoint in it is resumed only if it is this run's.
    settings = checkpoints.run_settings(accelerator, args, dataset_size=len(dataset))
    resume_from = run_folder.claim(accelerator, args, adapter_config, settings, outputs=(ENCODER_WEIGHTS, ENCODER_CONFIG),
                                   inputs=(data_dir, args.caption_file, *(args.validation_maps or ())))
    repo_id = processes.on_main(accelerator, lambda: hub.create_hub_repo(args)) if args.push_to_hub else None
    if resume_from is not None:
        load_control_encoder(resume_from)  # present and readable, before the model is loaded
    tokenizer, text_encoder, vae, unet, noise_scheduler = training.load_models(args, model_path, adapter_config)
    # Frozen weights in the mixed-precision dtype, then adapters, then the encoder: both stay float32.
    weight_dtype = training.inject_for_training(accelerator, args, adapter_config, text_encoder, vae, unet)
    encoder = add_encoder(unet, vae_scale_factor(vae))

    if args.scale_lr:  # the adapter's rate only: the encoder's is capped
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    encoder_group = {"params": list(encoder.parameters()), "lr": args.encoder_learning_rate,
                     "weight_decay": args.adam_weight_decay}
    adapter_groups = [training.adapter_param_group(unet, adapter_config, args)] if adapter_config is not None else []
    optimizer = training.make_optimizer(args, adapter_groups + [encoder_group])
    unet, optimizer, train_dataloader, sampler, lr_scheduler, steps_per_epoch = training.prepare_training(
        accelerator, args, unet, optimizer, dataset)

    global_step, train_log = training.start_run(accelerator, args, "s2i", resume_from, unet, optimizer, lr_scheduler,
                                                sampler, adapter_config,
                                                load_extra=lambda folder: load_encoder_into(encoder, folder))
    adapter_metadata = {"task": "s2i", "base_model": args.pretrained_model_name_or_path,
                        "resolution": args.resolution, "conditioning": "ade20k-palette"}

    def validate(step, **kw):
        def draw(pipe):  # the encoder is already in pipe.unet
            return sample_control_grid(S2IPipeline(pipe), validation_prompts, validation_maps,
                                       args.num_validation_images, seed=args.seed or 0,
                                       num_inference_steps=args.validation_inference_steps,
                                       height=args.resolution, width=args.resolution)

        models = (tokenizer, text_encoder, vae, unet, noise_scheduler)
        return training.validation_grid(accelerator, args, models, draw, step, **kw)

    def compute_loss(batch):
        latents = training.encode_latents(vae, batch["pixel_values"], weight_dtype)
        embeds = training.encode_prompt(tokenizer, text_encoder, batch["caption"], accelerator.device)
        noisy_latents, timesteps, target = training.noisy_latents_and_target(noise_scheduler, latents, args.noise_offset)
        with use_control(unet, batch["conditioning_pixel_values"]):
            model_pred = unet(noisy_latents, timesteps, embeds).sample
        return training.diffusion_loss(noise_scheduler, model_pred, target, timesteps, args.snr_gamma)

    logger.info(f"  Captions: {dataset.caption_source}")
    logger.info(f"  Encoder learning rate = {args.encoder_learning_rate:g}")
    training.log_run_start(args, len(dataset), len(train_dataloader), {
        "Trainable adapter parameters": count_adapter_parameters(accelerator.unwrap_model(unet)),
        "Control encoder parameters (trained fully)": sum(p.numel() for p in encoder.parameters()),
    })
    global_step, last_validation = training.train_loop(
        accelerator, args, unet, optimizer, lr_scheduler, train_dataloader, sampler, compute_loss,
        global_step=global_step, steps_per_epoch=steps_per_epoch, settings=settings, train_log=train_log,
        adapter_metadata=adapter_metadata, save_extra=lambda folder: save_control_encoder(encoder, folder),
        validate=validate)

    # adapter (none with --method none) + encoder: what S2IPipeline.from_output(model, output_dir) loads; and a
    # final grid. The main process writes them, and a failure (a full disk) stops every process with its line.
    def save_outputs():
        with writing(Path(args.output_dir, ENCODER_WEIGHTS)):
            written = [save_control_encoder(encoder, args.output_dir)]
        final = training.save_final_grid(args.output_dir, global_step, last_validation, validate)
        if adapter_config is not None:  # the model card and LoRA export describe the adapter
            adapter_file = training.save_final_adapter(accelerator, unet, args.output_dir, adapter_metadata,
                                                       global_step)
            with writing(f"the LoRA export and model card in {args.output_dir}"):
                written += [adapter_file, *export.finish_run(args.output_dir, adapter_file, args.export_lora, final)]
        accelerator.print(f"wrote {', '.join(map(str, [*written, final]))}")

    training.finish_run(accelerator, args, save_outputs, repo_id)


if __name__ == "__main__":
    run_cli(main)
