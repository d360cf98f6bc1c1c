"""The fused ETHER/ETHER+ layer (`ether._ReflectedLinear`, hand-written backward) against float64 references.

Every output and gradient is compared with autograd through the paper's dense transforms in float64, on
each route the backward can take: the output side's input kept or rebuilt from x (`low_memory`), inputs
with and without a gradient, narrow blocks grouped into block-diagonal matrices, a base layer that trains.
Then finite differences, autocast and the memory option (FLOPs: tests/test_analysis.py).
"""
import itertools

import pytest
import torch
import torch.nn as nn

from ether_diffusion import AdapterConfig, inject_adapters
from ether_diffusion.adapters import adapter_modules, ether
from ether_diffusion.adapters.ether import dense_blocks, set_low_memory

# (in, out, n, bias): one matrix (n = 1), several, grouped narrow blocks (4-wide: groups of 8), one group
SHAPES = [(16, 24, 1, True), (48, 32, 4, False), (64, 96, 16, True), (32, 16, 8, True)]
TOKENS = (5, 300)  # few tokens: ETHER+ keeps z; many: it rebuilds z's part from x when n r <= 8


def _layer(method, d_in, d_out, n, bias=True, low_memory=False, seed=0):
    torch.manual_seed(seed)
    holder = nn.Module()
    holder.layer = nn.Linear(d_in, d_out, bias=bias)
    inject_adapters(holder, AdapterConfig(method=method, n_blocks=n, target_modules=["layer"]))
    layer = holder.layer
    layer.low_memory = low_memory
    with torch.no_grad():  # away from the init (v = u), so every term of the gradient matters
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return layer


def _dense_reference(layer, x):
    """(y, leaves) in float64 through the paper's `W' = H~ W H` with dense blocks; leaves are x, the raw
    vectors, W and b as float64 leaf tensors, in the order of `_inputs(layer, x)`."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in _inputs(layer, x)]
    x64, vectors, w, b = leaves[0], leaves[1:-2], leaves[-2], leaves[-1]
    h = torch.block_diag(*dense_blocks(vectors[0], vectors[1] if layer.plus else None))
    w_merged = w @ h
    if layer.plus:
        w_merged = torch.block_diag(*dense_blocks(vectors[2], vectors[3])) @ w_merged
    y = x64 @ w_merged.T
    return (y if b is None else y + b), leaves


def _inputs(layer, x):
    return [x, *layer.vectors(), layer.base_layer.weight, layer.base_layer.bias]


def _relative(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def _check_against_dense(layer, x):
    y = layer(x)
    g = torch.randn_like(y)
    ref, leaves = _dense_reference(layer, x)
    assert _relative(y, ref) < 1e-5
    ours = [t for t in _inputs(layer, x) if t is not None and t.requires_grad]
    theirs = [leaf for t, leaf in zip(_inputs(layer, x), leaves) if t is not None and t.requires_grad]
    for mine, expected in zip(torch.autograd.grad(y, ours, g), torch.autograd.grad(ref, theirs, g.double())):
        assert mine.dtype == torch.float32 and _relative(mine, expected) < 1e-5


def _cases():
    for method, (d_in, d_out, n, bias), tokens, x_grad in itertools.product(("ether", "ether+"), SHAPES, TOKENS, (True, False)):
        for low_memory in (False, True) if method == "ether+" else (False,):
            yield method, d_in, d_out, n, bias, tokens, x_grad, low_memory


@pytest.mark.parametrize("method,d_in,d_out,n,bias,tokens,x_grad,low_memory", list(_cases()))
def test_outputs_and_gradients_match_dense_float64(method, d_in, d_out, n, bias, tokens, x_grad, low_memory):
    layer = _layer(method, d_in, d_out, n, bias, low_memory)
    x = torch.randn(2, tokens, d_in, requires_grad=x_grad)
    _check_against_dense(layer, x)


def test_the_cases_cover_every_route():
    """Each backward route is taken by some case above (the thresholds may move with new measurements)."""
    rebuilt, thin, grouped = set(), set(), set()
    for method, d_in, d_out, n, bias, tokens, x_grad, low_memory in _cases():
        side = ether._Blocks(n, d_in // n, 2 if method == "ether+" else 1)
        grouped.add(side.group > 1)
        if method == "ether+" and not low_memory:
            rebuilt.add(not ether._keep_output_input(n, 2, 2 * tokens, d_in, False))
        if not x_grad:
            thin.add(ether._thin_input_side(side, 2 * tokens, d_in))
    assert rebuilt == thin == grouped == {True, False}


@pytest.mark.parametrize("method,d_in,d_out,n", [("ether", 16, 24, 2), ("ether+", 16, 24, 1), ("ether+", 64, 96, 16)])
def test_a_trainable_base_gets_its_gradients(method, d_in, d_out, n):
    layer = _layer(method, d_in, d_out, n)
    layer.base_layer.requires_grad_(True)
    _check_against_dense(layer, torch.randn(3, 7, d_in, requires_grad=True))


@pytest.mark.parametrize("plus,n,low_memory,tokens", [(False, 2, False, 4), (True, 1, False, 4), (True, 1, False, 40),
                                                      (True, 2, True, 4), (True, 4, False, 4)])
def test_backward_matches_finite_differences(plus, n, low_memory, tokens):
    """gradcheck in float64 on the Function itself, x and the four vectors, base weight and bias included."""
    torch.manual_seed(0)
    d_in, d_out = 8, 12
    x = torch.randn(tokens, d_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d_out, d_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d_out, dtype=torch.float64, requires_grad=True)
    sizes = (d_in, d_in, d_out, d_out) if plus else (d_in,)
    vectors = [torch.randn(n, d // n, dtype=torch.float64, requires_grad=True) for d in sizes]
    sign = torch.tensor([[-1.0], [1.0]], dtype=torch.float64) if plus else None

    def layer(x, w, b, *vectors):
        return ether._ReflectedLinear.apply(x, w, b, 1.0 if plus else -2.0, sign, low_memory, *vectors)

    assert torch.autograd.gradcheck(layer, (x, w, b, *vectors))


@pytest.mark.parametrize("method", ["ether", "ether+"])
def test_autocast_runs_in_its_dtype_and_keeps_float32_gradients(method):
    layer = _layer(method, 32, 48, 4)
    x = torch.randn(3, 10, 32)
    g = torch.randn(3, 10, 48)
    grads = torch.autograd.grad(layer(x), layer.vectors(), g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    low = torch.autograd.grad(y, layer.vectors(), g.bfloat16())
    for mine, full in zip(low, grads):
        assert mine.dtype == torch.float32 and _relative(mine, full.double()) < 5e-2


def _saved_bytes(module, x) -> int:
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


@pytest.mark.parametrize("n", [1, 4])
def test_low_memory_keeps_no_more_activations_than_lora(n):
    """Issue 13: ETHER+'s saved-for-backward bytes at most 1.5x LoRA r=4's with `low_memory`; without it,
    at few tokens, ETHER+ also keeps the output side's input (out wide)."""
    x = torch.randn(1, 200, 128, requires_grad=True)
    lora = _saved_bytes(_layer("lora", 128, 128, 1), x)
    fast = _saved_bytes(_layer("ether+", 128, 128, n), x)
    low = _saved_bytes(_layer("ether+", 128, 128, n, low_memory=True), x)
    assert low <= 1.5 * lora < fast


def test_set_low_memory_switches_every_ether_plus_layer(tiny_unet):
    inject_adapters(tiny_unet, AdapterConfig(method="ether+", n_blocks=2))
    assert set_low_memory(tiny_unet) == 32
    assert all(m.low_memory for _, m in adapter_modules(tiny_unet))
    assert set_low_memory(tiny_unet, False) == 32 and not any(m.low_memory for _, m in adapter_modules(tiny_unet))
