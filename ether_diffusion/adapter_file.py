"""Adapter files: safetensors with the adapter tensors and a metadata header that describes them.

Header keys (all strings, as safetensors requires): `format` ("ether-diffusion-adapter"),
`format_version`, `method`, `n_blocks`, `rank`, `alpha`, `target_modules` (JSON list), `shapes` (JSON
{tensor name: shape}), plus any extra metadata the caller adds (for example the instance prompt).
`load_adapter` checks all of it against the model before touching a weight, and names the mismatch.

The UNet's tensors are named by their parameters in the UNet. A file trained with `--train_text_encoder` also
holds the text encoder's adapter (the same method and settings, on `text_encoder_target_modules`, a JSON list):
its tensors are named by their parameters in the text encoder, under `text_encoder.`.
"""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .adapters import (AdapterConfig, adapter_config_of, adapter_state_dict, inject_adapters, remove_adapters,
                       text_encoder_config)
from .adapters.methods import METHODS
from .errors import UserError, first_line
from .files import atomic_path, check_output_folder

ADAPTER_FILE = "adapter.safetensors"  # the adapter's name in a training output folder and in a checkpoint
FORMAT = "ether-diffusion-adapter"
FORMAT_VERSION = 1
TEXT_ENCODER_PREFIX = "text_encoder."  # the text encoder's tensors in the file
TEXT_ENCODER_TARGETS_KEY = "text_encoder_target_modules"
_RESERVED = ("format", "format_version", "method", "n_blocks", "rank", "alpha", "target_modules", "shapes",
             TEXT_ENCODER_TARGETS_KEY)


def save_adapter(model: torch.nn.Module, path, extra_metadata: dict | None = None,
                 text_encoder: torch.nn.Module | None = None) -> Path:
    """Write the model's adapter tensors (float32) and metadata, and the text encoder's adapter if
    `text_encoder` holds one (`--train_text_encoder`); atomic (temp file + rename), and a failed write
    leaves no temp file behind."""
    cfg = adapter_config_of(model)
    if cfg is None:
        raise UserError("the model has no adapters to save (call inject_adapters first)")
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give the adapter a file name such as {path / ADAPTER_FILE}")
    check_output_folder(path.parent)
    state = adapter_state_dict(model)
    meta = {k: str(v) for k, v in (extra_metadata or {}).items() if k not in _RESERVED}
    text_cfg = adapter_config_of(text_encoder) if text_encoder is not None else None
    if text_cfg is not None:
        state.update({TEXT_ENCODER_PREFIX + k: v for k, v in adapter_state_dict(text_encoder).items()})
        meta[TEXT_ENCODER_TARGETS_KEY] = json.dumps(text_cfg.target_modules)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
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
    try:
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=meta)
    except PermissionError:
        raise UserError(f"cannot write {path}: permission denied") from None
    return path


def read_safetensors_metadata(path) -> dict:
    """The metadata header of any safetensors file (empty if it has none); `UserError` names a missing or
    unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a bad header
        raise UserError(f"{path} is not a safetensors file ({e})") from None


def is_adapter_file(meta: dict) -> bool:
    """Whether a safetensors header (`read_safetensors_metadata`) is one of our adapter files."""
    return meta.get("format") == FORMAT


def check_adapter_or_lora(path):
    """`path` is an adapter file of ours (its header checked now, before a model loads) or another safetensors
    file, such as a LoRA exported from one, which diffusers checks as it loads it."""
    if is_adapter_file(read_safetensors_metadata(path)):
        read_adapter_metadata(path)


def read_adapter_metadata(path) -> dict:
    """The header of an adapter file, checked to be ours and complete (every setting and the tensor shapes
    readable); `UserError` names the file otherwise."""
    path = Path(path)
    meta = read_safetensors_metadata(path)
    if not is_adapter_file(meta):
        raise UserError(f"{path} is a safetensors file but not an ether-diffusion adapter (no '{FORMAT}' metadata)")
    version = _header_value(meta, path, "format_version", int, "an integer")
    if version > FORMAT_VERSION:
        raise UserError(f"{path} has adapter format version {version}; this version reads <= {FORMAT_VERSION}")
    config_from_metadata(meta, path)
    text_encoder_config_from_metadata(meta, path)
    header_shapes(meta, path)
    return meta


def _where(path) -> str:
    return f"{path}: " if path is not None else ""


def _header_value(meta: dict, path, key: str, parse, what: str):
    if key not in meta:
        raise UserError(f"{_where(path)}the adapter header has no {key!r} entry (a damaged file, or not written by "
                        "save_adapter)")
    try:
        return parse(meta[key])
    except ValueError:  # int("two"), bad JSON
        raise UserError(f"{_where(path)}the adapter header has {key}={meta[key]!r}, not {what}") from None


_SETTINGS = {"method": (str, "a method name"), "n_blocks": (int, "an integer"), "rank": (int, "an integer"),
             "alpha": (json.loads, "a JSON number or null"), "target_modules": (json.loads, "a JSON list of layer names")}


def config_from_metadata(meta: dict, path=None) -> AdapterConfig:
    """The adapter's settings from its header; a missing or bad one is a `UserError` naming `path`."""
    values = {key: _header_value(meta, path, key, parse, what) for key, (parse, what) in _SETTINGS.items()}
    try:
        return AdapterConfig(**values)
    except UserError as e:  # AdapterConfig's own checks (an unknown method, alpha=NaN) do not know the file
        raise UserError(f"{_where(path)}adapter header: {e}") from None


def text_encoder_config_from_metadata(meta: dict, path=None) -> AdapterConfig | None:
    """The text encoder's adapter settings (the UNet's, on its own targets), or None if the file has none."""
    if TEXT_ENCODER_TARGETS_KEY not in meta:
        return None
    targets = _header_value(meta, path, TEXT_ENCODER_TARGETS_KEY, json.loads, "a JSON list of layer names")
    try:
        return text_encoder_config(config_from_metadata(meta, path), targets)
    except UserError as e:
        raise UserError(f"{_where(path)}adapter header: {TEXT_ENCODER_TARGETS_KEY}: {e}") from None


def header_shapes(meta: dict, path=None) -> dict[str, list[int]]:
    """{tensor name: shape} from the header."""
    shapes = _header_value(meta, path, "shapes", json.loads, "JSON")
    if not (isinstance(shapes, dict) and all(isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                                             for shape in shapes.values())):
        raise UserError(f"{_where(path)}the adapter header's 'shapes' is not a map of tensor names to shapes")
    return shapes


def config_difference(have: AdapterConfig, want: AdapterConfig) -> tuple[str, object, object] | None:
    """The first setting in which two adapters differ, as (key, have, want), or None. n_blocks only shapes
    the block-diagonal methods and rank only PEFT's, so each method is compared on what it uses; the target
    layers as a set (the order they are named in selects the same layers)."""
    shape_key = METHODS[have.method].settings[0]
    for key in ("method", shape_key):
        if getattr(have, key) != getattr(want, key):
            return key, getattr(have, key), getattr(want, key)
    if set(have.target_modules) != set(want.target_modules):  # which layers, in whatever order they are named
        return "target_modules", have.target_modules, want.target_modules
    return None


def _check_same_config(file_cfg: AdapterConfig, cfg: AdapterConfig, path: Path):
    difference = config_difference(file_cfg, cfg)
    if difference:
        key, got, want = difference
        raise UserError(f"{path}: adapter has {key}={got!r} but the model/config expects {key}={want!r}")


def _inject_or_check(model: torch.nn.Module, file_cfg: AdapterConfig, path: Path, what: str):
    """`model` holds the file's adapter layers: the same ones already, or injected now."""
    present = adapter_config_of(model)
    if present is not None:
        _check_same_config(file_cfg, present, path)
        return
    try:
        inject_adapters(model, file_cfg)
    except UserError as e:
        raise UserError(f"{path} does not fit this {what}: {e}") from None


@torch.no_grad()
def load_adapter(model: torch.nn.Module, path, config: AdapterConfig | None = None,
                 text_encoder: torch.nn.Module | None = None) -> dict:
    """Inject the file's adapters into `model` (unless it already has the same ones) and load them; the
    text encoder's too, into `text_encoder`, when the file holds one (a file without one takes an adapter
    that `text_encoder` holds away, so switching files switches both).

    `config`, if given, is what the caller expects (e.g. the `--method` of a resumed run): any difference
    with the file is an error. Returns the file's metadata.
    """
    path = Path(path)
    meta = read_adapter_metadata(path)
    file_cfg = config_from_metadata(meta, path)
    if config is not None:
        _check_same_config(file_cfg, config, path)
    text_cfg = text_encoder_config_from_metadata(meta, path)
    if text_cfg is not None and text_encoder is None:
        raise UserError(f"{path} holds a text-encoder adapter too: load it with "
                        "load_adapter(pipe.unet, path, text_encoder=pipe.text_encoder) or load_pipeline")
    _inject_or_check(model, file_cfg, path, "model")
    expected = adapter_state_dict(model)
    if text_cfg is not None:
        _inject_or_check(text_encoder, text_cfg, path, "text encoder")
        expected.update({TEXT_ENCODER_PREFIX + k: v for k, v in adapter_state_dict(text_encoder).items()})
    elif text_encoder is not None and adapter_config_of(text_encoder) is not None:
        remove_adapters(text_encoder)

    shapes = header_shapes(meta, path)
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise UserError(f"{path}: tensor {extra[0]} has no layer in this model ({len(extra)} such tensors)")
    if missing:
        raise UserError(f"{path}: no tensor for layer parameter {missing[0]} ({len(missing)} missing)")
    for name, param in expected.items():
        if list(param.shape) != shapes[name]:
            raise UserError(f"{path}: {name} has shape {tuple(shapes[name])} in the file but {tuple(param.shape)} in the model")
    tensors = _read_tensors(path, shapes)
    for name, param in expected.items():  # only once every tensor is known good: no weight from a refused file
        param.copy_(tensors[name])
    return meta


def _read_tensors(path: Path, shapes: dict) -> dict[str, torch.Tensor]:
    """The file's tensors, each checked against its header entry (a different shape would be broadcast into
    the layer by copy_) and for NaN/inf (the mark of a diverged run: it would sample black images)."""
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = set(f.keys())
            unlisted = sorted(stored ^ set(shapes))
            if unlisted:
                name = unlisted[0]
                where = "in the file but not in its header" if name in stored else "in the header but not in the file"
                raise UserError(f"{path}: tensor {name} is {where} (a damaged file, or not written by save_adapter)")
            for name, shape in shapes.items():
                tensor = f.get_tensor(name)
                if list(tensor.shape) != shape:
                    raise UserError(f"{path}: tensor {name} has shape {tuple(tensor.shape)} but its header says {tuple(shape)}")
                not_finite = int((~torch.isfinite(tensor)).sum())
                if not_finite:
                    raise UserError(f"{path}: tensor {name} has {not_finite} NaN/inf values (of {tensor.numel()}): the "
                                    "training that wrote it diverged")
                tensors[name] = tensor
    except SafetensorError as e:  # a truncated file: the header reads, the data does not
        raise UserError(f"{path}: cannot read its tensors ({first_line(e)})") from None
    return tensors
