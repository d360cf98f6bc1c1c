"""The method table: one entry per finetuning method, and everything that differs between methods is on it.

Adding a method is one entry here plus its module: a wrapper layer subclassing `base.AdapterLinear` (ours), or
a module with `peft_config`, `is_layer`, `transforms`, `merged_weight` and `exact_factors` for a PEFT tuner
(`lora.py`, `hra.py`). Injection, adapter files, the optimizer, the trainers' defaults and flag checks, the
model card, the export, the analysis and the benchmarks read the entry and hold no method names;
tests/test_methods.py runs every entry through train, resume, card, export, merge and analysis.

Learning rates are the paper's (Bini et al., ICML 2024, App. C): DreamBooth ETHER/ETHER+ 6e-3, OFT/Naive
6e-5, LoRA 6e-4; S2I ETHER/ETHER+ 1e-3, OFT/Naive 1e-5. Not in the paper, and our assumptions: HRA gets
LoRA's rates; LoRA and HRA on S2I get 1e-4 (diffusers' LoRA examples' default; the paper found no usable
LoRA setting for S2I).
"""
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch
import torch.nn as nn

from . import hra, lora
from .base import PerSampleBlocks
from .ether import ETHERLinear, PerSampleReflections
from .naive import NaiveLinear
from .oft import OFTLinear

BLOCKS = ("n_blocks",)  # the settings of the block-diagonal methods
RANK = ("rank", "alpha")  # the settings of PEFT's methods
# Each `AdapterConfig` setting and the trainers' argument that sets it.
SETTING_FLAGS = {"n_blocks": "n_blocks", "rank": "rank", "alpha": "lora_alpha"}


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    # The `AdapterConfig` settings the method uses; the first shapes its tensors (so it must match between an
    # adapter file and a model). A setting it does not use is refused when given (`check_settings`).
    settings: tuple[str, ...]
    # The rank of every layer's update W' - W, so an exact LoRA file holds it; None: full rank (merged only).
    update_rank: Callable | None
    # The paper sets weight decay to 0 for ETHER methods: the vectors are normalised in every forward, so
    # decay would only shrink their length (changing nothing but the effective step size).
    weight_decay: bool
    dreambooth_lr: float
    s2i_lr: float
    # Several adapters of one layer, one per sample of a batch (`adapter_batch`): per_sample(layers) -> module
    per_sample: Callable
    wrap: Callable | None = None  # ours: wrap(layer, config) -> module
    peft: ModuleType | None = None  # PEFT's: the method's module (`lora`, `hra`)
    output_blocks: bool = False  # the output side is block-diagonal too (its width must divide by n)
    # How big the adapter is, in the method's own terms ("n = 4 blocks", "rank 4", "8 reflections"): `shape(cfg)`
    shape: Callable = lambda cfg: f"n = {cfg.n_blocks} blocks"

    # What export and analysis read of one adapter layer of this method.
    def transforms(self, layer) -> list[torch.Tensor]:
        """The layer's multiplicative transforms (float64, dense: analysis only); empty for an additive update."""
        return self.peft.transforms(layer) if self.peft else layer.transforms()

    def merged_weight(self, layer) -> torch.Tensor:
        """`W'` in float32, without changing the layer."""
        return self.peft.merged_weight(layer) if self.peft else layer.merged_weight().float()

    def exact_factors(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) in float64 with `W' - W = up @ down` exactly (low-rank methods only)."""
        return self.peft.exact_factors(layer) if self.peft else layer.low_rank_delta(torch.float64)

    def is_layer(self, module) -> bool:
        return self.peft.is_layer(module) if self.peft else getattr(module, "method", None) == self.name


def _ether(plus: bool):
    return lambda layer, cfg: ETHERLinear(layer, cfg.n_blocks, plus=plus)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("ether", "ETHER", BLOCKS, lambda cfg: cfg.n_blocks, weight_decay=False, dreambooth_lr=6e-3, s2i_lr=1e-3,
           per_sample=PerSampleReflections, wrap=_ether(plus=False)),
    # 2n reflection vectors on each side: W' - W has rank <= 4n (`ether.low_rank_delta`)
    Method("ether+", "ETHER+", BLOCKS, lambda cfg: 4 * cfg.n_blocks, weight_decay=False, dreambooth_lr=6e-3,
           s2i_lr=1e-3, per_sample=PerSampleReflections, wrap=_ether(plus=True), output_blocks=True),
    Method("oft", "OFT", BLOCKS, None, weight_decay=True, dreambooth_lr=6e-5, s2i_lr=1e-5,
           per_sample=PerSampleBlocks, wrap=lambda layer, cfg: OFTLinear(layer, cfg.n_blocks)),
    Method("naive", "Naive", BLOCKS, None, weight_decay=True, dreambooth_lr=6e-5, s2i_lr=1e-5,
           per_sample=PerSampleBlocks, wrap=lambda layer, cfg: NaiveLinear(layer, cfg.n_blocks)),
    Method("lora", "LoRA", RANK, lambda cfg: cfg.rank, weight_decay=True, dreambooth_lr=6e-4, s2i_lr=1e-4,
           per_sample=lora.PerSample, peft=lora, shape=lambda cfg: f"rank {cfg.rank}"),
    # r reflections span at most r directions: W' - W has rank <= r (`hra.exact_factors`)
    Method("hra", "HRA", RANK, lambda cfg: cfg.rank, weight_decay=True, dreambooth_lr=6e-4, s2i_lr=1e-4,
           per_sample=hra.PerSample, peft=hra, shape=lambda cfg: f"{cfg.rank} reflections"),
)}


def method_of(module: nn.Module) -> Method:
    """The method of an adapter layer (ours or PEFT's)."""
    for method in METHODS.values():
        if method.is_layer(module):
            return method
    raise TypeError(f"{type(module).__name__} is no adapter layer of a method in METHODS")


def learning_rate_help(task: str) -> str:
    """"ether 6e-3, ether+ 6e-3, ...": the default learning rates of `task` ("dreambooth" or "s2i")."""
    return ", ".join(f"{m.name} {getattr(m, task + '_lr'):g}" for m in METHODS.values())
