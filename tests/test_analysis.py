"""Transformation / weight distances, hyperspherical energy and FLOP counts (ether_diffusion.analysis).

A perturbation of the adapter parameters of growing size stands in for a growing learning rate: the
properties the paper's Figures 4 and 7 show must hold at every size.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn

from ether_diffusion import AdapterConfig, inject_adapters
from ether_diffusion import analysis
from ether_diffusion.adapters import adapter_modules

SCALES = (0.01, 0.1, 1.0, 10.0)


def _perturbed(unet, method, scale, n=4, seed=0):
    """A copy of `unet` with `method` injected and every adapter tensor moved by `scale * noise`."""
    unet = copy.deepcopy(unet)
    inject_adapters(unet, AdapterConfig(method=method, n_blocks=n))
    return analysis.perturb_adapters(unet, scale, seed)


@pytest.mark.parametrize("method", ["ether", "ether+", "oft", "naive"])
def test_transformation_distance_per_block_as_perturbation_grows(tiny_unet, method):
    per_block = [analysis.adapter_distances(_perturbed(tiny_unet, method, s))["transform_distance_per_block"]
                 for s in SCALES]
    if method == "ether":  # a reflection is a reflection whatever the step: exactly 2 per block
        assert per_block == pytest.approx([2.0] * len(SCALES), abs=1e-9)
    elif method == "ether+":
        assert all(0 < d <= 2 + 1e-9 for d in per_block)
    else:  # OFT and Naive: unbounded by 2, growing with the step
        assert all(a < b for a, b in zip(per_block, per_block[1:])), per_block
        assert per_block[-1] > 2


def test_distances_match_dense_float64_formulas(tiny_unet):
    unet = _perturbed(tiny_unet, "ether+", 0.5)
    rows = analysis.layer_report(unet, energy=False)
    name, layer = adapter_modules(unet)[0]
    h, h_out = layer.input_transform(), layer.output_transform()
    w = layer.base_layer.weight.double()
    eye_in, eye_out = torch.eye(len(h), dtype=torch.float64), torch.eye(len(h_out), dtype=torch.float64)
    row = rows[0]
    assert row["name"] == name and row["method"] == "ether+" and row["blocks"] == 2 * 4
    both_sides = math.sqrt((h - eye_in).norm().item() ** 2 + (h_out - eye_out).norm().item() ** 2)
    assert row["transform"] == pytest.approx(both_sides, rel=1e-9)
    assert row["transform_per_block"] == pytest.approx(both_sides / math.sqrt(8), rel=1e-9)
    assert row["weight"] == pytest.approx((h_out @ w @ h - w).norm().item(), rel=1e-5)
    # the UNet summary sums the layers
    summary = analysis.adapter_distances(unet)
    assert summary["transform_distance"] == pytest.approx(sum(r["transform"] for r in rows))
    assert summary["weight_distance"] == pytest.approx(sum(r["weight"] for r in rows))
    assert set(summary) == {"transform_distance", "transform_distance_per_block", "weight_distance"}


def test_ether_whole_layer_distance_is_two_sqrt_n(tiny_unet):
    unet = _perturbed(tiny_unet, "ether", 1.0, n=8)
    for row in analysis.layer_report(unet, energy=False):
        assert row["transform"] == pytest.approx(2 * math.sqrt(8), abs=1e-9)


def test_lora_reports_weight_distance_only(tiny_unet):
    unet = _perturbed(tiny_unet, "lora", 0.1)
    summary = analysis.adapter_distances(unet)
    assert set(summary) == {"weight_distance"} and summary["weight_distance"] > 0
    assert all(r["transform"] is None for r in analysis.layer_report(unet, energy=False))


def test_hyperspherical_energy_by_hand():
    # three orthogonal neurons: every pair sqrt(2) apart, 6 ordered pairs; row norms do not matter
    assert analysis.hyperspherical_energy(torch.diag(torch.tensor([1.0, 5.0, 0.2]))) == pytest.approx(6 / math.sqrt(2))
    # two neurons at 60 degrees are 1 apart: energy 2
    w = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    assert analysis.hyperspherical_energy(w) == pytest.approx(2.0)


@pytest.mark.parametrize("method,preserved", [("ether", True), ("oft", True), ("hra", True),
                                              ("ether+", False), ("naive", False)])
def test_hyperspherical_energy_kept_by_orthogonal_transforms_only(tiny_unet, method, preserved):
    for scale in (0.1, 1.0):
        report = analysis.unet_report(_perturbed(tiny_unet, method, scale))
        if preserved:
            assert report["he_relative_change"] < 1e-6, (scale, report)
        else:
            assert report["he_relative_change"] > 1e-4, (scale, report)


# ----------------------------------------------------------------------------------------------- FLOPs
def _sd_attention_layer(method=None, n=1, tokens=4096, width=320, dense=False):
    """One SD-1.5 self-attention projection at 512 px (320 wide, 64x64 tokens) on `meta`, its input
    requiring grad as it does inside the UNet; returns the counted FLOPs of forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        holder = nn.Module()
        holder.to_q = nn.Linear(width, width)
        x = torch.randn(tokens, width, requires_grad=True)
    holder.requires_grad_(False)
    if method:
        inject_adapters(holder, AdapterConfig(method=method, n_blocks=n, target_modules=["to_q"]))
    if dense:
        assert analysis.use_dense_h(holder) == 1
    with FlopCounterMode(display=False) as counter:
        holder.to_q(x).sum().backward()
    return counter.get_total_flops()


def test_dense_h_cost_falls_with_n_and_ether_avoids_the_weight_gradient():
    t, d = 4096, 320
    frozen = _sd_attention_layer()
    dense = {n: _sd_attention_layer("ether", n, dense=True) - frozen for n in (1, 4, 32)}
    ours = {n: _sd_attention_layer("ether", n) - frozen for n in (1, 4, 32)}
    assert dense[1] > dense[4] > dense[32]  # the paper's Table 1: W H costs 2 out in^2 / n
    for n in (1, 4, 32):
        assert dense[n] >= 2 * t * d * d  # dL/dW' = x^T dL/dy: as costly as the layer's forward
        assert ours[n] < dense[n]
    # ours has no weight-sized term: exactly the reflection's 4 t d forward + 8 t d backward, for every n
    assert ours[1] == ours[4] == ours[32] == 12 * t * d


def test_ether_plus_flops_are_the_reflections_for_every_n():
    """SD-1.5's 1280-wide self-attention at 256 tokens (blocks of 1280 / 32 = 40 >= ether.GROUP_WIDTH): the
    frozen layer's count plus the reflections' 8 t (in + out) forward and twice that backward, for every n."""
    t, d = 256, 1280
    frozen = _sd_attention_layer(tokens=t, width=d)
    for n in (1, 4, 32):
        assert _sd_attention_layer("ether+", n, tokens=t, width=d) - frozen == 24 * t * (d + d)


def test_narrow_ether_plus_blocks_are_grouped_at_a_known_flop_cost():
    """320 wide, n = 32: blocks of 10 run as block-diagonal groups of 4 (40 wide), which multiply the
    reflections' FLOPs (not the layer's) by 4: the price of faster kernels, chosen by measurement."""
    from ether_diffusion.adapters import ether

    t, d = 64, 320
    assert ether._Blocks(32, d // 32, 2).group == 4
    assert _sd_attention_layer("ether+", 32, tokens=t) - _sd_attention_layer(tokens=t) == 4 * 24 * t * (d + d)


def test_dense_h_reference_computes_the_same_layer():
    torch.manual_seed(0)
    holder = nn.Module()
    holder.to_q = nn.Linear(16, 24)
    inject_adapters(holder, AdapterConfig(method="ether+", n_blocks=4, target_modules=["to_q"]))
    analysis.perturb_adapters(holder, 0.3)
    x = torch.randn(5, 16)
    expected = holder.to_q(x)
    analysis.use_dense_h(holder)
    assert isinstance(holder.to_q, analysis.DenseETHERLinear)
    torch.testing.assert_close(holder.to_q(x), expected, rtol=1e-5, atol=1e-5)


def test_flop_table_on_tiny_unet(tiny_unet, unet_inputs):
    # On `meta`: FlopCounterMode needs shapes only, so nothing is computed.
    inputs = [t.to("meta") for t in unet_inputs]
    rows = analysis.flop_table(lambda: copy.deepcopy(tiny_unet).to("meta"), inputs, n_values=(1, 32),
                               methods=("ether", "ether+", "ether (dense H)", "lora"))
    by = {(r["method"], r["n"]): r for r in rows}
    assert len(rows) == 3 * 2 + 1 and by[("lora", None)]["essential_reflection_flops"] == 0
    # essential reflection arithmetic does not depend on n; the dense-H step cost falls with n
    assert by[("ether", 1)]["essential_reflection_flops"] == by[("ether", 32)]["essential_reflection_flops"]
    assert by[("ether+", 1)]["essential_reflection_flops"] > by[("ether", 1)]["essential_reflection_flops"] > 0
    assert by[("ether (dense H)", 1)]["flops"] > by[("ether (dense H)", 32)]["flops"]
