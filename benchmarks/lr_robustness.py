"""Learning-rate robustness, hyperspherical energy and random transforms: the paper's Figures 4, 7 and 3,
plus a FLOP table of one SD-1.5 training step (its Table 1). Everything goes to docs/analysis/.

1. Trains ETHER, ETHER+, OFT, Naive and LoRA with the DreamBooth trainer (in-process, `ether_diffusion.trainers.dreambooth.main`)
   at x0.1, x1, x10, x100 of each method's paper learning rate for a fixed number of steps, then measures
   the transformation distance (per block), the weight distance and the hyperspherical-energy change of the
   trained UNet (ether_diffusion.analysis):  lr_distances.png, hyperspherical_energy.png.
2. Samples one image per method from random transforms of growing strength (adapter parameters moved by
   `strength * noise` from their init):  random_transforms.png.
3. Counts the FLOPs of one SD-1.5 training step at 512 px (real architecture on `meta`: shapes only) per
   method and n.
README.md gets the tables.

With `--from_reproduction DIR` it instead reads a learning-rate study made by `evaluate/reproduce.py
--lr_multipliers ...` (e.g. on the toy world, docs/reproduce_toy.md) and plots, per method and multiple, the
outcomes the evaluator measured (DreamBooth: DINO and CLIP-T; S2I: mIoU and accuracy) beside the
transformation and weight distances of the same runs' selected adapters: lr_outcomes_<task>.png and .md.

    python benchmarks/lr_robustness.py --quick     # tiny SD, 32 px, 20 steps: a few minutes on 2 CPU cores
    python benchmarks/lr_robustness.py --from_reproduction outputs/lr-toy/dreambooth   # outcomes + distances
    python benchmarks/lr_robustness.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --resolution 512 --max_train_steps 400 --instance_data_dir data/dreambooth/dog

With the tiny, randomly initialised SD the images mean nothing; the distances and energies are what the
script is for.
"""
import argparse
import copy
import json
import math
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from ether_diffusion import AdapterConfig, analysis, inject_adapters, load_adapter
from ether_diffusion.adapter_file import ADAPTER_FILE
from ether_diffusion.adapters.methods import METHODS as METHOD_TABLE
from ether_diffusion.builtin import resolve_instance_dir, resolve_model_path
from ether_diffusion.errors import UserError, run_cli
from ether_diffusion.pipelines import load_pipeline
from ether_diffusion.tiny_sd import build_sd15_unet

METHODS = tuple(METHOD_TABLE)
LR_MULTIPLIERS = (0.1, 1, 10, 100)
STRENGTHS = (0.0, 0.01, 0.1, 1.0, 10.0)
COLORS = dict(zip(METHOD_TABLE, [f"C{i}" for i in range(10)]))  # one colour per method, in the table's order
OUTCOMES = {"dreambooth": (("dino", "subject fidelity (DINO)"), ("clip_t", "prompt fidelity (CLIP-T)")),
            "s2i": (("miou", "mIoU"), ("accuracy", "pixel accuracy"))}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained_model_name_or_path", default="builtin:tiny-sd")
    p.add_argument("--instance_data_dir", default="builtin:demo-subject")
    p.add_argument("--instance_prompt", default="a photo of qwe toy")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--max_train_steps", type=int, default=200)
    p.add_argument("--n_blocks", type=int, default=4, help="n for ETHER, ETHER+, OFT and Naive (LoRA: rank 4).")
    p.add_argument("--output_dir", default=str(ROOT / "docs" / "analysis"))
    p.add_argument("--work_dir", default=None, help="Where the training runs go (default: a temporary folder).")
    p.add_argument("--device", default="cpu", help="For sampling; training uses accelerate's device.")
    p.add_argument("--quick", action="store_true", help="20 steps, 32 px, fewer sampling steps.")
    p.add_argument("--from_reproduction", default=None, metavar="DIR",
                   help="Plot the outcomes of an `evaluate/reproduce.py --lr_multipliers` folder beside its runs' "
                        "distances (no training here).")
    args = p.parse_args(argv)
    if args.quick:
        args.max_train_steps, args.resolution = 20, 32
    return args


# ------------------------------------------------------------------------------- 1. learning-rate sweep
def train(args, method: str, lr: float, out_dir: Path) -> Path:
    """One DreamBooth run through the real trainer; returns its adapter file."""
    from ether_diffusion.trainers import dreambooth

    dreambooth.main([
        "--pretrained_model_name_or_path", args.pretrained_model_name_or_path,
        "--instance_data_dir", args.instance_data_dir, "--instance_prompt", args.instance_prompt,
        "--output_dir", str(out_dir), "--resolution", str(args.resolution), "--train_batch_size", "1",
        "--max_train_steps", str(args.max_train_steps), "--learning_rate", repr(lr),
        "--method", method, *(["--n_blocks", str(args.n_blocks)] if "n_blocks" in METHOD_TABLE[method].settings else []),
        "--seed", "0",
        "--checkpointing_steps", str(10 ** 9), "--report_to", "none", "--mixed_precision", "no",
        # the trainer always samples a final grid: keep it to one image and few steps
        "--num_validation_images", "1", "--validation_inference_steps", "2",
    ])
    return out_dir / ADAPTER_FILE


def load_unet(model: str):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(resolve_model_path(model), subfolder="unet")


def lr_sweep(args, work_dir: Path) -> list[dict]:
    base = load_unet(args.pretrained_model_name_or_path)
    rows = []
    for method in METHODS:
        for mult in LR_MULTIPLIERS:
            lr = METHOD_TABLE[method].dreambooth_lr * mult
            adapter = train(args, method, lr, work_dir / f"{method}-x{mult:g}")
            unet = copy.deepcopy(base)
            load_adapter(unet, adapter)
            rows.append({"method": method, "multiplier": mult, "lr": lr, **analysis.unet_report(unet)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def outcomes_from_reproduction(folder: Path) -> tuple[str, list[dict]]:
    """One row per variant (method x multiplier) of a reproduction folder: the report's metrics, and the
    distances of its runs' selected adapters (the mean over its subjects)."""
    if not (folder / "report.json").is_file():
        raise UserError(f"{folder}: no report.json: not a finished evaluate/reproduce.py folder (its report is "
                        "written when every run is trained and evaluated)")
    report = json.loads((folder / "report.json").read_text())
    base = load_unet(report["settings"]["models"][0])
    rows = []
    for row in report["ours"]:
        reports = []
        for run in report["runs"]:
            if run["run"].split("/")[0] != row["variant"] or run["status"] != "done":
                continue
            done = json.loads((folder / "runs" / run["run"] / "done.json").read_text())
            adapter = folder / "runs" / run["run"] / done["selected"] / ADAPTER_FILE
            if adapter.is_file():  # S2I's encoder-only runs have none
                unet = copy.deepcopy(base)
                load_adapter(unet, adapter)
                reports.append(analysis.unet_report(unet))
        distances = {k: sum(r[k] for r in reports) / len(reports) for k in (reports[0] if reports else {})}
        rows.append({"method": row["method"], "multiplier": row["lr_multiplier"], "lr": row["learning_rate"],
                     "runs": len(reports), **(row["metrics"] or {}), **distances})
        print(json.dumps(rows[-1]), flush=True)
    return report["task"], rows


def plot_distances(rows, path: Path, outcomes=(), xlabel="learning rate / paper default"):
    """Transformation and weight distance per method over the multiples; `outcomes` (metric, title) add a
    panel each, from the same rows."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 + len(outcomes), figsize=(4.5 * (2 + len(outcomes)), 3.4), dpi=90)
    ax_t, ax_w = axes[:2]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        x = [r["multiplier"] for r in mine]
        if "transform_distance_per_block" in mine[0]:  # LoRA has no transform
            ax_t.plot(x, [r["transform_distance_per_block"] for r in mine], "o-", color=COLORS[method], label=method)
        if "weight_distance" in mine[0]:
            ax_w.plot(x, [r["weight_distance"] for r in mine], "o-", color=COLORS[method], label=method)
        for ax, (metric, _) in zip(axes[2:], outcomes):
            ax.plot(x, [r.get(metric) if r.get(metric) is not None else float("nan") for r in mine], "o-",
                    color=COLORS[method], label=method)
    for ax, (_, title) in zip(axes[2:], outcomes):
        ax.set(xscale="log", xlabel=xlabel, title=title)
    ax_t.axhline(2, color="gray", ls=":", lw=1)
    ax_t.set(xscale="log", yscale="log", xlabel=xlabel,
             ylabel="||T - I||_F per block (RMS)", title="transformation distance")
    ax_w.set(xscale="log", yscale="log", xlabel=xlabel,
             ylabel="sum over layers of ||W' - W||_F", title="weight distance")
    ax_w.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_energy(rows, path: Path, floor: float = 1e-12, rounding: float = 1e-8):
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=90)
    width = 0.8 / len(LR_MULTIPLIERS)
    for i, mult in enumerate(LR_MULTIPLIERS):
        values = [max(next(r for r in rows if r["method"] == m and r["multiplier"] == mult)["he_relative_change"], floor)
                  for m in METHODS]
        ax.bar(np.arange(len(METHODS)) + (i - 1.5) * width, values, width, label=f"lr x{mult:g}")
    # W' is merged in float32: an energy kept exactly shows up as a change of about 1e-10.
    ax.axhline(rounding, color="gray", ls=":", lw=1)
    ax.set(yscale="log", xticks=range(len(METHODS)), xticklabels=METHODS, ylim=(floor / 2, None),
           ylabel="sum |HE' - HE| / sum HE",
           title=f"hyperspherical energy change (below {rounding:g}: float32 rounding)")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------- 2. random transforms
def random_transforms(args, path: Path, steps: int):
    """Rows: the block-diagonal methods (ETHER, ETHER+, OFT, Naive); columns: growing noise on the adapter
    parameters; same seed."""
    import matplotlib.pyplot as plt

    pipe = load_pipeline(args.pretrained_model_name_or_path, device=args.device)
    base = pipe.unet
    methods = [m for m in METHODS if "n_blocks" in METHOD_TABLE[m].settings]
    fig, axes = plt.subplots(len(methods), len(STRENGTHS), figsize=(1.5 * len(STRENGTHS), 1.6 * len(methods)), dpi=80)
    for i, method in enumerate(methods):
        for j, strength in enumerate(STRENGTHS):
            unet = copy.deepcopy(base)
            inject_adapters(unet, AdapterConfig(method=method, n_blocks=args.n_blocks))
            analysis.perturb_adapters(unet, strength, seed=j)
            pipe.unet = unet
            image = pipe(args.instance_prompt, num_inference_steps=steps, height=args.resolution,
                         width=args.resolution, generator=torch.Generator("cpu").manual_seed(0)).images[0]
            distance = analysis.adapter_distances(unet)["transform_distance_per_block"]
            ax = axes[i, j]
            ax.imshow(image)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"s={strength:g}  d={distance:.2f}", fontsize=7)
            if j == 0:
                ax.set_ylabel(method)
    fig.suptitle("random transforms: noise strength s on the parameters, d = ||T - I||_F per block", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- 3. FLOPs
def sd15_flops() -> list[dict]:
    with torch.device("meta"):  # batch 1, 512 px (64 x 64 latents), 77 text tokens
        inputs = (torch.randn(1, 4, 64, 64), torch.tensor([500]), torch.randn(1, 77, 768))
    return analysis.flop_table(lambda: build_sd15_unet("meta"), inputs)


# ------------------------------------------------------------------------------------------- report
def markdown(args, rows, flops) -> str:
    lines = [
        "# Analysis: learning-rate robustness, hyperspherical energy, FLOPs",
        "",
        f"Written by `python benchmarks/lr_robustness.py{' --quick' if args.quick else ''}`: "
        f"model `{args.pretrained_model_name_or_path}`, subject `{args.instance_data_dir}`, "
        f"{args.resolution} px, {args.max_train_steps} steps, batch 1, n = {args.n_blocks} (LoRA rank 4), "
        "paper learning rates ETHER/ETHER+ 6e-3, OFT/Naive 6e-5, LoRA 6e-4 times the multiplier. "
        "Definitions: `ether_diffusion/analysis.py`.",
        "",
        "![distances](lr_distances.png)",
        "![energy](hyperspherical_energy.png)",
        "![random transforms](random_transforms.png)",
        "",
        "| method | lr x | lr | ‖T−I‖_F per block | Σ‖T−I‖_F | Σ‖W′−W‖_F | HE change (rel.) |",
        "|---|---|---|---|---|---|---|",
    ]

    def fmt(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    for r in rows:
        lines.append(f"| {r['method']} | {r['multiplier']:g} | {r['lr']:.0e} | {fmt(r.get('transform_distance_per_block'))} "
                     f"| {fmt(r.get('transform_distance'), '.2f')} | {r['weight_distance']:.3f} "
                     f"| {r['he_relative_change']:.1e} |")
    lines += [
        "",
        "LoRA is additive (`W' = W + BA`): it has no transformation distance. ETHER+ counts both sides, "
        "`sqrt(‖H−I‖² + ‖H̃−I‖²)`, and its per-block value is the RMS over the blocks of both sides.",
        "",
        "## FLOPs of one training step (SD-1.5 UNet, 512 px, batch 1; the paper's Table 1)",
        "",
        "Forward + backward of the denoising loss with adapters on to_q, to_k, to_v, to_out.0, counted by "
        "`torch.utils.flop_counter.FlopCounterMode` on the real SD-1.5 architecture built on `meta` (shapes "
        "only). FlopCounterMode counts matmul-like ops only (mm, bmm, einsum, convolutions, attention); "
        "elementwise ops and `linalg.solve` count zero. *Dense H* is the paper's code path: build the "
        "block-diagonal H every step, multiply the weight, plain linear; its product costs `2·out·in²/n` and it "
        "needs the weight gradient (as costly as the layer's forward), so it falls with n towards a floor. Our "
        "ETHER applies the reflection to the activations as two batched matmuls over the n blocks of d/n "
        "features: 4·d FLOPs per token and side forward for ETHER, 8·d for ETHER+, backward 2x, whatever n is. "
        "The last column is that reflection arithmetic; the counted total is the frozen UNet's plus about it "
        "(kernel choices in `adapters/ether.py` move it by under 0.5%: docs/benchmarks.md).",
        "",
        "| method | n | TFLOPs counted | essential reflection GFLOPs |",
        "|---|---|---|---|",
    ]
    for r in flops:
        lines.append(f"| {r['method']} | {r['n'] or '-'} | {r['flops'] / 1e12:.4f} | {r['essential_reflection_flops'] / 1e9:.2f} |")
    return "\n".join(lines) + "\n"


def outcomes_markdown(folder: Path, task: str, rows: list[dict]) -> str:
    metrics = [m for m, _ in OUTCOMES[task]]
    lines = [f"# Learning-rate robustness with outcomes ({task})", "",
             f"`python benchmarks/lr_robustness.py --from_reproduction {folder}`: per method and multiple of its "
             "learning rate (`lr`: the rate it trained with), the evaluator's metrics (the reproduction's "
             "report.json) and the distances of the runs' selected adapters (mean over subjects). Plot: "
             f"`lr_outcomes_{task}.png`.", "",
             "| method | x lr | lr | " + " | ".join(metrics) + " | transformation distance per block | weight distance |",
             "|---|---|---|" + "---|" * (len(metrics) + 2)]

    def fmt(value):
        return "" if value is None else f"{value:.3g}"

    for r in rows:
        lines.append(f"| {r['method']} | {r['multiplier']:g} | {r['lr']:.3g} | "
                     + " | ".join(fmt(r.get(m)) for m in metrics)
                     + f" | {fmt(r.get('transform_distance_per_block'))} | {fmt(r.get('weight_distance'))} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_reproduction:
        task, rows = outcomes_from_reproduction(Path(args.from_reproduction))
        paper = all(math.isclose(r["lr"], r["multiplier"] * getattr(METHOD_TABLE[r["method"]], f"{task}_lr"))
                    for r in rows if r["method"] in METHOD_TABLE)  # --lr_relative_to paper, or configs at the paper's
        plot_distances(rows, out / f"lr_outcomes_{task}.png", OUTCOMES[task],
                       "learning rate / paper default" if paper else "learning rate / config's rate")
        (out / f"lr_outcomes_{task}.md").write_text(outcomes_markdown(Path(args.from_reproduction), task, rows))
        print(f"wrote {out}/lr_outcomes_{task}.png and .md")
        return
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(args.work_dir or tmp)
        subject_label = args.instance_data_dir
        # a builtin: subject is drawn once here, not once per run
        args.instance_data_dir = str(resolve_instance_dir(args.instance_data_dir, work_dir))
        rows = lr_sweep(args, work_dir)
    args.instance_data_dir = subject_label
    plot_distances(rows, out / "lr_distances.png")
    plot_energy(rows, out / "hyperspherical_energy.png")
    random_transforms(args, out / "random_transforms.png", steps=10 if args.quick else 25)
    flops = sd15_flops()
    (out / "README.md").write_text(markdown(args, rows, flops))
    (out / "lr_robustness.json").write_text(json.dumps({"runs": rows, "flops": flops}, indent=1))
    print(f"wrote {out}/README.md, lr_distances.png, hyperspherical_energy.png, random_transforms.png")


if __name__ == "__main__":
    run_cli(main)
