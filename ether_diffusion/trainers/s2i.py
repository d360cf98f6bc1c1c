"""Semantic map -> image (S2I) on ADE20K with ETHER / ETHER+ (and the paper's baselines) on Stable Diffusion, or
any ControlNet-style dataset (conditioning image -> image).

A ControlNet-style signal encoder (diffusers' `ControlNetConditioningEmbedding`, last conv zero-initialised)
reads the palette-coloured map and its output is added to the UNet's `conv_in` output
(`ether_diffusion.control`). The encoder is trained fully; the UNet is frozen and finetuned through adapters
on attention q/k/v/out and the feed-forward input projection `ff.net.0.proj`. An accelerate script with the
argument names of diffusers' examples (see train_dreambooth.py), plus --method, --n_blocks, --target_modules,
--config FILE.yaml and the data arguments below:

    accelerate launch train_controlnet_s2i.py --config configs/s2i/etherplus.yaml \\
        --train_data_dir data/ADEChallengeData2016 --caption_file data/ade20k_captions.jsonl \\
        --output_dir runs/s2i/etherplus

ControlNet-style data (fill50k's layout: image, conditioning image and caption columns) comes as in diffusers'
train_controlnet.py: `--dataset_name` (a hub id or a `save_to_disk` folder) or a `--train_data_dir` imagefolder
with metadata.jsonl (`ether_diffusion.control_data`); the conditioning picture (edges, depth, poses, ...) reaches
the encoder as RGB in [0, 1]. An ADEChallengeData2016 folder stays ADE20K label maps.

Writes <output_dir>/adapter.safetensors, control_encoder.safetensors and control_encoder.json (load them
with `ether_diffusion.control.S2IPipeline.from_output(model, output_dir)`, or evaluate/s2i.py
--control_dir for ADE20K runs), samples/ (map or conditioning image | generated grids), checkpoint-N/ folders
(each also loadable by `from_output`), train_log.jsonl, TensorBoard logs and a README.md model card; with
--export_lora kohya|diffusers also the UNet's adapter as an exact LoRA file (the signal encoder stays in its own
file). One run per output folder (`ether_diffusion.run_folder`): a folder with another run in it needs
--resume_from_checkpoint latest or --overwrite_output_dir.

`--method none` trains the signal encoder alone (the paper's "Encoder-only" row): no adapter file is written,
and `from_output` then loads the encoder only.

The encoder's learning rate defaults to the paper's setting, min(--learning_rate, 1e-4). An explicit
--encoder_learning_rate is used as given: the toy world's protocol (configs/toy/s2i-*.yaml) lifts the cap.
"""
import logging
from pathlib import Path
from typing import NamedTuple

import torch

from .. import (arguments, checkpoints, checks, control_data, diffusers_flags, export, hub, processes, run_folder,
               training)
from ..adapters import CONTROL_TARGETS, count_adapter_parameters
from ..ade20k import ADE20KDataset, has_split, load_control_map
from ..builtin import builtin_caption_file, resolve_data_dir, resolve_model_path
from ..control import (ADE20K_CONDITIONING, ENCODER_CONFIG, ENCODER_WEIGHTS, IMAGE_CONDITIONING, S2IPipeline,
                       attach_control_encoder, encoder_config, load_control_encoder, make_control_encoder,
                       save_control_encoder, use_control, vae_scale_factor)
from ..crop import resize_and_crop
from ..errors import UserError, run_cli, writing
from ..files import load_rgb
from ..grids import sample_control_grid

logger = logging.getLogger(__name__)

ENCODER_LR_CAP = 1e-4


def make_parser():
    parser = arguments.trainer_parser(
        "train_controlnet_s2i.py", output_dir="s2i-adapter",
        description="Semantic map (ADE20K) or conditioning image (ControlNet-style data) -> image with ETHER / "
                    "ETHER+ and a signal encoder.",
        refused=diffusers_flags.CONTROLNET_REFUSED)
    g = parser.add_argument_group("data")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="ADEChallengeData2016 folder (or its parent): images/training/*.jpg + annotations/training/*.png. "
                        "`builtin:tiny-ade20k`: a tiny random folder written into <output_dir>/tiny-ade20k; "
                        "`builtin:toy-ade20k`: the toy world's label maps, written into <output_dir>/toy-ade20k. "
                        "Or ControlNet-style data: an imagefolder with metadata.jsonl, or a save_to_disk folder.")
    g.add_argument("--dataset_name", type=str, default=None,
                   help="ControlNet-style data: a datasets hub id (e.g. fusing/fill50k), a save_to_disk folder or a "
                        "folder datasets reads; its train split.")
    g.add_argument("--dataset_config_name", type=str, default=None, help="The config of --dataset_name.")
    for flag, default in control_data.COLUMNS.items():
        g.add_argument(f"--{flag}", type=str, default=default,
                       help=f"ControlNet-style data: the column of the {flag[:-len('_column')].replace('_', ' ')}.")
    g.add_argument("--proportion_empty_prompts", type=float, default=0,
                   help="Proportion of captions replaced by empty strings while training (0: none).")
    g.add_argument("--caption_file", type=str, default=None,
                   help='metadata.jsonl: {"file_name": "ADE_train_00000001.jpg", "text": "..."} per line. '
                        "Without one (or for images it lacks), captions list the map's class names.")
    g.add_argument("--conditioning_is_rgb", action="store_true",
                   help="The annotations (and --validation_maps) are maps coloured in the ADE20K palette, not labels.")
    g.add_argument("--max_train_samples", type=int, default=None, help="Train on the first N pairs only.")
    g.add_argument("--center_crop", action="store_true",
                   help="Center crop to the resolution (default: random crop) after resizing the shorter side.")
    g.add_argument("--encoder_learning_rate", type=float, default=None,
                   help=f"Learning rate of the signal encoder; default: min(--learning_rate, {ENCODER_LR_CAP:g}), the "
                        "paper's cap.")
    arguments.add_adapter_args(parser, default_targets=CONTROL_TARGETS, allow_no_adapter=True)
    arguments.add_training_args(parser, task="s2i")
    arguments.add_checkpoint_args(parser)
    export.add_export_args(parser)
    g = arguments.add_validation_args(parser)
    g.add_argument("--validation_maps", type=arguments.comma_list, default=None,
                   help="Comma-separated map files (same format as the annotations) sampled every --validation_steps; "
                        "default: the first --num_validation_maps maps of the data, each row ending with its real "
                        "picture. --validation_prompt: one for all maps or one per map; "
                        "default: each map's caption (caption file by name, else its class names).")
    g.add_argument("--validation_image", type=str, action="extend", nargs="+", default=None,
                   help="ControlNet-style data: conditioning images sampled every --validation_steps, with "
                        "--validation_prompt (one image for all prompts, one prompt for all images, or one each); "
                        "default: the first --num_validation_maps training rows with their captions and real pictures.")
    g.add_argument("--num_validation_maps", type=int, default=4,
                   help="Without --validation_maps / --validation_image: how many of the data's maps the grids show "
                        "(an ADE20K folder's validation split if it has one, else its training maps).")
    arguments.add_logging_args(parser)
    parser.add_argument("--tracker_project_name", type=str, default="train_controlnet",
                        help="The trackers' project name (a folder under --logging_dir for TensorBoard).")
    return parser


def parse_args(argv=None):
    args = arguments.parse_args(make_parser(), argv)

    arguments.check_common_args(args)
    if (args.train_data_dir is None) == (args.dataset_name is None):
        raise UserError("--train_data_dir is required (an ADE20K or imagefolder folder), or --dataset_name: one of them"
                        if args.train_data_dir is None else "give one of --train_data_dir and --dataset_name, not both")
    checks.at_least(args, 1, "max_train_samples", "num_validation_maps")
    checks.fraction(args, "proportion_empty_prompts")
    control_data.check_args(args)
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
    checks.positive(args, "encoder_learning_rate")
    return args


def load_validation_inputs(args, dataset, data_dir):
    """(coloured PIL maps, prompts, real pictures or None) for the validation grids, read and checked before
    training starts: the --validation_maps files, else the first --num_validation_maps maps of the folder's
    validation split (its training maps if it has none), each with its real picture."""
    real = None
    if args.validation_maps:
        maps = [(path, *load_control_map(path, args.resolution, args.conditioning_is_rgb))
                for path in args.validation_maps]
    else:
        if has_split(data_dir, "validation"):
            dataset = ADE20KDataset(data_dir, "validation", resolution=args.resolution, caption_file=args.caption_file,
                                    conditioning_is_rgb=args.conditioning_is_rgb)
        pairs = dataset.pairs[:args.num_validation_maps]
        maps = [(image, *load_control_map(annotation, args.resolution, args.conditioning_is_rgb))
                for image, annotation in pairs]
        real = [resize_and_crop(load_rgb(image), None, args.resolution)[0] for image, _ in pairs]
    prompts = args.validation_prompt or [dataset.caption_for(Path(path).name, labels) for path, _, labels in maps]
    if len(prompts) == 1:
        prompts = prompts * len(maps)
    if len(prompts) != len(maps):
        raise UserError(f"{len(args.validation_prompt)} --validation_prompt values for {len(maps)} --validation_maps: "
                        "give one prompt for all maps or one per map")
    return [control for _, control, _ in maps], prompts, real


class TrainingData(NamedTuple):
    dataset: torch.utils.data.Dataset  # items: pixel_values, conditioning_pixel_values, caption
    validation_controls: list  # PIL conditioning images (or coloured maps) of the validation grid's rows
    validation_prompts: list[str]
    validation_real: list | None  # the rows' real pictures (the grid's last column), when the data has them
    inputs: tuple  # the files and folders the run reads (kept if they lie in output_dir)
    conditioning: str  # what the encoder reads: control.ADE20K_CONDITIONING or control.IMAGE_CONDITIONING
    caption_source: str


def load_data(args) -> TrainingData:
    """ADE20K label maps, or ControlNet-style data (`control_data`), with the validation grid's inputs. Everything
    that can be wrong with them fails here, before a model is loaded or a file written."""
    if control_data.wants_control_data(args):
        dataset = control_data.ControlDataset.from_args(args)
        controls, prompts, real = control_data.validation_inputs(args, dataset)
        inputs = (dataset.root, *(args.validation_image or ()))
        conditioning, captions = IMAGE_CONDITIONING, f"captions from column {args.caption_column!r}"
    else:  # the layout and caption file when the dataset is built, then every map (labels, colours, sizes)
        data_dir = resolve_data_dir(args.train_data_dir, args.output_dir)
        if args.caption_file is None:  # a built-in dataset's own captions
            args.caption_file = builtin_caption_file(args.train_data_dir, data_dir)
        dataset = ADE20KDataset(data_dir, "training", resolution=args.resolution, caption_file=args.caption_file,
                                conditioning_is_rgb=args.conditioning_is_rgb, max_samples=args.max_train_samples,
                                center_crop=args.center_crop)
        dataset.check_maps(progress=True)
        controls, prompts, real = load_validation_inputs(args, dataset, data_dir)
        inputs = (data_dir, args.caption_file, *(args.validation_maps or ()))
        conditioning, captions = ADE20K_CONDITIONING, dataset.caption_source
    if args.proportion_empty_prompts:
        captions += f"; {args.proportion_empty_prompts:g} of them replaced by empty prompts"
    return TrainingData(control_data.with_empty_prompts(dataset, args.proportion_empty_prompts), controls, prompts,
                        real, inputs, conditioning, captions)


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

    data = load_data(args)
    dataset = data.dataset
    adapter_config = arguments.adapter_config_from_args(args)
    model_path = resolve_model_path(args.pretrained_model_name_or_path)  # a built-in one built (a cache to write)

    accelerator = training.setup_accelerator(args)
    # The output folder is this run's alone (locked), and a checkpoint in it is resumed only if it is this run's.
    settings = checkpoints.run_settings(accelerator, args, dataset_size=len(dataset))
    resume_from = run_folder.claim(accelerator, args, adapter_config, settings, outputs=(ENCODER_WEIGHTS, ENCODER_CONFIG),
                                   inputs=data.inputs)
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

    global_step, train_log = training.start_run(accelerator, args, args.tracker_project_name, resume_from, unet,
                                                optimizer, lr_scheduler, sampler, adapter_config,
                                                load_extra=lambda folder: load_encoder_into(encoder, folder))
    adapter_metadata = {"task": "s2i", "base_model": args.pretrained_model_name_or_path,
                        "resolution": args.resolution, "conditioning": data.conditioning}

    def validate(step, **kw):
        def draw(pipe):  # the encoder is already in pipe.unet
            return sample_control_grid(S2IPipeline(pipe), data.validation_prompts, data.validation_controls,
                                       args.num_validation_images, real_images=data.validation_real, seed=args.seed or 0,
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
        return training.diffusion_loss(noise_scheduler, model_pred, target, timesteps, args.snr_gamma,
                                       args.x0_loss_max_weight)

    logger.info(f"  Captions: {data.caption_source}")
    logger.info(f"  Encoder learning rate = {args.encoder_learning_rate:g}")
    training.log_run_start(args, len(dataset), len(train_dataloader), {
        "Trainable adapter parameters": count_adapter_parameters(accelerator.unwrap_model(unet)),
        "Control encoder parameters (trained fully)": sum(p.numel() for p in encoder.parameters()),
    })
    global_step, last_validation = training.train_loop(
        accelerator, args, unet, optimizer, lr_scheduler, train_dataloader, sampler, compute_loss,
        global_step=global_step, steps_per_epoch=steps_per_epoch, settings=settings, train_log=train_log,
        adapter_metadata=adapter_metadata,
        save_extra=lambda folder: save_control_encoder(encoder, folder, data.conditioning),
        validate=validate)

    # adapter (none with --method none) + encoder: what S2IPipeline.from_output(model, output_dir) loads; and a
    # final grid. The main process writes them, and a failure (a full disk) stops every process with its line.
    def save_outputs():
        with writing(Path(args.output_dir, ENCODER_WEIGHTS)):
            written = [save_control_encoder(encoder, args.output_dir, data.conditioning)]
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
