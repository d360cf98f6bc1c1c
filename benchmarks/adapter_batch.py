"""Many adapters in one batch (`ether_diffusion.adapter_batch`), side by side in one run, against one adapter.

1. Layers: the SD-1.5 attention layer shapes (`adapter_overhead.LAYER_SHAPES`), a batch of 8 samples, inference.
   Per method: the method's own layer with one adapter (what a one-adapter pipeline runs), and the per-sample
   layer with 8 different adapters, timed interleaved; "x one" is the median over rounds of their ratio
   (issue 23's goal: <= 1.15). "frozen" (the plain Linear: a merged adapter's cost) is there for scale.
2. A whole `builtin:toy-sd` sampling call, 8 prompts (16 UNet samples with guidance): one adapter in a plain
   diffusers pipeline (unmerged, and merged) against 8 adapters in one batch.
3. The toy world's DreamBooth evaluation generation (`evaluate/dreambooth.py`, its 4 subjects x all the toy
   protocol's prompts (10; the issue's "25" is the real DreamBooth list) x 4 images, 25 steps, 32 px), one
   subject at a time against `--subjects_per_batch 4` (goal: >= 2x faster). `--eval_prompts N` runs N
   prompts per subject, labelled as a reduced run.
4. Memory with K: the peak memory of the tensors a `generate` call allocates (profiler allocation events),
   toy-sd at its 32 px and at 128 px, 4 images per subject, K = 1, 2, 4, 8 subjects in the batch.

    OMP_NUM_THREADS=1 python -m benchmarks.adapter_batch            # everything (about 20 minutes on one core)
    OMP_NUM_THREADS=1 python -m benchmarks.adapter_batch --quick    # fewer rounds, 5 prompts per subject

    OMP_NUM_THREADS=2 python -m benchmarks.adapter_batch --sections 3   # the evaluation on both cores of a
                                                                        # 2-core machine, judged by wall time

Times are CPU time of the one thread (`time.thread_time`), so other work on a shared machine moves them less
than wall time; the evaluation section prints both, and with several threads judges by wall time (run it on
a quiet machine).
"""
import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks.adapter_overhead import LAYER_SHAPES, machine_line, time_interleaved

from ether_diffusion import AdapterConfig, inject_adapters, load_adapter, save_adapter
from ether_diffusion.adapter_file import ADAPTER_FILE
from ether_diffusion.adapter_batch import adapter_batch_of, generate, load_adapters
from ether_diffusion.adapters import adapter_state_dict

BATCH = 8
GOAL_LAYER, GOAL_EVAL = 1.15, 2.0
METHODS = {"ether n=1": AdapterConfig(method="ether"), "ether+ n=1": AdapterConfig(method="ether+"),
           "ether+ n=4": AdapterConfig(method="ether+", n_blocks=4), "lora r=4": AdapterConfig(method="lora"),
           "hra r=4": AdapterConfig(method="hra"), "oft n=4": AdapterConfig(method="oft", n_blocks=4)}
TOY_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def adapter_files(model: nn.Module, cfg: AdapterConfig, count: int, folder: Path) -> dict:
    """`count` adapter files for `model`, each moved away from its start by its own noise (as training would)."""
    files = {}
    for i in range(count):
        adapted = copy.deepcopy(model)
        inject_adapters(adapted, cfg)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in adapter_state_dict(adapted).values():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        files[str(i)] = save_adapter(adapted, folder / f"adapter-{i}.safetensors")
    return files


def holder(layer: nn.Linear) -> nn.Module:
    h = nn.Module()
    h.layer = copy.deepcopy(layer)
    return h


def ratio(times, name, reference):
    return statistics.median(a / b for a, b in zip(times[name], times[reference]))


# ---------------------------------------------------------------------------------------------- 1. layers
@torch.no_grad()
def bench_layers(repeats, folder):
    print(f"\n### 1. SD-1.5 attention layers, a batch of {BATCH} samples, inference (ms; x one = 8 adapters / one)\n")
    print("| layer | frozen | " + " | ".join(f"{m}: one | 8 adapters | x one" for m in METHODS) + " |")
    print("|---|---|" + "---|---|---|" * len(METHODS))
    worst = 0.0
    for name, d_in, d_out, tokens in LAYER_SHAPES:
        torch.manual_seed(0)
        base = holder(nn.Linear(d_in, d_out))
        x = torch.randn(BATCH, tokens, d_in)
        steps, mixed = {"frozen": lambda: base.layer(x)}, []
        for method, cfg in METHODS.items():
            cfg = AdapterConfig(**{**cfg.to_dict(), "target_modules": ["layer"]})
            files = adapter_files(base, cfg, BATCH, folder / f"{name}-{method}".replace(" ", "_"))
            one = holder(base.layer)
            load_adapter(one, files["0"])
            many = holder(base.layer)
            load_adapters(many, files)
            mixed.append(adapter_batch_of(many).route(list(files)))
            steps[f"{method}: one"] = lambda one=one: one.layer(x)
            steps[f"{method}: 8"] = lambda many=many: many.layer(x)
        with contextlib.ExitStack() as routes:
            for route in mixed:
                routes.enter_context(route)
            times = time_interleaved(steps, repeats, time.thread_time, lambda: None)
        cells = []
        for method in METHODS:
            r = ratio(times, f"{method}: 8", f"{method}: one")
            worst = max(worst, r)
            cells.append(f"{statistics.median(times[f'{method}: one']) * 1e3:.1f} | "
                         f"{statistics.median(times[f'{method}: 8']) * 1e3:.1f} | {r:.2f}")
        print(f"| {name} | {statistics.median(times['frozen']) * 1e3:.1f} | " + " | ".join(cells) + " |")
    print(f"\nWorst 8-adapters / one-adapter ratio: {worst:.2f} (goal <= {GOAL_LAYER}: {'met' if worst <= GOAL_LAYER else 'NOT met'})")


# ---------------------------------------------------------------------------------------------- 2. a toy-sd call
def toy_prompts(count):
    return [f"a photo of qwe toy {place}" for place in ("on the beach", "in the snow", "at night", "in the jungle",
                                                          "on a table", "in a city", "on grass", "in the rain")][:count]


def toy_adapter_files(count, folder) -> dict:
    """`count` ETHER+ n=1 adapter files for builtin:toy-sd, on the layers configs/toy trains."""
    from diffusers import UNet2DConditionModel

    from ether_diffusion.builtin import resolve_model_path

    unet = UNet2DConditionModel.from_pretrained(resolve_model_path("builtin:toy-sd"), subfolder="unet")
    return adapter_files(unet, AdapterConfig(method="ether+", target_modules=TOY_TARGETS), count, folder)


def bench_pipeline(repeats, steps_count, files):
    from ether_diffusion.pipelines import load_pipeline

    prompts, seeds = toy_prompts(BATCH), list(range(BATCH))
    one = load_pipeline("builtin:toy-sd", adapter=files["0"])
    merged = load_pipeline("builtin:toy-sd", adapter=files["0"], merge=True)
    many = load_pipeline("builtin:toy-sd", adapters=files)
    settings = dict(num_inference_steps=steps_count, output_type="latent")
    calls = {
        "one adapter (diffusers call)": lambda: one(prompts, generator=torch.Generator().manual_seed(0), **settings),
        "one adapter, merged": lambda: merged(prompts, generator=torch.Generator().manual_seed(0), **settings),
        "8 adapters (adapter_batch.generate)": lambda: generate(many, prompts, list(files), seeds, **settings),
        "one adapter (adapter_batch.generate)": lambda: generate(many, prompts, ["0"] * BATCH, seeds, **settings),
    }
    times = time_interleaved(calls, repeats, time.thread_time, lambda: None)
    print(f"\n### 2. A whole builtin:toy-sd call: {BATCH} prompts, {steps_count} steps, ETHER+ n=1 on {TOY_TARGETS}\n")
    print("| call | median s | x one adapter (diffusers call) |")
    print("|---|---|---|")
    for name in calls:
        print(f"| {name} | {statistics.median(times[name]):.2f} | {ratio(times, name, 'one adapter (diffusers call)'):.2f} |")
    r = ratio(times, "8 adapters (adapter_batch.generate)", "one adapter (diffusers call)")
    print(f"\n8 adapters / one adapter: {r:.2f} (goal <= {GOAL_LAYER}: {'met' if r <= GOAL_LAYER else 'NOT met'})")


# ---------------------------------------------------------------------------------------------- 3. the evaluation
def bench_evaluation(prompts_per_subject, folder):
    from ether_diffusion.toy import world
    from evaluate import dreambooth

    subjects = list(world.SUBJECTS)[:4]
    dataset = world.write_subjects(folder / "subjects", subjects)
    for subject, path in zip(subjects, toy_adapter_files(len(subjects), folder / "eval").values()):
        (folder / "adapters" / subject).mkdir(parents=True, exist_ok=True)
        path.rename(folder / "adapters" / subject / ADAPTER_FILE)
    prompts_per_subject = prompts_per_subject or len(world.PROMPT_TEMPLATES)
    full = prompts_per_subject == len(world.PROMPT_TEMPLATES)
    label = "the whole toy protocol" if full else \
        f"REDUCED: {prompts_per_subject} of the toy protocol's {len(world.PROMPT_TEMPLATES)} prompts per subject"
    print(f"\n### 3. Toy-world evaluation generation, {len(subjects)} subjects x {prompts_per_subject} prompts x 4 "
          f"images, 25 steps ({label})\n")
    print("| run | wall s | CPU s (main thread) | x one at a time (CPU) |")
    print("|---|---|---|---|")
    results = {}
    for k in (1, 4):
        argv = ["--dataset", str(dataset), "--model", "builtin:toy-sd", "--adapters", str(folder / "adapters"),
                "--output_dir", str(folder / f"eval-k{k}"), "--subjects", ",".join(subjects),
                "--prompts", ",".join(map(str, range(prompts_per_subject))), "--images_per_prompt", "4",
                "--num_inference_steps", "25", "--skip_metrics", "--subjects_per_batch", str(k)]
        wall, cpu = time.perf_counter(), time.thread_time()
        with contextlib.redirect_stdout(sys.stderr):  # the evaluator's own lines, out of the table
            dreambooth.main(argv)
        results[k] = (time.perf_counter() - wall, time.thread_time() - cpu)
        name = "one subject at a time" if k == 1 else f"--subjects_per_batch {k}"
        print(f"| {name} | {results[k][0]:.0f} | {results[k][1]:.0f} | {results[1][1] / results[k][1]:.2f} |")
    # One thread: its CPU time (other work on the machine moves it less). Several: wall time on a quiet machine
    # (the main thread's CPU time leaves out the other threads' work).
    threads = torch.get_num_threads()
    clock = "CPU time" if threads == 1 else f"wall time, {threads} threads"
    speedup = results[1][1] / results[4][1] if threads == 1 else results[1][0] / results[4][0]
    print(f"\nSpeed-up of K=4 ({clock}): {speedup:.2f}x; CPU {results[1][1] / results[4][1]:.2f}x, wall "
          f"{results[1][0] / results[4][0]:.2f}x (goal >= {GOAL_EVAL}x: {'met' if speedup >= GOAL_EVAL else 'NOT met'})")


# ---------------------------------------------------------------------------------------------- 4. memory with K
def peak_tensor_bytes(call) -> int:
    """The most bytes of torch tensors alive at once during `call()` beyond those alive before it: the running
    sum of the profiler's allocation and free events (exact for tensors, blind to the Python heap)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def bench_memory(files):
    from ether_diffusion.pipelines import load_pipeline

    many = load_pipeline("builtin:toy-sd", adapters=files)
    stacked = sum(b.numel() * b.element_size() for m in many.unet.modules() if hasattr(m, "adapters")
                  for b in m.adapters.buffers()) / 2**20
    print(f"\n### 4. Peak tensor memory of a whole toy-sd generate call (text encoder, UNet, VAE decode), 4 images "
          f"per subject (MiB; the {len(files)} adapters' stacked tensors: {stacked:.2f} MiB in all)\n")
    print("| K subjects | UNet batch | 32 px (toy-sd's own) | per subject | 128 px | per subject |")
    print("|---|---|---|---|---|---|")
    for k in (1, 2, 4, 8):
        cells = []
        for size in (32, 128):
            peak = peak_tensor_bytes(lambda: generate(many, toy_prompts(k), [str(i) for i in range(k)], list(range(k)),
                                                      num_images_per_prompt=4, num_inference_steps=1,
                                                      height=size, width=size)) / 2**20
            cells += [f"{peak:.1f}", f"{peak / k:.1f}"]
        print(f"| {k} | {2 * 4 * k} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="3 rounds, 10 steps in section 2, 3 prompts per subject")
    ap.add_argument("--eval_prompts", type=int, default=None, help="prompts per subject in section 3 (default: all)")
    ap.add_argument("--sections", default="1,2,3,4")
    args = ap.parse_args()
    repeats = 3 if args.quick else args.repeats
    eval_prompts = args.eval_prompts or (3 if args.quick else None)
    sections = set(args.sections.split(","))
    print(f"# adapter_batch benchmark\n\n{machine_line(torch.get_num_threads(), repeats, 'thread CPU time')}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "1" in sections:
            bench_layers(repeats, tmp)
        files = toy_adapter_files(BATCH, tmp / "toy")
        if "2" in sections:
            bench_pipeline(repeats, 10 if args.quick else 25, files)
        if "3" in sections:
            bench_evaluation(eval_prompts, tmp)
        if "4" in sections:
            bench_memory(files)


if __name__ == "__main__":
    main()
