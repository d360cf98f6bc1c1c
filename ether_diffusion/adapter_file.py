"""Adapter files: safetensors with the adapter tensors and a metadata header that describes them.

Header keys (all strings, as safetensors requires): `format` ("ether-diffusion-adapter"),
`format_version`, `method`, `n_blocks`, `rank`, `alpha`, `target_modules` (JSON list), `shapes` (JSON
{tensor name: shape}), plus any extra metadata the caller adds (for example the instance prompt).
`load_adapter` checks all of it against the model before touching a weight, and names the mismatch.
"""
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapters import AdapterConfig, adapter_config_of, adapter_state_dict, inject_adapters
from .adapters.methods import METHODS
from .errors import UserError

ADAPTER_FILE = "adapter.safetensors"  # the adapter's name in a training output folder and in a checkpoint
FORMAT = "ether-diffusion-adapter"
FORMAT_VERSION = 1
_RESERVED = ("format", "format_version", "method", "n_blocks", "rank", "alpha", "target_modules", "shapes")


def save_adapter(model: torch.nn.Module, path, extra_metadata: dict | None = None) -> Path:
    """Write the model's adapter tensors (float32) and metadata; atomic (temp file + rename)."""
    cfg = adapter_config_of(model)
    if cfg is None:
        raise UserError("the model has no adapters to save (call inject_adapters first)")
    state = {k: v.detach().float().cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    meta = {k: str(v) for k, v in (extra_metadata or {}).items() if k not in _RESERVED}
    meta.update(
        format=FORMAT,
        format_version=str(FORMAT_VERSION),
        method=cfg.method,
        n_blocks=str(cfg.n_blocks),
        rank=str(cfg.rank),
        alpha=json.dumps(cfg.alpha),
        target_modules=json.dumps(cfg.target_modules),
        shapes=json.dumps({k: list(v.shape) for k, v in state.items()}),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_adapter_metadata(path) -> dict:
    """The header of an adapter file, checked to be ours; `UserError` names the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a bad header
        raise UserError(f"{path} is not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is a safetensors file but not an ether-diffusion adapter (no '{FORMAT}' metadata)")
    if int(meta.get("format_version", "0")) > FORMAT_VERSION:
        raise UserError(f"{path} has adapter format version {meta['format_version']}; this version reads <= {FORMAT_VERSION}")
    return meta


def config_from_metadata(meta: dict) -> AdapterConfig:
    return AdapterConfig(
        method=meta["method"],
        n_blocks=int(meta["n_blocks"]),
        rank=int(meta["rank"]),
        alpha=json.loads(meta["alpha"]),
        target_modules=json.loads(meta["target_modules"]),
    )


def config_difference(have: AdapterConfig, want: AdapterConfig) -> tuple[str, object, object] | None:
    """The first setting in which two adapters differ, as (key, have, want), or None. n_blocks only shapes
    the block-diagonal methods and rank only PEFT's, so each method is compared on what it uses."""
    shape_key = METHODS[have.method].shape_key
    for key in ("method", shape_key, "target_modules"):
        if getattr(have, key) != getattr(want, key):
            return key, getattr(have, key), getattr(want, key)
    return None


def _check_same_config(file_cfg: AdapterConfig, cfg: AdapterConfig, path: Path):
    difference = config_difference(file_cfg, cfg)
    if difference:
        key, got, want = difference
        raise UserError(f"{path}: adapter has {key}={got!r} but the model/config expects {key}={want!r}")


@torch.no_grad()
def load_adapter(model: torch.nn.Module, path, config: AdapterConfig | None = None) -> dict:
    """Inject the file's adapters into `model` (unless it already has the same ones) and load them.

    `config`, if given, is what the caller expects (e.g. the `--method` of a resumed run): any difference
    with the file is an error. Returns the file's metadata.
    """
    path = Path(path)
    meta = read_adapter_metadata(path)
    file_cfg = config_from_metadata(meta)
    if config is not None:
        _check_same_config(file_cfg, config, path)
    present = adapter_config_of(model)
    if present is not None:
        _check_same_config(file_cfg, present, path)
    else:
        try:
            inject_adapters(model, file_cfg)
        except UserError as e:
            raise UserError(f"{path} does not fit this model: {e}") from None

    expected = adapter_state_dict(model)
    shapes = json.loads(meta["shapes"])
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise UserError(f"{path}: tensor {extra[0]} has no layer in this model ({len(extra)} such tensors)")
    if missing:
        raise UserError(f"{path}: no tensor for layer parameter {missing[0]} ({len(missing)} missing)")
    for name, param in expected.items():
        if list(param.shape) != shapes[name]:
            raise UserError(f"{path}: {name} has shape {tuple(shapes[name])} in the file but {tuple(param.shape)} in the model")
    with safe_open(str(path), framework="pt") as f:
        for name, param in expected.items():
            param.copy_(f.get_tensor(name))
    return meta
