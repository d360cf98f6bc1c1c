"""Loading a stock `StableDiffusionPipeline` with an adapter, and sample grids."""
import contextlib
import math

import torch
from PIL import Image

from .adapter_file import load_adapter
from .errors import UserError, first_line
from .tiny_sd import resolve_model_path

# Precision names as the command lines spell them ("no" is accelerate's for full precision).
TORCH_DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def model_load_errors(name: str):
    """A model that cannot be loaded (missing folder, unknown hub id, offline, wrong files) is a one-line
    `UserError` naming it, for every loader (a pipeline here, the trainers' parts in `training`)."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the model {name!r}: {first_line(e)}") from None


def load_pipeline(model: str, adapter=None, device="cpu", torch_dtype=torch.float32, merge: bool = False):
    """A stock diffusers `StableDiffusionPipeline` from a hub id, a folder or `builtin:tiny-sd`, with the
    adapter file (if any) injected into its UNet. `merge=True` folds it into the weights (faster
    sampling, and the pipeline is then plain diffusers: `save_pretrained` writes a normal folder)."""
    from diffusers import StableDiffusionPipeline

    path = resolve_model_path(model)
    with model_load_errors(model):
        pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch_dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    if adapter is not None:
        load_adapter(pipe.unet, adapter)
        if merge:
            from .adapters import merge_adapters

            merge_adapters(pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def image_grid(images, rows: int | None = None, cols: int | None = None) -> Image.Image:
    """Paste equally sized images into a rows x cols grid (row-major)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    if cols is None:
        cols = math.ceil(len(images) / rows) if rows else len(images)
    if rows is None:
        rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB").resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return grid
