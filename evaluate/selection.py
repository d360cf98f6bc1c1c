"""The paper's checkpoint selection: train 1,400 steps, evaluate every 200, keep the best (App. C).

A run's candidates are its `checkpoint-N/` folders (the trainer saves one every `--select_every` steps) and its
final output when the last step is not a checkpoint. Each candidate is scored by the evaluator on a small
subset of the evaluation protocol with the same backbones (the caller's `score(step, folder) -> metrics`);
the best by a stated criterion is kept and recorded in `selection.json` in the run folder. Scores already
computed (`selection/step-N.json`) are reused when a stopped run is restarted.
"""
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ether_diffusion.checkpoints import list_checkpoints
from ether_diffusion.errors import UserError
from ether_diffusion.files import read_json
from ether_diffusion.training import TRAIN_LOG
from evaluate.harness import write_json

SELECTION = "selection.json"
SCORES_DIR = "selection"


@dataclass(frozen=True)
class Criterion:
    """A sum of evaluator metrics, each added or subtracted: "dino+clip_t", "miou", "miou-fid"."""

    text: str
    terms: tuple[tuple[int, str], ...]

    @classmethod
    def parse(cls, text: str, metrics) -> "Criterion":
        compact = text.replace(" ", "")
        terms = tuple((-1 if sign == "-" else 1, name) for sign, name in re.findall(r"([+-]?)([A-Za-z_]+)", compact))
        if not terms or "".join(f"{'-' if s < 0 else '+'}{n}" for s, n in terms).lstrip("+") != compact.lstrip("+"):
            raise UserError(f"--select_by {text!r}: expected metric names joined by + or -, e.g. dino+clip_t")
        for _, name in terms:
            if name not in metrics:
                raise UserError(f"--select_by {text!r}: unknown metric {name!r} (choose from {', '.join(metrics)})")
        return cls(compact, terms)

    def score(self, metrics: dict) -> float | None:
        """The criterion's value; None when a metric was not scored (null or NaN: all images black, say)."""
        values = [metrics.get(name) for _, name in self.terms]
        if any(v is None or not math.isfinite(v) for v in values):
            return None
        return sum(sign * float(v) for (sign, _), v in zip(self.terms, values))


def final_step(run_dir) -> int:
    """The last step in the run's `train_log.jsonl` (the trainer logs every optimizer step)."""
    steps = []
    path = Path(run_dir, TRAIN_LOG)
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            pass
    if not steps:
        raise UserError(f"{path}: no training step logged (did the run finish?)")
    return steps[-1]


def candidates(run_dir, select_every: int) -> list[tuple[int, Path]]:
    """(step, folder) to choose from: every `select_every`-th checkpoint and the final output (when its step is
    not a checkpoint's); with `select_every` 0 only the final output."""
    run_dir = Path(run_dir)
    last = final_step(run_dir)
    found = [(step, path) for step, path in list_checkpoints(run_dir)
             if select_every and step % select_every == 0 and step <= last]
    if last not in {step for step, _ in found}:
        found.append((last, run_dir))
    return found


def select(run_dir, select_every: int, criterion: Criterion, score, subset: str) -> dict:
    """Score every candidate (`score(step, folder) -> metrics`, skipped when `selection/step-N.json` holds its
    scores), keep the best by `criterion` (the earliest step on a tie) and write `selection.json`. `subset`
    says in words what each candidate was scored on. Returns the record."""
    run_dir = Path(run_dir)
    found = candidates(run_dir, select_every)
    rows = []
    for step, folder in found:
        if len(found) == 1:  # nothing to choose between: no need to score
            rows.append({"step": step, "path": _relative(folder, run_dir), "metrics": None, "score": None})
            continue
        cache = run_dir / SCORES_DIR / f"step-{step}.json"
        metrics = read_json(cache)
        if metrics is None:
            metrics = score(step, folder)  # the evaluators' metrics: None where not computed, never NaN
            write_json(cache, metrics)
        rows.append({"step": step, "path": _relative(folder, run_dir), "metrics": metrics,
                     "score": criterion.score(metrics)})
    # the best score, the earliest step on a tie; an unscored candidate only when no candidate has a score
    best = max(rows, key=lambda row: (row["score"] is not None, row["score"] or 0.0, -row["step"]))
    record = {
        "criterion": criterion.text if len(rows) > 1 else "the final output (one candidate)",
        "subset": subset if len(rows) > 1 else None,
        "candidates": rows,
        "selected": {"step": best["step"], "path": best["path"]},
    }
    write_json(run_dir / SELECTION, record)
    return record


def _relative(folder: Path, run_dir: Path) -> str:
    return Path(folder).relative_to(run_dir).as_posix() if Path(folder) != run_dir else "."

