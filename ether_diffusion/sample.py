"""Sample grids from a model with an adapter, outside training.

    python -m ether_diffusion.sample --model builtin:tiny-sd --adapter demo-output/adapter.safetensors \\
        --prompt "a photo of qwe toy" --prompt "a photo of qwe toy on the beach" --num_images 4 --grid out.png

One row per prompt, one column per image; column j starts from the same noise in every row, so rows compare
prompts (`grids.sample_grid`, which the DreamBooth trainer's validation grids use too).

Several subjects at once: `--adapter dog=dog.safetensors --adapter cat=cat.safetensors` gives one row per
subject and prompt (dog's prompts first), every subject's images in one batch (`adapter_batch`): each row is
the row `--adapter dog.safetensors` alone writes with the same --seed, and --out_dir numbers the rows on.
"""
from pathlib import Path

import torch

from . import checks
from .adapter_batch import check_batchable
from .adapter_file import check_adapter_or_lora
from .devices import TORCH_DTYPES, check_device, default_device
from .errors import ArgumentParser, UserError, run_cli
from .files import check_image_output, check_output_folder, save_image
from .grids import sample_grid, sample_subject_grid, save_grid
from .pipelines import load_pipeline


def use_dpm_solver(pipe):
    """DPM-Solver++ (multistep): good samples in ~25 steps, built from the model's own scheduler config."""
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m ether_diffusion.sample", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Hub id, diffusers folder or a builtin: model (builtin:tiny-sd).")
    p.add_argument("--adapter", action="append", default=None,
                   help="An adapter .safetensors file, or a LoRA file exported from one (kohya or diffusers format); "
                        "omit to sample the base model. Or NAME=FILE, repeated: several adapter files sampled in one "
                        "batch, one grid row per adapter and prompt.")
    p.add_argument("--prompt", action="append", required=True, help="Prompt (repeat for several rows).")
    p.add_argument("--num_images", type=int, default=4, help="Images per prompt (grid columns).")
    p.add_argument("--grid", default="samples.png", help="Where to write the grid (an image file: .png, .jpg, ...).")
    p.add_argument("--out_dir", default=None, help="Also save every image here as row-col.png.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--resolution", type=int, default=None, help="Image size (default: the model's).")
    p.add_argument("--scheduler", choices=["dpm", "model"], default="dpm",
                   help="dpm: DPM-Solver++ multistep; model: the model folder's own scheduler.")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available).")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="Default: fp16 on cuda, fp32 otherwise.")
    args = p.parse_args(argv)
    checks.at_least(args, 1, "num_images", "num_inference_steps")
    checks.resolution(args, "resolution")
    checks.seed(args, "seed")
    check_image_output(args.grid, "--grid")
    check_output_folder(args.out_dir, "--out_dir")
    args.adapter, args.adapters = named_adapters(args.adapter or [])
    # a missing or damaged file fails before the model loads
    if args.adapter is not None:
        check_adapter_or_lora(args.adapter)
    if args.adapters:
        check_batchable(args.adapters.values())  # several in one batch: adapter files that can share one
    args.device = check_device(args.device) if args.device else default_device()
    return args


def named_adapters(values: list[str]) -> tuple[str | None, dict | None]:
    """--adapter values -> (one adapter file, None) or (None, {name: file}) for NAME=FILE values."""
    if len(values) == 1 and ("=" not in values[0] or Path(values[0]).is_file()):
        return values[0], None
    if not values:
        return None, None
    adapters = {}
    for value in values:
        name, equals, path = value.partition("=")
        if not equals or not name or not path:
            raise UserError(f"--adapter {value}: with several adapters, give each as NAME=FILE (dog=dog.safetensors)")
        if name in adapters:
            raise UserError(f"--adapter {value}: the name {name!r} is given twice")
        adapters[name] = path
    return None, adapters


def quiet_libraries():
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv=None):
    args = parse_args(argv)
    quiet_libraries()
    device = args.device
    dtype = TORCH_DTYPES[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    if args.adapters:
        pipe = load_pipeline(args.model, adapters=args.adapters, device=device, torch_dtype=dtype)
    else:  # merge=True folds the adapter into the weights: sampling then costs what the base model costs.
        pipe = load_pipeline(args.model, adapter=args.adapter, device=device, torch_dtype=dtype, merge=True)
    if args.scheduler == "dpm":
        use_dpm_solver(pipe)
    settings = dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                    height=args.resolution, width=args.resolution)
    if args.adapters:
        grid, rows = sample_subject_grid(pipe, list(args.adapters), args.prompt, args.num_images, args.seed, **settings)
    else:
        grid, rows = sample_grid(pipe, args.prompt, args.num_images, seed=args.seed, **settings)
    save_grid(grid, args.grid)
    if args.out_dir:
        for r, row in enumerate(rows):
            for c, image in enumerate(row):
                save_image(image, Path(args.out_dir, f"{r:02d}-{c:02d}.png"))
    subjects = f"{len(args.adapters)} adapters x " if args.adapters else ""
    print(f"wrote {args.grid} ({subjects}{len(args.prompt)} prompts x {args.num_images} images)")


if __name__ == "__main__":
    run_cli(main)
