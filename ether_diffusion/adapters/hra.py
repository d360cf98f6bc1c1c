"""HRA (Yuan et al., 2024): `W' = W P`, P a product of r Householder reflections, PEFT's own layer. This module
is what the method table needs of it: the PEFT config, and the layer's update in the forms export and
analysis read."""
import copy

import torch


def peft_config(cfg):
    from peft import HRAConfig  # PEFT imports transformers: only when a PEFT method is used

    return HRAConfig(r=cfg.rank, target_modules=cfg.target_modules, init_weights=True)


def is_layer(module) -> bool:
    from peft.tuners.hra import HRALayer

    return isinstance(module, HRALayer)


def transforms(module) -> list[torch.Tensor]:
    return [module.get_delta_weight("default").double()]  # P itself (in x in), one block


def merged_weight(module) -> torch.Tensor:
    return module.get_base_layer().weight.float() @ module.get_delta_weight("default").float()


def exact_factors(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) in float64 with `W' - W = up @ down`. P - I vanishes on everything orthogonal to the
    reflection vectors, so with Q an orthonormal basis of their span, W' - W = W (P - I) Q Q^T: rank <= r.
    P is PEFT's own product, built here in float64 on a copy."""
    adapter = module.active_adapters[0]
    double = copy.deepcopy(module).double()
    p = double.get_delta_weight(adapter)
    w = double.get_base_layer().weight
    q = torch.linalg.qr(double.hra_u[adapter])[0]
    return (w @ p - w) @ q, q.T
