"""LoRA (Hu et al., 2021): `W' = W + (alpha / r) B A`, PEFT's own layer. This module is what the method table
needs of it: the PEFT config, and the layer's update in the forms export and analysis read."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def peft_config(cfg):
    from peft import LoraConfig  # PEFT imports transformers: only when a PEFT method is used

    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    return LoraConfig(r=cfg.rank, lora_alpha=alpha, target_modules=cfg.target_modules, init_lora_weights=True)


def is_layer(module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def transforms(module) -> list[torch.Tensor]:
    return []  # additive: no multiplicative transform, so no transformation distance


def merged_weight(module) -> torch.Tensor:
    return module.get_base_layer().weight.float() + module.get_delta_weight("default").float()


def exact_factors(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) in float64 with `W' - W = up @ down`: B scaled, and A."""
    adapter = module.active_adapters[0]
    return module.lora_B[adapter].weight.double() * module.scaling[adapter], module.lora_A[adapter].weight.double()


class PerSample(nn.Module):
    """Several LoRA adapters of one layer (PEFT's layers, adapter "default"), one per sample of a batch
    (`adapter_batch`): `y = x W^T + b + s (x A^T) B^T` with each sample's A, B, s."""

    def __init__(self, layers):
        super().__init__()
        self.register_buffer("down", torch.stack([layer.lora_A["default"].weight.detach().float() for layer in layers]))
        self.register_buffer("up", torch.stack([layer.lora_B["default"].weight.detach().float() * layer.scaling["default"]
                                                for layer in layers]))

    def forward(self, x, base, index):
        y = F.linear(x, base.weight, base.bias)
        return torch.baddbmm(y, torch.bmm(x, self.down[index].to(x.dtype).mT), self.up[index].to(x.dtype).mT)
