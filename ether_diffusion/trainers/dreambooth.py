"""DreamBooth with ETHER / ETHER+ (and the paper's baselines OFT, Naive, LoRA, plus HRA) on Stable Diffusion.

An accelerate script in the style of diffusers' examples/dreambooth/train_dreambooth_lora.py, with the same
argument names and defaults, plus --method, --n_blocks, --target_modules and --config FILE.yaml.
--train_text_encoder also adapts the CLIP text encoder's attention projections (q/k/v/out_proj, as diffusers does)
with the same method, at --text_encoder_lr; its adapter goes into the same adapter file.

    accelerate launch train_dreambooth.py --config configs/dreambooth/etherplus.yaml \\
        --instance_data_dir data/dreambooth/dog --instance_prompt "a photo of qwe dog" \\
        --class_prompt "a photo of dog" --class_data_dir class-images/dog --output_dir runs/etherplus-dog

Writes <output_dir>/adapter.safetensors (load it with ether_diffusion.load_adapter or
`python -m ether_diffusion.sample`), samples/ (validation grids and the final grid), checkpoint-N/ folders,
train_log.jsonl, TensorBoard logs and a README.md model card; with --export_lora kohya|diffusers also the adapter
as an exact LoRA file beside it (ether_diffusion.export), with --export_merged DIR a stock diffusers pipeline folder.
One run per output folder (`ether_diffusion.run_folder`): a folder with another run in it needs
--resume_from_checkpoint latest or --overwrite_output_dir.
"""
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import (arguments, checkpoints, checks, diffusers_flags, dreambooth_data, export, hub, processes, run_folder,
               training)
from ..adapters import count_adapter_parameters
from ..builtin import resolve_instance_dir, resolve_model_path
from ..devices import TORCH_DTYPES
from ..errors import UserError, run_cli, writing
from ..files import check_output_folder
from ..grids import sample_grid
from ..pipelines import load_pipeline

logger = logging.getLogger(__name__)


def make_parser():
    parser = arguments.trainer_parser("train_dreambooth.py", output_dir="dreambooth-adapter",
                                      description="DreamBooth with ETHER / ETHER+ and the paper's baselines.",
                                      refused=diffusers_flags.DREAMBOOTH_REFUSED)
    g = parser.add_argument_group("dreambooth")
    g.add_argument("--instance_data_dir", type=str, default=None,
                   help="A folder with the subject's images; `builtin:toy-subject/<name>`: a toy-world subject "
                        "(`builtin:demo-subject`: the demo's qwe toy, star_toy).")
    g.add_argument("--instance_prompt", type=str, default=None, help='Prompt with the identifier, e.g. "a photo of qwe dog".')
    g.add_argument("--class_data_dir", type=str, default=None,
                   help="Class images for prior preservation; missing ones are generated and saved here "
                        "(default: <output_dir>/class-images).")
    g.add_argument("--class_prompt", type=str, default=None, help='Prompt of the class, e.g. "a photo of dog".')
    g.add_argument("--with_prior_preservation", action="store_true", help="Add the prior preservation loss.")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="The weight of the prior preservation loss.")
    g.add_argument("--num_class_images", type=int, default=100,
                   help="Minimal class images for prior preservation; missing ones are sampled with class_prompt.")
    g.add_argument("--sample_batch_size", type=int, default=4, help="Batch size for generating class images.")
    g.add_argument("--class_inference_steps", type=int, default=50, help="Denoising steps per class image.")
    g.add_argument("--prior_generation_precision", type=str, default=None, choices=["no", "fp32", "fp16", "bf16"],
                   help="Precision of class-image generation (default, or `no`: fp16 on GPU, fp32 on CPU).")
    g.add_argument("--pre_compute_text_embeddings", action="store_true",
                   help="Accepted for diffusers' commands: the instance and class prompts are always encoded once, "
                        "before training, unless --train_text_encoder.")
    g.add_argument("--train_text_encoder", action="store_true",
                   help="Also adapt the text encoder's attention (q_proj, k_proj, v_proj, out_proj) with --method; "
                        "saved in the adapter file and in the LoRA exports.")
    g.add_argument("--text_encoder_lr", type=float, default=None,
                   help="The text encoder's learning rate with --train_text_encoder (kohya's name); default: "
                        "--learning_rate.")
    g.add_argument("--center_crop", action="store_true",
                   help="Center crop to the resolution (default: random crop) after resizing the shorter side.")
    g.add_argument("--export_merged", type=str, default=None, metavar="DIR",
                   help="Also write a stock diffusers pipeline folder with the adapter merged into the UNet.")
    export.add_export_args(g)
    arguments.add_adapter_args(parser)
    arguments.add_training_args(parser, task="dreambooth")
    arguments.add_checkpoint_args(parser)
    g = arguments.add_validation_args(parser)
    g.add_argument("--validation_epochs", type=int, default=None,
                   help="Also sample a validation grid at the end of every X-th epoch, counted as diffusers' "
                        "train_dreambooth_lora.py does: after the first epoch, then every X (default: none, grids "
                        "every --validation_steps; diffusers' default 50 draws one every 50 steps where an epoch is "
                        "one step, as with 5 photos at batch 8).")
    arguments.add_logging_args(parser)
    return parser


def parse_args(argv=None):
    args = arguments.parse_args(make_parser(), argv)

    arguments.check_common_args(args, required=("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt"))
    checks.at_least(args, 1, "validation_epochs")
    arguments.finish_learning_rate(args, task="dreambooth")
    check_text_encoder_args(args)
    export.check_export_args(args)
    if args.with_prior_preservation:
        if not args.class_prompt:
            raise UserError("--with_prior_preservation needs --class_prompt (the prompt of the class images)")
        checks.at_least(args, 1, "num_class_images", "sample_batch_size", "class_inference_steps")
        checks.not_negative(args, "prior_loss_weight")
        check_output_folder(args.class_data_dir, "--class_data_dir")
        args.class_data_dir = args.class_data_dir or str(Path(args.output_dir, "class-images"))
    elif args.class_data_dir or args.class_prompt:
        logger.warning("--class_data_dir / --class_prompt are only used with --with_prior_preservation")
    return args


def check_text_encoder_args(args):
    """--text_encoder_lr and --pre_compute_text_embeddings against --train_text_encoder; the text encoder's
    learning rate defaults to --learning_rate."""
    if not args.train_text_encoder:
        if args.text_encoder_lr is not None:
            raise UserError("--text_encoder_lr is the learning rate of --train_text_encoder: add that flag, or leave "
                            "--text_encoder_lr out")
        return
    if args.pre_compute_text_embeddings:
        raise UserError("--pre_compute_text_embeddings encodes the prompts once with a frozen text encoder: not with "
                        "--train_text_encoder (diffusers refuses the pair too)")
    checks.positive(args, "text_encoder_lr")
    if args.text_encoder_lr is None:
        args.text_encoder_lr = args.learning_rate


def prepare_class_images(args, accelerator, model_path) -> list[Path]:
    """Generate the missing class images with the base model (a separate pipeline, freed afterwards)."""
    if args.prior_generation_precision not in (None, "no"):
        dtype = TORCH_DTYPES[args.prior_generation_precision]
    else:
        dtype = torch.float16 if accelerator.device.type == "cuda" else torch.float32

    def load_base_pipeline():
        return load_pipeline(model_path, device=accelerator.device, torch_dtype=dtype)

    dreambooth_data.generate_class_images(
        load_base_pipeline, args.class_data_dir, args.class_prompt, args.num_class_images,
        sample_batch_size=args.sample_batch_size, num_inference_steps=args.class_inference_steps,
        resolution=args.resolution, seed=args.seed or 0, accelerator=accelerator)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    class_images = dreambooth_data.class_images(args.class_data_dir, args.num_class_images)
    dreambooth_data.check_images(class_images)
    return class_images


def main(argv=None):
    args = parse_args(argv)
    training.setup_logging()
    training.log_method(args)

    # Everything that can be wrong with the input fails here, before a model is loaded.
    instance_dir = resolve_instance_dir(args.instance_data_dir, args.output_dir)
    instance_images = dreambooth_data.list_images(instance_dir, what="instance")
    dreambooth_data.check_images(instance_images)
    if args.with_prior_preservation:
        dreambooth_data.check_class_dir(args.class_data_dir, instance_dir)
    adapter_config = arguments.adapter_config_from_args(args)
    model_path = resolve_model_path(args.pretrained_model_name_or_path)  # a built-in one built (a cache to write)

    accelerator = training.setup_accelerator(args)
    # The output folder is this run's alone (locked), and a checkpoint in it is resumed only if it is this run's.
    settings = checkpoints.run_settings(accelerator, args, dataset_size=len(instance_images))
    resume_from = run_folder.claim(accelerator, args, adapter_config, settings,
                                   inputs=(instance_dir, args.class_data_dir))
    repo_id = processes.on_main(accelerator, lambda: hub.create_hub_repo(args)) if args.push_to_hub else None
    # Models: frozen; the adapter must fit the UNet before class images are generated.
    tokenizer, text_encoder, vae, unet, noise_scheduler = training.load_models(args, model_path, adapter_config)

    class_images = prepare_class_images(args, accelerator, model_path) if args.with_prior_preservation else None

    # Frozen weights in the mixed-precision dtype; the adapter is injected afterwards, so it stays float32.
    weight_dtype = training.inject_for_training(accelerator, args, adapter_config, text_encoder, vae, unet)

    def encode_prompts():
        """(instance prompt's embeddings, class prompt's or None), in one text-encoder call (one DDP forward)."""
        prior = args.with_prior_preservation
        prompts = [args.instance_prompt, args.class_prompt] if prior else [args.instance_prompt]
        embeds = training.encode_prompt(tokenizer, text_encoder, prompts, accelerator.device)
        return embeds[:1], embeds[1:] if prior else None

    # The two prompts never change: encode them once, unless the text encoder trains (then in every step).
    fixed_embeds = None if args.train_text_encoder else encode_prompts()

    if args.scale_lr:
        scale = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate *= scale
        if args.train_text_encoder:
            args.text_encoder_lr *= scale
    param_groups = [training.adapter_param_group(unet, adapter_config, args)]
    if args.train_text_encoder:
        param_groups.append({**training.adapter_param_group(text_encoder, adapter_config, args),
                             "lr": args.text_encoder_lr})
    optimizer = training.make_optimizer(args, param_groups)

    dataset = dreambooth_data.SubjectDataset(instance_images, class_images, size=args.resolution,
                                             center_crop=args.center_crop)
    unet, optimizer, train_dataloader, sampler, lr_scheduler, steps_per_epoch = training.prepare_training(
        accelerator, args, unet, optimizer, dataset, collate_fn=dreambooth_data.collate_fn(args.with_prior_preservation))
    # The text encoder with a trained adapter is a model of the run too (DDP syncs its gradients); None if frozen.
    trained_text_encoder = None
    if args.train_text_encoder:
        text_encoder = trained_text_encoder = accelerator.prepare(text_encoder)

    # Resume: adapter, optimizer, scheduler, RNG; the data order is a function of (seed, epoch).
    global_step, train_log = training.start_run(accelerator, args, "dreambooth", resume_from, unet, optimizer,
                                                lr_scheduler, sampler, adapter_config, text_encoder=trained_text_encoder)
    adapter_metadata = {"instance_prompt": args.instance_prompt, "class_prompt": args.class_prompt or "",
                        "base_model": args.pretrained_model_name_or_path, "resolution": args.resolution}

    def validate(step, prompts, **kw):
        def draw(pipe):
            return sample_grid(pipe, prompts, args.num_validation_images, seed=args.seed or 0,
                               num_inference_steps=args.validation_inference_steps,
                               height=args.resolution, width=args.resolution)[0]

        models = (tokenizer, text_encoder, vae, unet, noise_scheduler)
        return training.validation_grid(accelerator, args, models, draw, step, **kw)

    def compute_loss(batch):
        latents = training.encode_latents(vae, batch["pixel_values"], weight_dtype)
        n = batch["num_instance"]
        instance_embeds, class_embeds = fixed_embeds or encode_prompts()
        embeds = instance_embeds.expand(n, -1, -1)
        if args.with_prior_preservation:
            embeds = torch.cat([embeds, class_embeds.expand(n, -1, -1)])
        noisy_latents, timesteps, target = training.noisy_latents_and_target(noise_scheduler, latents, args.noise_offset)
        model_pred = unet(noisy_latents, timesteps, embeds).sample
        if not args.with_prior_preservation:
            return training.diffusion_loss(noise_scheduler, model_pred, target, timesteps, args.snr_gamma,
                                           args.x0_loss_max_weight)
        # instances first, class images second (see dreambooth_data.collate_fn); as in diffusers, a loss weighting
        # (--snr_gamma, --x0_loss_max_weight) weights the instance loss only
        model_pred, model_pred_prior = model_pred.chunk(2)
        target, target_prior = target.chunk(2)
        loss = training.diffusion_loss(noise_scheduler, model_pred, target, timesteps[:n], args.snr_gamma,
                                       args.x0_loss_max_weight)
        return loss + args.prior_loss_weight * F.mse_loss(model_pred_prior.float(), target_prior.float())

    parameter_counts = {"Trainable adapter parameters": count_adapter_parameters(accelerator.unwrap_model(unet))}
    if trained_text_encoder is not None:
        parameter_counts["Trainable text-encoder adapter parameters"] = count_adapter_parameters(
            accelerator.unwrap_model(trained_text_encoder))
    training.log_run_start(args, len(dataset), len(train_dataloader), parameter_counts)
    global_step, last_validation = training.train_loop(
        accelerator, args, unet, optimizer, lr_scheduler, train_dataloader, sampler, compute_loss,
        global_step=global_step, steps_per_epoch=steps_per_epoch, settings=settings, train_log=train_log,
        adapter_metadata=adapter_metadata,
        validate=(lambda step: validate(step, args.validation_prompt)) if args.validation_prompt else None,
        validation_epochs=args.validation_epochs, text_encoder=trained_text_encoder)

    # The adapter, a final grid and (optionally) a merged pipeline: the main process writes them, and a
    # failure (a full disk) stops every process with its line.
    def save_outputs():
        adapter_file = training.save_final_adapter(accelerator, unet, args.output_dir, adapter_metadata, global_step,
                                                   text_encoder=trained_text_encoder)
        final = training.save_final_grid(
            args.output_dir, global_step, last_validation,
            lambda step, **kw: validate(step, args.validation_prompt or [args.instance_prompt], **kw))
        written = export.finish_run(args.output_dir, adapter_file, args.export_lora, final)
        accelerator.print(f"wrote {adapter_file}, {final} and {', '.join(map(str, written))}")
        if args.export_merged:
            with writing(args.export_merged):
                export.export_merged(adapter_file, args.export_merged)
            accelerator.print(f"wrote a merged diffusers pipeline to {args.export_merged}")

    training.finish_run(accelerator, args, save_outputs, repo_id)


if __name__ == "__main__":
    run_cli(main)
