"""One API over every method: `AdapterConfig`, `inject_adapters`, `merge_adapters`.

The methods are listed in `methods.METHODS`. ETHER and ETHER+ (`ether.py`), OFT (`oft.py`) and Naive
(`naive.py`) are our own wrapper layers; LoRA and HRA are PEFT's own layers, injected with
`peft.inject_adapter_in_model`. Either way the wrapper keeps the frozen base Linear
and only adapter parameters require grad. We wrap modules rather than replace attention processors, so
every diffusers processor (SDPA, xformers, sliced, plain) that calls `attn.to_q(...)` goes through us.
"""
import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn

from ..errors import UserError
from .base import AdapterLinear
from .methods import METHODS

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
CONTROL_TARGETS = ATTENTION_TARGETS + ("ff.net.0.proj",)
# The CLIP text encoder's attention projections: what diffusers' train_dreambooth_lora.py adapts with
# --train_text_encoder.
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class AdapterConfig:
    method: str = "ether+"
    n_blocks: int = 1  # ETHER, ETHER+, OFT, Naive: block-diagonal transforms with n blocks
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    rank: int = 4  # LoRA rank / number of HRA reflections
    alpha: float | None = None  # LoRA alpha; None means alpha = rank (scale 1)

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.target_modules is None:  # as PEFT's configs read None: the default layers
            self.target_modules = list(ATTENTION_TARGETS)
        if isinstance(self.target_modules, str):
            self.target_modules = [t for t in self.target_modules.split(",") if t]
        if not isinstance(self.target_modules, (list, tuple)):
            raise UserError(f"target_modules must be a list of layer names, got {self.target_modules!r}")
        self.target_modules = list(self.target_modules)
        if not self.target_modules:
            raise UserError("target_modules is empty")
        if not all(isinstance(t, str) for t in self.target_modules):
            raise UserError(f"target_modules must be layer names, got {self.target_modules!r}")
        for name, value in (("n_blocks", self.n_blocks), ("rank", self.rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        alpha = self.alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                  or not math.isfinite(alpha) or alpha <= 0):
            raise UserError(f"alpha must be a positive number (or None: alpha = rank), got {alpha!r}")

    def to_dict(self):
        return asdict(self)


def text_encoder_config(cfg: AdapterConfig, targets=TEXT_ENCODER_TARGETS) -> AdapterConfig:
    """The text encoder's adapter beside the UNet's `cfg`: the same method and settings, on `targets`."""
    return replace(cfg, target_modules=list(targets))


def _matches(name: str, targets) -> bool:
    # PEFT's rule, so one list means the same for our methods and for LoRA/HRA: a target matches a module
    # whose name is the target or ends with "." + target.
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets) -> list[tuple[str, nn.Linear]]:
    found = []
    for name, module in model.named_modules():
        if _matches(name, targets):
            if not isinstance(module, nn.Linear):
                raise UserError(f"target {name} is a {type(module).__name__}, not a Linear layer")
            found.append((name, module))
    if not found:
        raise UserError(f"no layer of the model matches target_modules {list(targets)}")
    return found


def check_divisible(name: str, layer: nn.Linear, cfg: AdapterConfig):
    # Every block-diagonal method splits the input; ETHER+ also reflects the output side.
    n = cfg.n_blocks
    sizes = [("input", layer.in_features)]
    if METHODS[cfg.method].output_blocks:
        sizes.append(("output", layer.out_features))
    for side, size in sizes:
        if size % n:
            raise UserError(f"layer {name}: {side} size {size} is not divisible by n_blocks={n}")


def check_targets(model: nn.Module, cfg: AdapterConfig) -> list[tuple[str, nn.Linear]]:
    """The target layers of `cfg` in `model`, checked to fit (Linear, widths divisible by n): everything
    `inject_adapters` would refuse, found without changing the model. Trainers call it before expensive work."""
    targets = find_targets(model, cfg.target_modules)
    if METHODS[cfg.method].wrap is not None:
        for name, layer in targets:
            check_divisible(name, layer, cfg)
    return targets


def _set_submodule(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def adapter_config_of(model: nn.Module) -> AdapterConfig | None:
    return getattr(model, "ether_adapter_config", None)


def inject_adapters(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Wrap every target Linear of `model` with `cfg.method`; freeze everything else.

    Returns the wrapped module names. Adapter parameters are float32 whatever the model's dtype.
    """
    if adapter_config_of(model) is not None:
        raise UserError("the model already has adapters; merge them (merge_adapters) or load a fresh model")
    targets = check_targets(model, cfg)  # every refusal comes before any change
    model.requires_grad_(False)
    method = METHODS[cfg.method]
    if method.peft is not None:
        from peft import inject_adapter_in_model  # PEFT imports transformers (seconds): only when used

        inject_adapter_in_model(method.peft.peft_config(cfg), model)
    else:
        for name, layer in targets:
            _set_submodule(model, name, method.wrap(layer, cfg))
    model.ether_adapter_config = cfg
    for p in adapter_parameters(model):
        p.data = p.data.float()
        p.requires_grad_(True)
    return [name for name, _ in targets]


def adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer  # see inject_adapters

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (AdapterLinear, BaseTunerLayer))]


def base_layer_of(module: nn.Module) -> nn.Linear:
    """The frozen Linear inside an adapter layer (ours or PEFT's)."""
    return module.base_layer if isinstance(module, AdapterLinear) else module.get_base_layer()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors by their full parameter names (base weights excluded)."""
    state = {}
    for name, module in adapter_modules(model):
        for pname, p in module.named_parameters():
            if not pname.startswith("base_layer."):
                state[f"{name}.{pname}"] = p
    return state


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(adapter_state_dict(model).values())


@torch.no_grad()
def merge_adapters(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight and put the plain Linear back (exact up to rounding).

    Afterwards the model is a stock diffusers model again: `save_pretrained` writes the usual keys and
    plain diffusers loads it.
    """
    for name, module in adapter_modules(model):
        if isinstance(module, AdapterLinear):
            base = module.base_layer
            base.weight.copy_(module.merged_weight().to(base.weight.dtype))
        else:
            module.merge()
    return [name for name, _ in remove_adapters(model)]


def remove_adapters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Put every adapter layer's base Linear back in its place (as it is: merged or not) and forget the
    adapter config. Returns the removed (name, adapter layer) pairs, which still hold their tensors."""
    removed = adapter_modules(model)
    for name, module in removed:
        _set_submodule(model, name, base_layer_of(module))
    for attr in ("ether_adapter_config", "peft_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    return removed


def count_adapter_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in adapter_parameters(model))
