"""The reproduction's report: `report.md` and `report.json` with our rows beside the paper's (Table 2 or 3),
parameter counts, the selected checkpoints, `per_subject.csv` (DreamBooth) and comparison grids.

Everything here is read from the records the driver (`evaluate/reproduce.py`) wrote, never from timings or
absolute paths, so a reproduction stopped and restarted gives the same report as one that ran in one go.
"""
import csv
import io
import math
from pathlib import Path

import torchvision.transforms.functional as TF
from PIL import Image
from safetensors import safe_open

from ether_diffusion.files import load_rgb, read_json, write_text
from ether_diffusion.grids import image_grid, save_grid
from evaluate.harness import fmt, write_json
from evaluate.paper_tables import PAPER, PAPER_ROW_OF_METHOD, TABLE_2, TABLE_3

GRID_PROMPTS = 8  # DreamBooth grids: the first image of the first 8 prompts of each subject
GRID_MAPS = 8  # S2I grid: the first 8 validation maps
COLUMNS = {
    "dreambooth": ("dino", "clip_i", "clip_t", "lpips", "lpips_diversity"),
    "s2i": ("miou", "accuracy", "fid", "real_miou", "real_accuracy"),
}
HEADERS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "lpips": "LPIPS", "lpips_diversity": "LPIPS diversity",
           "miou": "mIoU (%)", "accuracy": "Acc (%)", "fid": "FID", "real_miou": "real mIoU (%)",
           "real_accuracy": "real Acc (%)"}


def tensor_elements(path) -> int:
    """How many numbers a safetensors file holds (an adapter's or encoder's trainable parameters); 0 when
    there is no such file (an encoder-only run has no adapter)."""
    if not Path(path).is_file():
        return 0
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def paper_table(task: str) -> tuple[list[str], list[tuple]]:
    """(columns, rows) of the paper's table for `task`, as `evaluate/paper_tables.py` holds them."""
    if task == "dreambooth":
        return ["method", "#params", "dino", "clip_i", "clip_t", "lpips"], TABLE_2
    return ["method", "#params", "miou", "accuracy", "fid"], TABLE_3


# --------------------------------------------------------------------------------------------- rows
def our_row(task: str, variant, run_records: list[dict], scored: dict | None) -> dict:
    """One of our rows: the variant, its parameter counts (from its selected adapter files), its metrics."""
    parameters = run_records[0]["parameters"] if run_records else {}
    return {
        "variant": variant.name, "method": variant.method, "lr_multiplier": variant.lr_multiplier,
        "paper_row": PAPER_ROW_OF_METHOD[task].get(variant.method) if variant.lr_multiplier == 1 else None,
        "parameters": parameters, "learning_rate": run_records[0]["learning_rate"] if run_records else None,
        "metrics": scored["metrics"] if scored else None,
        "runs_scored": len(scored["scored"]["runs"]) if scored else 0,
    }


def _cells(task: str, metrics: dict | None, scale_percent: bool) -> list[str]:
    out = []
    for key in COLUMNS[task]:
        value = (metrics or {}).get(key)
        percent = scale_percent and key in ("miou", "accuracy", "real_miou", "real_accuracy")
        out.append(fmt(value, 100 if percent else 1, 2 if task == "s2i" else 4))
    return out


def _params(task: str, parameters: dict) -> list[str]:
    cells = [f"{parameters['adapter']:,}" if "adapter" in parameters else ""]
    if task == "s2i":
        cells.append(f"{parameters['encoder']:,}" if "encoder" in parameters else "")
    return cells


def results_table(task: str, rows: list[dict]) -> list[str]:
    """Markdown: each paper row, our row(s) of the same method right under it, then our other rows."""
    columns, paper_rows = paper_table(task)
    header = ["method", "#params"] + (["encoder params"] if task == "s2i" else []) + [HEADERS[c] for c in COLUMNS[task]]
    if task == "dreambooth":
        header.append("subjects")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    placed = set()
    for paper in paper_rows:
        values = dict(zip(columns, paper))
        cells = [f"{values['method']} (paper)", values["#params"] or ""] + ([""] if task == "s2i" else [])
        cells += [("" if values.get(c) is None else f"{values[c]:.3f}" if task == "dreambooth" else f"{values[c]:.1f}")
                  if c in values else "" for c in COLUMNS[task]]
        lines.append("| " + " | ".join(cells + ([""] if task == "dreambooth" else [])) + " |")
        for row in rows:
            if row["paper_row"] == values["method"]:
                lines.append(_our_line(task, row))
                placed.add(row["variant"])
    lines += [_our_line(task, row) for row in rows if row["variant"] not in placed]
    return lines


def _our_line(task: str, row: dict) -> str:
    cells = [f"**{row['variant']} (ours)**"] + _params(task, row["parameters"]) + _cells(task, row["metrics"], task == "s2i")
    if task == "dreambooth":
        cells.append(str(row["runs_scored"]))
    return "| " + " | ".join(cells) + " |"


# --------------------------------------------------------------------------------------------- files
def per_subject_csv(eval_dirs: dict, run_records: dict) -> str:
    """Every (subject, variant) row of the evaluator's per_subject.csv files, with the selected step."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["subject", "class", "method", "selected_step", "images", "black_skipped", *COLUMNS["dreambooth"]])
    for variant, folder in eval_dirs.items():
        path = Path(folder, "per_subject.csv")
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                record = run_records.get((variant, row["subject"]), {})
                writer.writerow([row["subject"], row["class"], variant, record.get("selected_step", ""), row["images"],
                                 row["black_skipped"], *(row[c] for c in COLUMNS["dreambooth"])])
    return out.getvalue()


def _blank(size) -> Image.Image:
    return Image.new("RGB", size, "white")


def dreambooth_grids(out: Path, subjects: list[str], eval_dirs: dict) -> list[str]:
    """grids/<subject>.png: a row per method, a column per prompt (its first image); white where missing."""
    written = []
    for subject in subjects:
        rows = []
        for folder in eval_dirs.values():
            prompt_dirs = sorted((p for p in Path(folder, subject).glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
            rows.append([p / "00.png" for p in prompt_dirs[:GRID_PROMPTS]])
        images = [p for row in rows for p in row if p.is_file()]
        if not images:
            continue
        size = load_rgb(images[0]).size
        cols = max(len(row) for row in rows)
        cells = [load_rgb(p) if p.is_file() else _blank(size) for row in rows for p in row + [Path("-")] * (cols - len(row))]
        save_grid(image_grid(cells, rows=len(rows), cols=cols), out / "grids" / f"{subject}.png")
        written.append(f"grids/{subject}.png")
    return written


def s2i_grid(out: Path, dataset, eval_dirs: dict) -> list[str]:
    """grids/maps.png: a row per validation map: map | each method's image | the real image."""
    from evaluate.s2i import to_uint8

    cells = []
    count = min(GRID_MAPS, len(dataset))
    for index in range(count):
        item = dataset[index]
        real = TF.to_pil_image(to_uint8(item["pixel_values"]))
        cells.append(TF.to_pil_image(item["conditioning_pixel_values"]).convert("RGB"))
        for folder in eval_dirs.values():
            path = Path(folder, "images", f"{dataset.pairs[index][0].stem}.png")
            cells.append(load_rgb(path) if path.is_file() else _blank(real.size))
        cells.append(real)
    if not cells:
        return []
    save_grid(image_grid(cells, rows=count, cols=len(eval_dirs) + 2), out / "grids" / "maps.png")
    return ["grids/maps.png"]


# --------------------------------------------------------------------------------------------- the report
def write_report(out: Path, task: str, settings: dict, selection_text: str, rows: list[dict], runs: list[dict],
                 failures: list[dict], grids: list[str], evaluator_settings: dict | None, per_subject: str | None,
                 grid_methods: list[str]):
    """report.md, report.json (last: it is the report's completion record) and per_subject.csv."""
    columns, paper_rows = paper_table(task)
    table = "Table 2 (DreamBooth)" if task == "dreambooth" else "Table 3 (S2I on ADE20K)"
    report = {
        "task": task, "table": table, "settings": settings, "selection": selection_text,
        "evaluator_settings": evaluator_settings,
        "paper": {"source": PAPER, "columns": columns, "rows": [list(row) for row in paper_rows]},
        "ours": rows, "runs": runs, "failed": failures, "grids": grids,
    }
    md = [f"# Reproduction of the paper's {table}", "",
          f"Model {', '.join(f'`{m}`' for m in settings['models'])}, dataset `{settings['dataset']}`. "
          f"Written by `python -m evaluate.reproduce {task}` from its records; rows in bold are ours, the others "
          f"the paper's ({PAPER}, measured on SD-1.5 with the paper's backbones: comparable only when run the same "
          "way).", "",
          *results_table(task, rows), "",
          f"Checkpoint selection: {selection_text}.", ""]
    if evaluator_settings:
        keys = ("dino", "clip", "lpips_net", "images_per_prompt", "num_inference_steps", "guidance_scale", "prompts") \
            if task == "dreambooth" else ("segmenter", "inception", "limit", "resolution", "num_inference_steps", "guidance_scale")
        shown = {k: "all" if evaluator_settings[k] is None and k in ("prompts", "limit") else evaluator_settings[k]
                 for k in keys if k in evaluator_settings}
        md += ["Evaluation: " + ", ".join(f"{k} `{v}`" for k, v in shown.items()) + ".", ""]
    if task == "dreambooth":
        md += ["#params: trainable numbers in the selected adapter file. Subjects: how many subjects a row averages "
               "over (DINO, CLIP-I and LPIPS over every (real, generated) pair, pooled).", ""]
    else:
        md += ["#params: trainable numbers in the selected adapter file (the paper's Table 3 counts 0.1M / 0.4M for "
               "ETHER / ETHER+); encoder params: the signal encoder, trained fully in every row. real mIoU / Acc: the "
               "segmenter on the real images, the ceiling.", ""]
    md += ["## Runs", "", "| run | learning rate | selected step | status |", "|---|---|---|---|"]
    for r in runs:
        rate = "" if r.get("learning_rate") is None else format(r["learning_rate"], "g")
        if r.get("encoder_learning_rate") is not None:
            rate += f" (encoder {r['encoder_learning_rate']:g})"
        md.append(f"| {r['run']} | {rate} | {r.get('selected_step', '')} | {r['status']} |")
    md.append("")
    if failures:
        md += ["## Failed", ""] + [f"- {f['what']} ({f['stage']}): {f['error']}" for f in failures] + [""]
    md += ["Files: " + ", ".join(["`report.json`"] + (["`per_subject.csv`"] if per_subject is not None else [])
                                 + [f"`{g}`" for g in grids]) + "; each run's `selection.json` in `runs/`, each "
           "evaluation in `eval/`.", ""]
    if grids:
        layout = ("a row per method, a column per prompt (its first image)" if task == "dreambooth"
                  else "a row per map: the map, each method's image, the real image")
        md += [f"Grids: {layout}; methods in this order: {', '.join(grid_methods)}.", ""]
    if per_subject is not None:
        write_text(out / "per_subject.csv", per_subject)
    write_text(out / "report.md", "\n".join(md))
    write_json(out / "report.json", report)
    return report


def evaluator_settings(folder: Path) -> dict | None:
    """The evaluator's record of its settings (backbones, steps) from one evaluation's metrics.json, without
    the paths that name this output folder (they differ between two copies of one reproduction)."""
    record = read_json(Path(folder, "metrics.json"))
    if record is None:
        return None
    return {k: v for k, v in record["settings"].items() if k not in ("adapters", "manifest", "control_dir")}
