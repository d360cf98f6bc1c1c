"""The method table: one entry per finetuning method, read by everything that differs between methods.

Adding a method is one entry here plus its module (a wrapper subclassing `base.AdapterLinear` with a
`method` attribute, or a PEFT tuner). Injection, adapter files (which setting shapes the tensors), the
optimizer (weight decay), the trainers' default learning rates and help texts, the analysis, the export and
the benchmarks all read it.

Learning rates are the paper's (Bini et al., ICML 2024, App. C): DreamBooth ETHER/ETHER+ 6e-3, OFT/Naive
6e-5, LoRA 6e-4; S2I ETHER/ETHER+ 1e-3, OFT/Naive 1e-5. Not in the paper, and our assumptions: HRA gets
LoRA's rates; LoRA and HRA on S2I get 1e-4 (diffusers' LoRA examples' default; the paper found no usable
LoRA setting for S2I).
"""
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from .ether import ETHERLinear
from .naive import NaiveLinear
from .oft import OFTLinear


@dataclass(frozen=True)
class Method:
    name: str
    # Our own wrapper: wrap(layer, config) -> module; None for PEFT's methods, which `peft_config` builds.
    wrap: Callable | None
    peft_config: Callable | None
    # Which setting shapes the trainable tensors (and so must match between an adapter file and a model).
    shape_key: str
    # The paper sets weight decay to 0 for ETHER methods: the vectors are normalised in every forward, so
    # decay would only shrink their length (changing nothing but the effective step size).
    weight_decay: bool
    dreambooth_lr: float
    s2i_lr: float
    # The update W' - W is low rank (exportable as a LoRA file); otherwise only a merged model can carry it.
    low_rank: bool


def _lora_config(cfg):
    from peft import LoraConfig  # PEFT imports transformers: only when a PEFT method is used

    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    return LoraConfig(r=cfg.rank, lora_alpha=alpha, target_modules=cfg.target_modules, init_lora_weights=True)


def _hra_config(cfg):
    from peft import HRAConfig

    return HRAConfig(r=cfg.rank, target_modules=cfg.target_modules, init_weights=True)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("ether", lambda layer, cfg: ETHERLinear(layer, cfg.n_blocks, plus=False), None, "n_blocks",
           weight_decay=False, dreambooth_lr=6e-3, s2i_lr=1e-3, low_rank=True),
    Method("ether+", lambda layer, cfg: ETHERLinear(layer, cfg.n_blocks, plus=True), None, "n_blocks",
           weight_decay=False, dreambooth_lr=6e-3, s2i_lr=1e-3, low_rank=True),
    Method("oft", lambda layer, cfg: OFTLinear(layer, cfg.n_blocks), None, "n_blocks",
           weight_decay=True, dreambooth_lr=6e-5, s2i_lr=1e-5, low_rank=False),
    Method("naive", lambda layer, cfg: NaiveLinear(layer, cfg.n_blocks), None, "n_blocks",
           weight_decay=True, dreambooth_lr=6e-5, s2i_lr=1e-5, low_rank=False),
    Method("lora", None, _lora_config, "rank", weight_decay=True, dreambooth_lr=6e-4, s2i_lr=1e-4, low_rank=True),
    Method("hra", None, _hra_config, "rank", weight_decay=True, dreambooth_lr=6e-4, s2i_lr=1e-4, low_rank=True),
)}


def method_of(module: nn.Module) -> str:
    """The method of an adapter layer: our wrappers say it (`method`); PEFT's layers by their class."""
    if hasattr(module, "method"):
        return module.method
    return "hra" if hasattr(module, "hra_u") else "lora"


def learning_rate_help(task: str) -> str:
    """"ether 6e-3, ether+ 6e-3, ...": the default learning rates of `task` ("dreambooth" or "s2i")."""
    return ", ".join(f"{m.name} {getattr(m, task + '_lr'):g}" for m in METHODS.values())
