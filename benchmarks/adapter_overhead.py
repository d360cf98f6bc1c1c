"""Forward+backward cost of each adapter, measured side by side in one run.

For every layer shape, all variants are timed interleaved (round-robin, so drift in machine load hits
them alike) and the table prints each one's median time as a ratio to the frozen layer and to PEFT's
LoRA r=4, plus the activation memory autograd keeps for backward (bytes of saved tensors, deduplicated by
storage; a device-independent stand-in for peak memory, and `torch.cuda.max_memory_allocated` on GPU).

Variants: frozen Linear (input gradient only), LoRA r=4 (PEFT), ETHER and ETHER+ for n in {1, 4, 32},
OFT n=4 (exact Cayley) and "dense-H ETHER/ETHER+": the paper's reference implementation, which builds
the block-diagonal H each step and multiplies the weight by it (`analysis.DenseETHERLinear`).

    python benchmarks/adapter_overhead.py              # SD-1.5 attention shapes + a mid-size UNet
    python benchmarks/adapter_overhead.py --quick      # fewer repeats
"""
import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn

from ether_diffusion import AdapterConfig, inject_adapters
from ether_diffusion.adapters import adapter_parameters
from ether_diffusion.analysis import use_dense_h

# (name, in, out, tokens): SD-1.5 self-attention projections at the three widths and their token counts at
# 512 px, and the cross-attention key/value projections from the 768-wide text embedding.
LAYER_SHAPES = [
    ("self 320 x4096", 320, 320, 4096),
    ("self 640 x1024", 640, 640, 1024),
    ("self 1280 x256", 1280, 1280, 256),
    ("cross 768->320 x77", 768, 320, 77),
    ("cross 768->1280 x77", 768, 1280, 77),
]


def variants_for(base: nn.Linear):
    """name -> module (wrapping a copy of `base`), in table order."""

    def wrap(method, n=1, dense_h=False):
        holder = nn.Module()
        holder.layer = copy.deepcopy(base)
        inject_adapters(holder, AdapterConfig(method=method, n_blocks=n, target_modules=["layer"]))
        if dense_h:
            use_dense_h(holder)
        return holder.layer

    out = {"frozen": copy.deepcopy(base).requires_grad_(False), "lora r=4": wrap("lora")}
    for n in (1, 4, 32):
        if base.in_features % n == 0 and base.out_features % n == 0:
            out[f"ether n={n}"] = wrap("ether", n)
            out[f"ether+ n={n}"] = wrap("ether+", n)
    out["oft n=4"] = wrap("oft", 4)
    for n in (1, 4):
        out[f"dense-H ether n={n}"] = wrap("ether", n, dense_h=True)
        out[f"dense-H ether+ n={n}"] = wrap("ether+", n, dense_h=True)
    return out


def saved_bytes(module, x) -> int:
    """Bytes autograd saves for backward in one forward (deduplicated by storage), parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    return sum(seen.values())


def step(module, x):
    x.grad = None
    y = module(x)
    y.backward(torch.ones_like(y))


def time_interleaved(mods: dict, x, repeats: int, device) -> dict:
    times = {name: [] for name in mods}
    for m in mods.values():  # warm-up
        step(m, x)
    for _ in range(repeats):
        for name, m in mods.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(m, x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def mid_size_unet():
    """An SD-shaped UNet at a third of SD's width (attention at 128/256/384), small enough for a CPU."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=32, block_out_channels=(128, 256, 384), layers_per_block=1, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    )


def bench_unet(repeats, device):
    base = mid_size_unet().to(device)
    x = torch.randn(1, 4, 32, 32, device=device)
    t = torch.tensor([500], device=device)
    c = torch.randn(1, 77, 768, device=device)
    mods = {}
    for name, cfg in [("frozen", None), ("lora r=4", AdapterConfig(method="lora"))] + [
        (f"{m} n={n}", AdapterConfig(method=m, n_blocks=n)) for n in (1, 4, 32) for m in ("ether", "ether+")
    ] + [("oft n=4", AdapterConfig(method="oft", n_blocks=4))]:
        unet = copy.deepcopy(base)
        if cfg is None:
            unet.requires_grad_(False)
        else:
            inject_adapters(unet, cfg)
        mods[name] = unet

    def unet_step(unet):
        xi = x.clone().requires_grad_(not any(p.requires_grad for p in unet.parameters()))
        unet(xi, t, c).sample.pow(2).mean().backward()
        for p in adapter_parameters(unet) if hasattr(unet, "ether_adapter_config") else []:
            p.grad = None

    times = {name: [] for name in mods}
    for m in mods.values():
        unet_step(m)
    for _ in range(repeats):
        for name, m in mods.items():
            t0 = time.perf_counter()
            unet_step(m)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def print_table(title, med, mem=None):
    print(f"\n### {title}\n")
    header = "| variant | median ms | x frozen | x LoRA r=4 |" + (" saved for backward MB |" if mem else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, t in med.items():
        row = f"| {name} | {t * 1e3:.2f} | {t / med['frozen']:.2f} | {t / med['lora r=4']:.2f} |"
        if mem:
            row += f" {mem[name] / 2**20:.1f} |"
        print(row)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="5 repeats, no UNet")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else args.repeats
    device = torch.device(args.device)
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, median of {repeats}")
    summary = {}
    for title, d_in, d_out, tokens in LAYER_SHAPES:
        torch.manual_seed(0)
        base = nn.Linear(d_in, d_out).to(device)
        mods = {k: v.to(device) for k, v in variants_for(base).items()}
        x = torch.randn(1, tokens, d_in, device=device, requires_grad=True)
        mem = {name: saved_bytes(m, x) for name, m in mods.items()}
        med = time_interleaved(mods, x, repeats, device)
        print_table(f"Linear {title} (batch 1)", med, mem)
        for name, t in med.items():
            summary.setdefault(name, []).append(t / med["lora r=4"])
    print("\n### Geometric mean over the layer shapes, ratio to LoRA r=4\n")
    print("| variant | x LoRA r=4 |\n|---|---|")
    for name, ratios in summary.items():
        print(f"| {name} | {statistics.geometric_mean(ratios):.2f} |")
    if not args.quick:
        med = bench_unet(max(3, repeats // 3), device)
        print_table("Mid-size SD-shaped UNet (attention 128/256/384, 32x32 latents, 77 text tokens), one training step", med)


if __name__ == "__main__":
    main()
