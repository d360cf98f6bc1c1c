"""How far a finetuned UNet moved: transformation distance, weight distance, hyperspherical energy, FLOPs.

Definitions (our `nn.Linear` notation, `W` of shape (out, in), as in `adapters/ether.py`):

- Transformation distance `||T - I||_F`. ETHER, OFT, Naive: `T` is the block-diagonal input-side transform
  (`W' = W T`). ETHER+ transforms both sides (`W' = H~ W H`); its distance counts both:
  `sqrt(||H - I||_F^2 + ||H~ - I||_F^2)`. HRA: `T` is PEFT's `get_delta_weight` (in x in, `W' = W T`, one
  block). LoRA is additive (`W' = W + BA`), not a transform: it has no transformation distance (None).
  `per_block` is the root mean square over the layer's blocks (both sides for ETHER+), `||T - I||_F / sqrt(n)`:
  exactly 2 for ETHER (every block is a reflection), at most 2 for ETHER+, unbounded for OFT and Naive.
- Weight distance `||W' - W||_F`, with `W'` the merged weight.
- Hyperspherical energy (Liu et al. 2018, as OFT uses it): the neurons are the rows of `W` (each output
  neuron's weight vector, dim = in) on the unit sphere, `HE = sum_{i != j} 1 / ||w_i - w_j||` (power s = 1).
  A right-multiplication by an orthogonal `T` (ETHER, OFT, HRA) moves every row by the same rotation or
  reflection, so pairwise distances and HE are unchanged; ETHER+ and Naive change it.

`adapter_distances(unet)` is the cheap summary a trainer logs every few steps; `layer_report` and
`unet_report` add the energies. `step_flops` counts one training step with torch's FlopCounterMode;
`DenseETHERLinear` is the reference that builds H every step and multiplies the weight (the paper's code
path), whose cost falls with n as in the paper's Table 1.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapters import AdapterConfig, adapter_modules, adapter_parameters, base_layer_of, inject_adapters
from .adapters.ether import ETHERLinear, dense_blocks
from .adapters.methods import METHODS, method_of


# ---------------------------------------------------------------------------------------------- per layer
def _base_weight(module) -> torch.Tensor:
    return base_layer_of(module).weight


@torch.no_grad()
def layer_distances(module) -> dict:
    """`transform` (None for LoRA), `transform_per_block`, `blocks`, `weight` for one adapter layer."""
    method = method_of(module)
    mats = method.transforms(module)
    squared = sum(((t - torch.eye(len(t), dtype=t.dtype, device=t.device)).norm() ** 2).item() for t in mats)
    blocks = getattr(module, "n_blocks", 1) * len(mats)
    weight = (method.merged_weight(module) - _base_weight(module).float()).norm().item()
    if not mats:
        return {"transform": None, "transform_per_block": None, "blocks": 0, "weight": weight}
    return {"transform": math.sqrt(squared), "transform_per_block": math.sqrt(squared / blocks),
            "blocks": blocks, "weight": weight}


def hyperspherical_energy(weight: torch.Tensor) -> float:
    """`sum_{i != j} 1 / ||w_i - w_j||` over the unit-normalised rows of `weight` (float64)."""
    w = F.normalize(weight.double(), dim=1)
    # For unit vectors ||a - b||^2 = 2 - 2 a.b: one Gram matrix instead of all pairwise differences.
    dist = (2 - 2 * w @ w.T).clamp_min(0).sqrt()
    off_diagonal = ~torch.eye(len(w), dtype=torch.bool, device=w.device)
    return (1 / dist[off_diagonal]).sum().item()


# ------------------------------------------------------------------------------------------ over a UNet
@torch.no_grad()
def layer_report(unet: nn.Module, energy: bool = True) -> list[dict]:
    """One row per adapter layer: name, method, distances and (energy=True) HE before and after."""
    rows = []
    for name, module in adapter_modules(unet):
        method = method_of(module)
        row = {"name": name, "method": method.name, **layer_distances(module)}
        if energy:
            row["he_before"] = hyperspherical_energy(_base_weight(module))
            row["he_after"] = hyperspherical_energy(method.merged_weight(module))
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict[str, float]:
    """Sums over layers; `transform_per_block` is the RMS over every block of every layer (2 for ETHER)."""
    out = {"weight_distance": sum(r["weight"] for r in rows)}
    with_transform = [r for r in rows if r["transform"] is not None]
    if with_transform:  # LoRA has none: the keys are left out rather than logged as NaN
        out["transform_distance"] = sum(r["transform"] for r in with_transform)
        squared = sum(r["transform"] ** 2 for r in with_transform)
        out["transform_distance_per_block"] = math.sqrt(squared / sum(r["blocks"] for r in with_transform))
    if rows and "he_before" in rows[0]:
        before, after = sum(r["he_before"] for r in rows), sum(r["he_after"] for r in rows)
        out["he_before"], out["he_after"] = before, after
        # Per-layer changes in absolute value, so a rise in one layer cannot cancel a fall in another.
        out["he_relative_change"] = sum(abs(r["he_after"] - r["he_before"]) for r in rows) / before
    return out


def adapter_distances(unet: nn.Module) -> dict[str, float]:
    """What a trainer logs every N steps: `transform_distance` (summed over layers),
    `transform_distance_per_block` (RMS over all blocks: 2 for ETHER) and `weight_distance` (summed);
    LoRA gets `weight_distance` only. Pass the unwrapped model (`accelerator.unwrap_model(unet)`).

    No energies and no gradients: one merged weight and one dense transform per layer, about the cost of
    a forward pass of the adapters (OFT: two Cayley solves per layer). On CPU with the full SD-1.5 UNet
    that is ~10 s, so log it every ~50-100 steps there; with the tiny SD it takes milliseconds."""
    return summarize(layer_report(unet, energy=False))


def unet_report(unet: nn.Module) -> dict[str, float]:
    """`adapter_distances` plus `he_before`, `he_after` and `he_relative_change` (sums over layers)."""
    return summarize(layer_report(unet, energy=True))


@torch.no_grad()
def perturb_adapters(model: nn.Module, scale: float, seed: int = 0) -> nn.Module:
    """Move every adapter tensor by `scale * N(0, 1)` noise: a random transform of growing strength (the
    paper's Figure 3), and a stand-in for a growing learning rate in tests."""
    g = torch.Generator().manual_seed(seed)
    for p in adapter_parameters(model):
        p.add_(scale * torch.randn(p.shape, generator=g).to(p.device))
    return model


# ------------------------------------------------------------------------------------------------- FLOPs
class DenseETHERLinear(ETHERLinear):
    """ETHER/ETHER+ as the paper's code runs it: every step it builds the block-diagonal H and multiplies
    the weight (`W' = H~ W H`, block by block), then a plain linear. Same parameters and outputs as
    `ETHERLinear`; used only to count what that costs. The weight product costs `2 out in^2 / n`, so it
    falls with n, and the weight gradient it needs costs as much as the layer's forward."""

    def forward(self, x):
        n, w, b = self.n_blocks, self.base_layer.weight, self.base_layer.bias
        h = dense_blocks(self.ether_u, self.ether_v if self.plus else None, x.dtype)
        w = torch.einsum("onj,nji->oni", w.unflatten(-1, (n, -1)), h).flatten(-2)  # W H
        if self.plus:
            h_out = dense_blocks(self.ether_u_out, self.ether_v_out, x.dtype)
            w = torch.einsum("nij,njc->nic", h_out, w.unflatten(0, (n, -1))).flatten(0, 1)  # H~ (W H)
        return F.linear(x, w, b)


def use_dense_h(model: nn.Module) -> int:
    """Make every ETHER/ETHER+ layer of `model` run the dense-H forward; returns how many.

    The subclass adds no state, so switching the class keeps the very same module and parameters."""
    swapped = 0
    for _, module in adapter_modules(model):
        if type(module) is ETHERLinear:
            module.__class__ = DenseETHERLinear
            swapped += 1
    return swapped


def essential_reflection_flops(model: nn.Module, run) -> int:
    """Analytic FLOPs a reflection needs in one training step, whatever kernel runs it: per token and
    side, one dot product and one scaled subtraction per block, 4 FLOPs per feature for ETHER's
    `I - 2uu^T`, 8 for ETHER+'s `I - uu^T + vv^T`, independent of n; backward counted as twice forward.

    `run()` performs the step; tokens are read off the ETHER layers' inputs by forward hooks.
    (Our `ETHERLinear` runs this arithmetic as thin matmuls over the n blocks, so FlopCounterMode's count
    of a layer is the frozen layer's plus this number, with three exceptions chosen by measurement in
    `adapters/ether.py`: ETHER+ blocks narrower than `GROUP_WIDTH` run in block-diagonal groups (their
    count times the group size), ETHER+ may rebuild its output side's input with one thin GEMM instead of
    keeping it, and a layer whose input needs no gradient skips the input-gradient GEMM. Checks in
    tests/test_analysis.py and tests/test_ether_function.py.)"""
    counts = []

    def hook(module, args):
        tokens = args[0].shape[:-1].numel()
        d_in, d_out = module.base_layer.in_features, module.base_layer.out_features
        counts.append(8 * tokens * (d_in + d_out) if module.plus else 4 * tokens * d_in)

    handles = [m.register_forward_pre_hook(hook) for _, m in adapter_modules(model) if type(m) is ETHERLinear]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return 3 * sum(counts)


def training_step(unet: nn.Module, inputs) -> None:
    """Forward + backward of a denoising loss, the part of a training step that FLOPs are counted on."""
    latents, timesteps, text = inputs
    loss = unet(latents, timesteps, text).sample.float().pow(2).mean()
    loss.backward()


def step_flops(unet: nn.Module, inputs) -> tuple[int, int]:
    """(FLOPs counted by FlopCounterMode, essential reflection FLOPs) of one training step.

    FlopCounterMode counts matmul-like ops only (mm, bmm, addmm, einsum, convolutions, attention);
    elementwise ops, norms and `linalg.solve` (OFT's Cayley map, k^3 per block) count as zero."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        essential = essential_reflection_flops(unet, lambda: training_step(unet, inputs))
    return counter.get_total_flops(), essential


FLOP_METHODS = ("ether", "ether+", "ether (dense H)", "ether+ (dense H)", *[m for m in METHODS if not m.startswith("ether")])


def flop_table(make_unet, inputs, n_values=(1, 4, 32), methods=FLOP_METHODS, rank: int = 4) -> list[dict]:
    """One row per (method, n): `flops` (counted) and `essential_reflection_flops` of a training step.

    `make_unet` returns a fresh UNet (on `meta` for SD-1.5: shapes are all FlopCounterMode needs). LoRA and
    HRA (rank `rank`) have no n and get one row.
    """
    rows = []
    for label in methods:
        method, dense = label.split(" ")[0], label.endswith("(dense H)")
        for n in (n_values if "n_blocks" in METHODS[method].settings else (None,)):
            unet = make_unet()
            inject_adapters(unet, AdapterConfig(method=method, n_blocks=n or 1, rank=rank))
            if dense:
                use_dense_h(unet)
            counted, essential = step_flops(unet, inputs)
            rows.append({"method": label, "n": n, "flops": counted, "essential_reflection_flops": essential})
    return rows
