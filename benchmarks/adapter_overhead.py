"""Forward+backward cost of each adapter, measured side by side in one run, and whether issue 13's goal is met.

For every layer shape, all variants are timed interleaved (round-robin, so drift in machine load hits
them alike). Each table prints a variant's median time and its ratio to the frozen layer and to PEFT's
LoRA r=4: the median over rounds of (variant / LoRA) measured in the same round, which a busy machine moves
less than a ratio of medians. "saved for backward" is the bytes autograd keeps for the backward pass
(deduplicated by storage, parameters excluded): a device-independent stand-in for activation memory.

Variants: frozen Linear (input gradient only), LoRA r=4 (PEFT), ETHER and ETHER+ for n in {1, 4, 32},
ETHER+ with `low_memory` (keeps LoRA's activations, `ether.set_low_memory`), OFT n=4 (exact Cayley) and
"dense-H ETHER/ETHER+": the paper's reference implementation, which builds the block-diagonal H each step
and multiplies the weight by it (`analysis.DenseETHERLinear`). Batch 2 (prior preservation) is timed for
the variants the goal names.

    python benchmarks/adapter_overhead.py                          # everything docs/benchmarks.md needs
    python benchmarks/adapter_overhead.py --quick                  # fewer repeats, batch 1, no UNet
    python benchmarks/adapter_overhead.py --threads 1 --cpu-time   # a machine others are using

The last section is a "goal met?" summary per cell: ETHER+ <= 1.05x LoRA, ETHER <= 0.95x LoRA, ETHER+'s
saved-for-backward bytes <= 1.5x LoRA's (with and without `low_memory`).
"""
import argparse
import copy
import datetime
import os
import platform
import statistics
import time

import torch
import torch.nn as nn

from ether_diffusion import AdapterConfig, inject_adapters
from ether_diffusion.adapters import adapter_parameters
from ether_diffusion.adapters.ether import set_low_memory
from ether_diffusion.analysis import use_dense_h

# (name, in, out, tokens): SD-1.5 self-attention projections at the three widths and their token counts at
# 512 px, and the cross-attention key/value projections from the 768-wide text embedding to each width.
LAYER_SHAPES = [
    ("self 320 x4096", 320, 320, 4096),
    ("self 640 x1024", 640, 640, 1024),
    ("self 1280 x256", 1280, 1280, 256),
    ("cross 768->320 x77", 768, 320, 77),
    ("cross 768->640 x77", 768, 640, 77),
    ("cross 768->1280 x77", 768, 1280, 77),
]
NS = (1, 4, 32)
GOAL_PLUS, GOAL_ETHER, GOAL_MEMORY = 1.05, 0.95, 1.5


def wrap(base: nn.Linear, method, n=1, dense_h=False, low_memory=False):
    holder = nn.Module()
    holder.layer = copy.deepcopy(base)
    inject_adapters(holder, AdapterConfig(method=method, n_blocks=n, target_modules=["layer"]))
    if dense_h:
        use_dense_h(holder)
    if low_memory:
        set_low_memory(holder)
    return holder.layer


def variants_for(base: nn.Linear, references: bool):
    """name -> module (wrapping a copy of `base`), in table order; `references` adds OFT and dense H."""
    out = {"frozen": copy.deepcopy(base).requires_grad_(False), "lora r=4": wrap(base, "lora")}
    for n in NS:
        out[f"ether n={n}"] = wrap(base, "ether", n)
        out[f"ether+ n={n}"] = wrap(base, "ether+", n)
        out[f"ether+ low-mem n={n}"] = wrap(base, "ether+", n, low_memory=True)
    if references:
        out["oft n=4"] = wrap(base, "oft", 4)
        for n in (1, 4):
            out[f"dense-H ether n={n}"] = wrap(base, "ether", n, dense_h=True)
            out[f"dense-H ether+ n={n}"] = wrap(base, "ether+", n, dense_h=True)
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


def layer_step(module, x):
    x.grad = None
    y = module(x)
    y.backward(torch.ones_like(y))


def time_interleaved(steps: dict, repeats: int, clock, sync) -> dict:
    """name -> per-round times; every round runs every variant once, in order."""
    times = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            t0 = clock()
            step()
            sync()
            times[name].append(clock() - t0)
    return times


def summarize(times: dict) -> dict:
    """name -> (median seconds, median over rounds of the ratio to LoRA, the same to frozen)."""
    def ratio(name, ref):
        return statistics.median(a / b for a, b in zip(times[name], times[ref]))

    return {name: (statistics.median(t), ratio(name, "lora r=4"), ratio(name, "frozen")) for name, t in times.items()}


def print_table(title, stats, mem=None):
    print(f"\n### {title}\n")
    header = "| variant | median ms | x frozen | x LoRA r=4 |" + (" saved for backward MB |" if mem else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, (t, to_lora, to_frozen) in stats.items():
        row = f"| {name} | {t * 1e3:.2f} | {to_frozen:.2f} | {to_lora:.2f} |"
        if mem:
            row += f" {mem[name] / 2**20:.1f} |"
        print(row)


def mid_size_unet():
    """An SD-shaped UNet at a third of SD's width (attention at 128/256/384), small enough for a CPU."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=32, block_out_channels=(128, 256, 384), layers_per_block=1, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    )


def bench_unet(repeats, device, clock, sync):
    base = mid_size_unet().to(device)
    x = torch.randn(1, 4, 32, 32, device=device)
    t = torch.tensor([500], device=device)
    c = torch.randn(1, 77, 768, device=device)
    configs = [("frozen", None), ("lora r=4", AdapterConfig(method="lora"))]
    for n in NS:
        configs += [(f"ether n={n}", AdapterConfig(method="ether", n_blocks=n)),
                    (f"ether+ n={n}", AdapterConfig(method="ether+", n_blocks=n)),
                    (f"ether+ low-mem n={n}", AdapterConfig(method="ether+", n_blocks=n))]
    configs.append(("oft n=4", AdapterConfig(method="oft", n_blocks=4)))

    def unet_step(unet):
        xi = x.clone().requires_grad_(not any(p.requires_grad for p in unet.parameters()))
        unet(xi, t, c).sample.pow(2).mean().backward()
        for p in adapter_parameters(unet) if hasattr(unet, "ether_adapter_config") else []:
            p.grad = None

    steps = {}
    for name, cfg in configs:
        unet = copy.deepcopy(base)
        if cfg is None:
            unet.requires_grad_(False)
        else:
            inject_adapters(unet, cfg)
            if "low-mem" in name:
                set_low_memory(unet)
        steps[name] = lambda unet=unet: unet_step(unet)
    return summarize(time_interleaved(steps, repeats, clock, sync))


def goal_summary(cells: dict, unet: dict | None):
    """cells: (shape, batch) -> (stats, mem). One line per cell: the goal's ratios for n = 1, 4, 32."""
    print("\n### Goal met? (issue 13: ETHER+ <= 1.05x LoRA, ETHER <= 0.95x LoRA, ETHER+ memory <= 1.5x LoRA)\n")
    print("| cell | " + " | ".join(f"ETHER+ n={n}" for n in NS) + " | " + " | ".join(f"ETHER n={n}" for n in NS)
          + " | ETHER+ memory (low-mem) |")
    print("|" + "---|" * (2 * len(NS) + 2))

    def mark(value, goal):
        return f"{value:.2f} {'yes' if value <= goal else 'NO'}"

    misses = 0
    rows = list(cells.items()) + ([(("UNet step", 1), (unet, None))] if unet else [])
    for (shape, batch), (stats, mem) in rows:
        plus = [stats[f"ether+ n={n}"][1] for n in NS]
        ether = [stats[f"ether n={n}"][1] for n in NS]
        misses += sum(v > GOAL_PLUS for v in plus) + sum(v > GOAL_ETHER for v in ether)
        memory = "-"
        if mem:
            worst = max(mem[f"ether+ n={n}"] for n in NS) / mem["lora r=4"]
            worst_low = max(mem[f"ether+ low-mem n={n}"] for n in NS) / mem["lora r=4"]
            memory = f"{mark(worst, GOAL_MEMORY)} ({mark(worst_low, GOAL_MEMORY)})"
        cell = shape if batch == 1 else f"{shape}, batch {batch}"
        print(f"| {cell} | " + " | ".join(mark(v, GOAL_PLUS) for v in plus) + " | "
              + " | ".join(mark(v, GOAL_ETHER) for v in ether) + f" | {memory} |")
    print(f"\n{misses} time cell(s) miss the goal. ETHER+ low-mem time vs LoRA:")
    for (shape, batch), (stats, _) in rows:
        cell = shape if batch == 1 else f"{shape}, batch {batch}"
        print(f"- {cell}: " + ", ".join(f"n={n} {stats[f'ether+ low-mem n={n}'][1]:.2f}" for n in NS))


def machine_line(threads, repeats, clock_name):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{datetime.date.today()}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads, "
            f"median of {repeats}, clock: {clock_name}, load average {load}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--quick", action="store_true", help="7 repeats, batch 1 only, no references, no UNet")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time the main thread's CPU time instead of wall time (a busy machine; needs --threads 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time and torch.get_num_threads() != 1:
        ap.error("--cpu-time measures one thread: use it with --threads 1")
    repeats = 7 if args.quick else args.repeats
    device = torch.device(args.device)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(machine_line(torch.get_num_threads(), repeats, "thread CPU time" if args.cpu_time else "wall"))

    cells, summary = {}, {}
    for batch in (1,) if args.quick else (1, 2):
        for title, d_in, d_out, tokens in LAYER_SHAPES:
            torch.manual_seed(0)
            base = nn.Linear(d_in, d_out).to(device)
            mods = {k: v.to(device) for k, v in variants_for(base, references=batch == 1 and not args.quick).items()}
            x = torch.randn(batch, tokens, d_in, device=device, requires_grad=True)
            mem = {name: saved_bytes(m, x) for name, m in mods.items()}
            stats = summarize(time_interleaved({k: (lambda m=m: layer_step(m, x)) for k, m in mods.items()},
                                               repeats, clock, sync))
            print_table(f"Linear {title} (batch {batch})", stats, mem)
            cells[(title, batch)] = (stats, mem)
            for name, (_, to_lora, _) in stats.items():
                summary.setdefault(name, []).append(to_lora)
    print("\n### Geometric mean over the layer cells, ratio to LoRA r=4\n")
    print("| variant | x LoRA r=4 |\n|---|---|")
    for name, ratios in summary.items():
        print(f"| {name} | {statistics.geometric_mean(ratios):.2f} |")
    unet = None
    if not args.quick:
        unet = bench_unet(max(5, repeats // 3), device, clock, sync)
        print_table("Mid-size SD-shaped UNet (attention 128/256/384, 32x32 latents, 77 text tokens), one training step", unet)
    goal_summary(cells, unet)


if __name__ == "__main__":
    main()
