"""HRA (Yuan et al., 2024): `W' = W P`, P a product of r Householder reflections, PEFT's own layer. This module
is what the method table needs of it: the PEFT config, and the layer's update in the forms export and
analysis read."""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError


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


class PerSample(nn.Module):
    """Several HRA adapters of one layer (PEFT's layers, adapter "default", without Gram-Schmidt as
    `peft_config` configures it), one per sample of a batch (`adapter_batch`): `W' = W R` with
    R = H_0 H_1 ... H_{r-1}, H_i = I - 2 u_i u_i^T (unit u_i), so the input is multiplied by R^T = H_{r-1} ... H_0
    = I + U M U^T, U = [u_0 ... u_{r-1}] and M a small r x r matrix: `x R^T = x + ((x U) M) U^T`, two passes over
    x whatever r is, instead of one per reflection. With more tokens than input features, each sample's
    W R = W + ((W U) M^T) U^T is built instead (what PEFT's layer does, per adapter in the batch) and the GEMM
    runs per sample: the same FLOPs as the shared one, and no pass over x (measured: benchmarks/adapter_batch.py)."""

    def __init__(self, layers):
        super().__init__()
        if any(layer.hra_apply_GS["default"] for layer in layers):
            raise UserError("HRA adapters with Gram-Schmidt (apply_GS) are not supported in one batch")
        rows, cores = [], []
        for layer in layers:
            u = layer.hra_u["default"].detach().double()
            u = u / u.norm(dim=0)  # (in, r), unit columns
            rows.append(u.T.float())
            cores.append(self._core(u).float())
        self.register_buffer("rows", torch.stack(rows))  # (K, r, in)
        self.register_buffer("core", torch.stack(cores))  # (K, r, r)

    @staticmethod
    def _core(u):
        """M, built from I (M = 0) by multiplying I + U M U^T by H_i on the right for i = r-1 down to 0:
        (I + U M U^T)(I - 2 u_i u_i^T) = I + U (M - 2 (e_i + M G e_i) e_i^T) U^T, with G = U^T U."""
        gram, r = u.T @ u, u.shape[1]
        m, eye = torch.zeros(r, r, dtype=u.dtype), torch.eye(r, dtype=u.dtype)
        for i in reversed(range(r)):
            m = m - 2 * torch.outer(eye[i] + m @ gram[:, i], eye[i])
        return m

    def forward(self, x, base, index):
        if x.shape[1] >= base.in_features:
            present, per_sample = index.unique(return_inverse=True)
            u, w = self.rows[present].to(x.dtype), base.weight[None]
            weights = torch.baddbmm(w, torch.bmm(w @ u.mT, self.core[present].to(x.dtype).mT), u)[per_sample]
            y = torch.bmm(x, weights.mT)
            return y if base.bias is None else y.add_(base.bias)
        u = self.rows[index].to(x.dtype)
        x = torch.baddbmm(x, torch.bmm(torch.bmm(x, u.mT), self.core[index].to(x.dtype)), u)
        return F.linear(x, base.weight, base.bias)
