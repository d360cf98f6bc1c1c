"""The adapters against float64 dense references, their properties, injection, merging and training."""
import copy
import os
import sys

import pytest
import torch
import torch.nn as nn

import forked
from ether_diffusion import AdapterConfig, inject_adapters, merge_adapters
from ether_diffusion.adapters import (CONTROL_TARGETS, METHODS, adapter_modules, adapter_parameters,
                                      count_adapter_parameters)
from ether_diffusion.tiny_sd import build_sd15_unet
from user_errors import refused

API = "Python API (AdapterConfig/inject_adapters)"

BLOCK_METHODS = ("ether", "ether+", "oft", "naive")


def _randomize_adapter(model, seed=1):
    """Move every adapter away from its init so the reference comparison tests a non-trivial transform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _unit(v):
    return v / v.norm(dim=-1, keepdim=True)


def _dense_reference(wrapper, method):
    """W' (float64) from the adapter's raw parameters, written from the paper's formulas."""
    base = wrapper.base_layer if hasattr(wrapper, "base_layer") else wrapper.get_base_layer()
    w = base.weight.double()
    d_in = w.shape[1]

    def blocks(mats):
        return torch.block_diag(*mats)

    if method == "ether":
        u = _unit(wrapper.ether_u.double())
        h = blocks([torch.eye(len(ui), dtype=torch.float64) - 2 * torch.outer(ui, ui) for ui in u])
        return w @ h
    if method == "ether+":
        def h_plus(u, v):
            u, v = _unit(u.double()), _unit(v.double())
            return blocks([torch.eye(len(a), dtype=torch.float64) - torch.outer(a, a) + torch.outer(b, b) for a, b in zip(u, v)])

        return h_plus(wrapper.ether_u_out, wrapper.ether_v_out) @ w @ h_plus(wrapper.ether_u, wrapper.ether_v)
    if method == "oft":
        mats = []
        for r in wrapper.oft_r.double():
            s = (r - r.T) / 2
            eye = torch.eye(len(r), dtype=torch.float64)
            mats.append((eye + s) @ torch.linalg.inv(eye - s))
        return w @ blocks(mats)
    if method == "naive":
        return w @ blocks(list(wrapper.naive_n.double()))
    if method == "lora":
        a, b = wrapper.lora_A["default"].weight.double(), wrapper.lora_B["default"].weight.double()
        return w + wrapper.scaling["default"] * b @ a
    if method == "hra":
        u = wrapper.hra_u["default"].double()
        h = torch.eye(d_in, dtype=torch.float64)
        for i in range(u.shape[1]):
            ui = u[:, i] / u[:, i].norm()
            h = h @ (torch.eye(d_in, dtype=torch.float64) - 2 * torch.outer(ui, ui))
        return w @ h
    raise AssertionError(method)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.to_q = nn.Linear(16, 24)
        self.to_k = nn.Linear(24, 8)


# n_blocks applies to the block-diagonal methods; PEFT's LoRA and HRA have none, so they run once.
@pytest.mark.parametrize("method,n", [(m, n) for m in BLOCK_METHODS for n in (1, 2, 4)] + [("lora", 1), ("hra", 1)])
def test_layer_matches_dense_float64_reference(method, n):
    model = TwoLayers()
    inject_adapters(model, AdapterConfig(method=method, n_blocks=n, target_modules=["to_q", "to_k"]))
    _randomize_adapter(model)
    for name, wrapper in adapter_modules(model):
        inp = torch.randn(5, 3, 16 if name == "to_q" else 24)
        out = wrapper(inp)
        base = wrapper.base_layer if hasattr(wrapper, "base_layer") else wrapper.get_base_layer()
        ref = inp.double() @ _dense_reference(wrapper, method).T + base.bias.double()
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        assert rel < 1e-5, (method, n, name, rel)


@pytest.mark.parametrize("method,n", [(m, n) for m in ("ether", "ether+") for n in (1, 2, 4)])
def test_low_rank_delta_is_exact_and_has_the_rank_bound(method, n):
    model = TwoLayers()
    inject_adapters(model, AdapterConfig(method=method, n_blocks=n, target_modules=["to_q", "to_k"]))
    _randomize_adapter(model)
    for _, wrapper in adapter_modules(model):
        up, down = wrapper.low_rank_delta()
        rank = n if method == "ether" else 4 * n
        assert up.shape == (wrapper.base_layer.out_features, rank)
        assert down.shape == (rank, wrapper.base_layer.in_features)
        reference = _dense_reference(wrapper, method) - wrapper.base_layer.weight.double()
        assert ((up @ down - reference).norm() / reference.norm()).item() < 1e-12


@pytest.mark.parametrize("n", [1, 2, 4])
def test_ether_is_a_reflection_per_block(n):
    model = TwoLayers()
    inject_adapters(model, AdapterConfig(method="ether", n_blocks=n, target_modules=["to_q"]))
    _randomize_adapter(model)
    h = model.to_q.input_transform()
    k = 16 // n
    eye = torch.eye(16, dtype=torch.float64)
    assert torch.allclose(h @ h.T, eye, atol=1e-12)
    for b in range(n):
        block = (h - eye)[b * k:(b + 1) * k, b * k:(b + 1) * k]
        assert abs(block.norm().item() - 2.0) < 1e-10
    # off-diagonal blocks are zero: the transform is block-diagonal
    assert (h - eye).norm().item() == pytest.approx(2.0 * n ** 0.5, abs=1e-10)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_ether_plus_distance_bounded_by_two(n):
    model = TwoLayers()
    inject_adapters(model, AdapterConfig(method="ether+", n_blocks=n, target_modules=["to_q"]))
    _randomize_adapter(model, seed=n)
    for h in (model.to_q.input_transform(), model.to_q.output_transform()):
        size = h.shape[0] // n
        eye = torch.eye(size, dtype=torch.float64)
        for b in range(n):
            block = h[b * size:(b + 1) * size, b * size:(b + 1) * size]
            dist = (block - eye).norm().item()
            assert 0 < dist <= 2.0


def test_step_zero_matches_base_except_ether(tiny_unet, unet_inputs):
    with torch.no_grad():
        ref = tiny_unet(*unet_inputs).sample
    for method in METHODS:
        unet = copy.deepcopy(tiny_unet)
        inject_adapters(unet, AdapterConfig(method=method, n_blocks=2))
        with torch.no_grad():
            diff = (unet(*unet_inputs).sample - ref).abs().max().item()
        if method == "ether":
            assert diff > 1e-3, "ETHER starts from a random reflection, not the identity"
        else:
            assert diff < 1e-5, (method, diff)


@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_unmerged_and_restores_plain_linear(tiny_unet, unet_inputs, method):
    inject_adapters(tiny_unet, AdapterConfig(method=method, n_blocks=2))
    _randomize_adapter(tiny_unet)
    with torch.no_grad():
        before = tiny_unet(*unet_inputs).sample
        merged = merge_adapters(tiny_unet)
        after = tiny_unet(*unet_inputs).sample
    assert len(merged) == 32
    assert (before - after).abs().max().item() < 1e-4 * before.abs().max().item()
    assert adapter_modules(tiny_unet) == []
    assert type(tiny_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q) is nn.Linear
    assert set(tiny_unet.state_dict()) == set(type(tiny_unet).from_config(tiny_unet.config).state_dict())


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_parameters_train(tiny_unet, unet_inputs, method):
    inject_adapters(tiny_unet, AdapterConfig(method=method, n_blocks=2))
    trainable = {n for n, p in tiny_unet.named_parameters() if p.requires_grad}
    assert trainable and all(("ether_" in n or "oft_r" in n or "naive_n" in n or "lora_" in n or "hra_u" in n) for n in trainable)
    _train_a_few_steps(tiny_unet, unet_inputs, method)
    for name, p in tiny_unet.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


def _train_a_few_steps(unet, inputs, method, steps=3):
    lr = {"naive": 1e-2, "oft": 1e-2}.get(method, 1e-1)
    opt = torch.optim.Adam(adapter_parameters(unet), lr=lr)
    unet.train()
    with torch.no_grad():
        before = unet(*inputs).sample
    for _ in range(steps):
        loss = (unet(*inputs).sample - 1.0).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    with torch.no_grad():
        after = unet(*inputs).sample
    assert (after - before).abs().max().item() > 1e-4, f"{method}: training did not change the output"
    return loss.item()


@pytest.mark.parametrize("method", ["ether", "ether+", "lora"])
def test_trains_with_plain_attention_processor(tiny_unet, unet_inputs, method):
    from diffusers.models.attention_processor import AttnProcessor

    tiny_unet.set_attn_processor(AttnProcessor())
    inject_adapters(tiny_unet, AdapterConfig(method=method))
    _train_a_few_steps(tiny_unet, unet_inputs, method)


@pytest.mark.parametrize("method", ["ether", "ether+", "oft"])
def test_trains_with_gradient_checkpointing(tiny_unet, unet_inputs, method):
    tiny_unet.enable_gradient_checkpointing()
    inject_adapters(tiny_unet, AdapterConfig(method=method, n_blocks=2))
    _train_a_few_steps(tiny_unet, unet_inputs, method)
    assert tiny_unet.is_gradient_checkpointing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_parameters_stay_float32_under_low_precision_base(tiny_unet, unet_inputs, dtype):
    tiny_unet.to(dtype)
    inject_adapters(tiny_unet, AdapterConfig(method="ether+", n_blocks=2))
    _randomize_adapter(tiny_unet)
    params = adapter_parameters(tiny_unet)
    assert all(p.dtype == torch.float32 for p in params)
    x, t, c = unet_inputs
    out = tiny_unet(x.to(dtype), t, c.to(dtype)).sample
    assert out.dtype == dtype
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in params)


@pytest.mark.parametrize("method,n,expected", [(m, n, c) for m, c in (("ether", 99_456), ("ether+", 398_592)) for n in (1, 4, 32)])
def test_sd15_parameter_counts(method, n, expected):
    unet = build_sd15_unet("meta")
    names = inject_adapters(unet, AdapterConfig(method=method, n_blocks=n))
    assert len(names) == 128  # 32 attention modules x q, k, v, out
    assert count_adapter_parameters(unet) == expected


def test_sd15_control_targets_count():
    for method, expected in (("ether", 111_936), ("ether+", 623_232)):
        unet = build_sd15_unet("meta")
        inject_adapters(unet, AdapterConfig(method=method, n_blocks=4, target_modules=list(CONTROL_TARGETS)))
        assert count_adapter_parameters(unet) == expected


@pytest.mark.user_error("an n_blocks that does not divide a layer's width", tool=API)
def test_indivisible_width_names_the_layer(tiny_unet):
    with refused(r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q: input size 32 is not divisible by n_blocks=3"):
        inject_adapters(tiny_unet, AdapterConfig(method="ether", n_blocks=3))
    # nothing was wrapped: the error comes before any change
    assert adapter_modules(tiny_unet) == []


@pytest.mark.user_error("unknown method, n_blocks 0, alpha NaN, no matching target, a conv target, injecting twice",
                        tool=API)
def test_config_and_target_errors(tiny_unet):
    with refused("unknown method 'dora'"):
        AdapterConfig(method="dora")
    with refused("n_blocks must be a positive integer"):
        AdapterConfig(n_blocks=0)
    with refused(r"alpha must be a positive number \(or None: alpha = rank\), got nan"):
        AdapterConfig(method="lora", alpha=float("nan"))
    with refused("no layer of the model matches"):
        inject_adapters(tiny_unet, AdapterConfig(target_modules=["to_nothing"]))
    with refused("not a Linear"):
        inject_adapters(tiny_unet, AdapterConfig(target_modules=["conv_in"]))
    inject_adapters(tiny_unet, AdapterConfig())
    with refused("already has adapters"):
        inject_adapters(tiny_unet, AdapterConfig())


def test_oft_runs_with_several_torch_threads():
    """OFT's Cayley map solves a batch of blocks; on the CPU, after `torch.set_num_threads(2)`, torch 2.14's
    batched solve of blocks of 160 hangs in MKL (pytorch/pytorch#142815). In a child process (a hang must end
    as a failure, not stall the suite): forward and backward finish and give the one-thread result."""
    code = """
import torch, torch.nn as nn
from ether_diffusion import AdapterConfig, inject_adapters
def grads(threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    holder = nn.Module(); holder.layer = nn.Linear(640, 640)
    inject_adapters(holder, AdapterConfig(method="oft", n_blocks=4, target_modules=["layer"]))
    with torch.no_grad():
        holder.layer.oft_r.normal_(0, 0.05)
    holder.layer(torch.randn(2, 16, 640)).square().sum().backward()
    return holder.layer.oft_r.grad
one, two = grads(1), grads(2)
print(float((one - two).abs().max() / one.abs().max()))
"""
    result = forked.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SLASWP" not in result.stdout + result.stderr
    assert float(result.stdout.split()[-1]) < 1e-5


@pytest.mark.user_error("AdapterConfig(target_modules=None) or a non-list", tool="ether_diffusion (Python API)")
def test_adapter_config_reads_none_as_the_default_layers():
    assert AdapterConfig(target_modules=None).target_modules == AdapterConfig().target_modules
    with refused("target_modules must be a list of layer names, got 5"):
        AdapterConfig(target_modules=5)
