"""Loading a stock `StableDiffusionPipeline` with an adapter."""
import contextlib
from pathlib import Path

import torch

from .adapter_batch import load_adapters
from .adapter_file import is_adapter_file, load_adapter, read_safetensors_metadata
from .adapters import adapter_config_of, merge_adapters
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


def load_pipeline(model: str, adapter=None, device="cpu", torch_dtype=torch.float32, merge: bool = False,
                  adapters: dict | None = None):
    """A stock diffusers `StableDiffusionPipeline` from a hub id, a folder or a `builtin:` model, with the
    adapter (an adapter file or a LoRA file exported from one, see `apply_adapter`) on its UNet. `merge=True`
    folds it into the weights (faster sampling, and the pipeline is then plain diffusers: `save_pretrained`
    writes a normal folder). Or `adapters={name: adapter file}`: several, one chosen per prompt in
    `adapter_batch.generate`."""
    from diffusers import StableDiffusionPipeline  # diffusers imports in seconds: only when a model loads

    if adapters is not None and (adapter is not None or merge):
        raise UserError("adapters= loads several adapters, one per sample: not with adapter= or merge=True")
    path = resolve_model_path(model)
    with model_load_errors(model):
        pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch_dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    if adapter is not None:
        apply_adapter(pipe, adapter, merge=merge)
    if adapters is not None:
        load_adapters(pipe.unet, adapters)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def apply_adapter(pipe, path, merge: bool = False) -> str:
    """Put the adapter in `path` on `pipe.unet` (and on `pipe.text_encoder` where the file holds one, trained with
    --train_text_encoder): one of our adapter files, or a LoRA file exported from one
    (`ether_diffusion.export`, kohya or diffusers format; any LoRA file diffusers reads). Both give the same
    UNet and text encoder up to rounding, so the same numbers come out of either. Called again, it replaces the adapter it put
    there before (the evaluator switches adapters between subjects). `merge=True` folds it into the weights.
    Returns "adapter" or "lora", the kind of file."""
    path = Path(path)
    meta = read_safetensors_metadata(path)
    lora_loaded = bool(getattr(pipe.unet, "peft_config", None)) and adapter_config_of(pipe.unet) is None
    if is_adapter_file(meta):
        if lora_loaded:
            raise UserError(f"{path} is an adapter file, but the pipeline holds a LoRA file's adapter: "
                            "load it into a fresh pipeline")
        load_adapter(pipe.unet, path, text_encoder=pipe.text_encoder)
        if merge:
            merge_adapters(pipe.unet)
            if adapter_config_of(pipe.text_encoder) is not None:
                merge_adapters(pipe.text_encoder)
        return "adapter"
    if adapter_config_of(pipe.unet) is not None:
        raise UserError(f"{path} is a LoRA file, but the pipeline holds an adapter file's adapter: "
                        "load it into a fresh pipeline")
    if lora_loaded:
        pipe.unload_lora_weights()
    try:
        pipe.load_lora_weights(str(path))
    except (ValueError, KeyError, RuntimeError) as e:  # what diffusers / PEFT raise for a file they cannot map
        raise UserError(f"{path} is neither an ether-diffusion adapter nor a LoRA file diffusers can load "
                        f"({first_line(e)})") from None
    if merge:  # fused weights stay when the LoRA layers are removed
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return "lora"

