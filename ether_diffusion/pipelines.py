"""Loading a stock `StableDiffusionPipeline` with an adapter."""
import contextlib

import torch

from .adapter_file import load_adapter
from .adapters import merge_adapters
from .builtin import resolve_model_path
from .errors import UserError, first_line


@contextlib.contextmanager
def model_load_errors(name: str):
    """A model that cannot be loaded (missing folder, unknown hub id, offline, wrong files) is a one-line
    `UserError` naming it, for every loader (a pipeline here, the trainers' parts in `training`)."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the model {name!r}: {first_line(e)}") from None


def load_pipeline(model: str, adapter=None, device="cpu", torch_dtype=torch.float32, merge: bool = False):
    """A stock diffusers `StableDiffusionPipeline` from a hub id, a folder or a `builtin:` model, with the
    adapter file (if any) injected into its UNet. `merge=True` folds it into the weights (faster
    sampling, and the pipeline is then plain diffusers: `save_pretrained` writes a normal folder)."""
    from diffusers import StableDiffusionPipeline  # diffusers imports in seconds: only when a model loads

    path = resolve_model_path(model)
    with model_load_errors(model):
        pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch_dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    if adapter is not None:
        load_adapter(pipe.unet, adapter)
        if merge:
            merge_adapters(pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
