"""Proof that the methods learn, on the toy world: train through the real DreamBooth trainer, sample, judge,
print the table.

    python -m ether_diffusion.toy.learning --output_dir toy-learning              # the table (all methods)
    python -m ether_diffusion.toy.learning --output_dir toy-sweep --sweep         # the learning-rate sweep

For every (method, subject): `accelerate launch train_dreambooth.py --config configs/toy/dreambooth-<method>.yaml
--instance_data_dir builtin:toy-subject/<subject>` (600 steps, batch 1, prior preservation with "a photo of
toy"), then the adapter is loaded into `builtin:toy-sd` and the judge (`judge.py`) looks at
`--samples` pictures of each prompt:

- "a photo of qwe toy": is it the subject?                 (the issue asks >= 80%; base model <= 10%)
- "a qwe toy on the beach / in the snow / at night": is the asked scene kept?   (>= 70%)
- "a photo of toy": another toy than the subject?           (>= 50%, with prior preservation)

plus, for the base model, prompt following: "a photo of a <colour> <object> <scene>" judged for object,
colour and scene (>= 85% each). Runs go `--jobs` at a time, one torch thread each; a run whose adapter
exists is not trained again, so the script can be stopped and restarted.

The learning-rate rule (`--sweep`): on one subject (heart_toy, not the demo's), each method at its paper
rate times 3, 10, 30 and 100; the chosen rate is the one with the most subject found among those that keep
the asked scene in at least 70% of the scene prompts (ties: the most subject's parts, then the lower rate).
The chosen rates are the `learning_rate` of `configs/toy/dreambooth-<method>.yaml`.
"""
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..adapter_file import ADAPTER_FILE
from ..adapters import METHODS
from ..errors import ArgumentParser, UserError, run_cli
from ..files import read_yaml_mapping
from ..grids import image_grid
from ..pipelines import load_pipeline
from ..run_folder import keep
from ..sample import use_dpm_solver
from . import world
from .judge import Judge, parts_right

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "toy"
MODEL = "builtin:toy-sd"
SCENE_PROMPTS = ("beach", "snow", "night")
SWEEP_FACTORS = (3, 10, 30, 100)
SWEEP_SUBJECT = "heart_toy"
THRESHOLDS = {"subject": 0.8, "scene": 0.7, "other_toys": 0.5, "base_subject": 0.1, "prompt_following": 0.85}


def config_name(method: str) -> str:
    return f"dreambooth-{method.replace('+', 'plus')}.yaml"


# ============================================================================================ training
def train(method: str, subject: str, out: Path, class_dir: Path, num_class_images: int, learning_rate=None,
          log=None) -> Path:
    """One DreamBooth run through `accelerate launch train_dreambooth.py` (one thread); returns the adapter."""
    adapter = out / ADAPTER_FILE
    while not adapter.is_file() and (out / "train.log").is_file() and time.time() - (out / "train.log").stat().st_mtime < 120:
        time.sleep(15)  # another invocation of this script is training this run (its log is fresh): wait for it
    if adapter.is_file():
        return adapter
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train_dreambooth.py"),
           "--config", str(CONFIGS / config_name(method)), "--instance_data_dir", f"builtin:toy-subject/{subject}",
           "--class_data_dir", str(class_dir), "--num_class_images", str(num_class_images), "--output_dir", str(out)]
    if learning_rate is not None:
        cmd += ["--learning_rate", str(learning_rate)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    started = time.time()
    keep(out, "train.log", "judged.json", "judged.png")  # ours, beside the trainer's files (run_folder.keep)
    with open(out / "train.log", "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"training {method} on {subject} failed: see {out / 'train.log'}")
    if log:
        log(f"trained {method} on {subject} in {time.time() - started:.0f} s")
    return adapter


def class_images(output_dir: Path, count: int, seed: int = 0) -> Path:
    """The prior-preservation images of "a photo of toy", generated once by the base model for every run."""
    from ..dreambooth_data import generate_class_images

    folder = output_dir / "class-images"
    generate_class_images(lambda: load_pipeline(MODEL), folder, "a photo of toy", count, sample_batch_size=16,
                          num_inference_steps=25, resolution=world.SIZE, seed=seed)
    return folder


# ============================================================================================ judging
def samples(pipe, prompt: str, count: int, seed: int):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_images_per_prompt=count, generator=generator, num_inference_steps=25,
                guidance_scale=7.5, height=world.SIZE, width=world.SIZE).images


def judge_subject(judge: Judge, adapter, subject: str, count: int, seed: int = 0, grid=None) -> dict:
    """The three fractions of the table for one adapter (None: the base model) and subject."""
    pipe = use_dpm_solver(load_pipeline(MODEL, adapter=adapter, merge=adapter is not None))
    photo = samples(pipe, f"a photo of {world.IDENTIFIER} toy", count, seed)
    scene_images = {s: samples(pipe, f"a {world.IDENTIFIER} toy {world.SCENES[s]}", count, seed + 1)
                    for s in SCENE_PROMPTS}
    class_photo = samples(pipe, "a photo of toy", count, seed + 2)
    photo_answers = judge(photo)
    scene_answers = {s: judge(images) for s, images in scene_images.items()}
    found = [a["subject"] == subject for a in photo_answers]
    kept = [a["scene"] == s for s, answers in scene_answers.items() for a in answers]
    subject_in_scene = [a["subject"] == subject for answers in scene_answers.values() for a in answers]
    others = [a["kind"] == world.TOY and a["subject"] != subject for a in judge(class_photo)]
    if grid is not None:
        rows = [photo, *scene_images.values(), class_photo]
        image_grid([im for row in rows for im in row[:8]], rows=len(rows), cols=8).save(grid)
    return {"subject": sum(found) / count, "scene": sum(kept) / len(kept),
            "subject_in_scenes": sum(subject_in_scene) / len(subject_in_scene), "other_toys": sum(others) / count,
            "subject_parts": sum(parts_right(a, subject) for a in photo_answers) / count}


def look_in_words(judge: Judge, subject: str, count: int, seed: int = 0) -> dict:
    """The base model asked for the subject's whole look in words ("a photo of a blue square toy with small
    eyes, a heart and yellow feet"): how often it draws the subject, and how many of its parts. What the model
    can draw at all bounds what an adapter can teach it in a few hundred steps."""
    pipe = use_dpm_solver(load_pipeline(MODEL))
    answers = judge(samples(pipe, f"a photo of {world.SUBJECTS[subject].describe()}", count, seed))
    return {"subject": sum(a["subject"] == subject for a in answers) / count,
            "subject_parts": sum(parts_right(a, subject) for a in answers) / count}


def prompt_following(judge: Judge, count: int, seed: int = 0) -> dict:
    """Base model: "a photo of a <colour> <object> <scene>", each object with two colours in every scene."""
    pipe = use_dpm_solver(load_pipeline(MODEL))
    right = {"kind": [], "colour": [], "scene": []}
    colours = list(world.COLOURS)
    for i, kind in enumerate(world.OBJECTS):
        for j, scene in enumerate(world.SCENES):
            for colour in (colours[(i + 2 * j) % 8], colours[(i + 2 * j + 4) % 8]):
                words = f"{colour} {kind}"
                prompt = f"a photo of {world.article(words)} {words} {world.SCENES[scene]}"
                for answer in judge(samples(pipe, prompt, count, seed)):
                    right["kind"].append(answer["kind"] == kind)
                    right["colour"].append(answer["colour"] == colour)
                    right["scene"].append(answer["scene"] == scene)
    return {name: sum(v) / len(v) for name, v in right.items()} | {"prompts": 40, "samples": count * 40}


# ============================================================================================ tables
def pct(value) -> str:
    return f"{100 * value:.0f}%"


RESULT_COLUMNS = ("subject found (photo of qwe toy) | subject's parts (same pictures) | scene kept (beach/snow/night) | "
                  "subject in those scenes | other toys (photo of toy)")


def result_cells(r: dict) -> str:
    return " | ".join(pct(r[k]) for k in ("subject", "subject_parts", "scene", "subject_in_scenes", "other_toys"))


def table(base: dict, rows: dict) -> str:
    lines = [f"| method | lr | subject | {RESULT_COLUMNS} |", "|---|---|---|---|---|---|---|---|"]
    for subject, r in base["subjects"].items():
        lines.append(f"| base model | | {subject} | {result_cells(r)} |")
    for subject, r in base.get("look_in_words", {}).items():  # the same columns, for the look spelled out
        lines.append(f"| base model, the look in words | | {subject} | {pct(r['subject'])} | {pct(r['subject_parts'])} "
                     "| | | |")
    for (method, subject), r in rows.items():
        lines.append(f"| {method} | {r['learning_rate']:g} | {subject} | {result_cells(r)} |")
    return "\n".join(lines)


def choose_rate(results: dict) -> float:
    """The stated rule: most subject found among rates keeping scenes >= 70%; ties (e.g. none found) go to
    the most subject's parts, then to the lower rate. If no rate keeps scenes, the one that keeps them best."""
    keeping = {lr: r for lr, r in results.items() if r["scene"] >= THRESHOLDS["scene"]}
    if not keeping:
        return max(sorted(results), key=lambda lr: results[lr]["scene"])
    return max(sorted(keeping), key=lambda lr: (keeping[lr]["subject"], keeping[lr]["subject_parts"]))


# ============================================================================================ main
def parse_args(argv=None):
    p = ArgumentParser(prog="python -m ether_diffusion.toy.learning", description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--methods", default=",".join(METHODS), help="Comma-separated methods.")
    p.add_argument("--subjects", default=",".join(world.SUBJECTS), help="Comma-separated toy subjects.")
    p.add_argument("--samples", type=int, default=16, help="Pictures per prompt.")
    p.add_argument("--class_images", type=int, default=64, help="Prior-preservation images (shared by all runs).")
    p.add_argument("--jobs", type=int, default=2, help="Trainings at once (one thread each).")
    p.add_argument("--sweep", action="store_true", help="The learning-rate sweep instead of the table.")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    for m in args.methods:
        if m not in METHODS:
            raise UserError(f"--methods: unknown method {m!r} (choose from {', '.join(METHODS)})")
    for s in args.subjects:
        if s not in world.SUBJECTS:
            raise UserError(f"--subjects: unknown subject {s!r} (choose from {', '.join(world.SUBJECTS)})")
    return args


def config_rate(method: str) -> float:
    """The learning rate `configs/toy/dreambooth-<method>.yaml` ships (the one the sweep chose)."""
    return float(read_yaml_mapping(CONFIGS / config_name(method))["learning_rate"])


def run_folder(out: Path, method: str, subject: str, lr: float) -> Path:
    """One folder per (method, subject, rate): the sweep's run at the chosen rate is the table's run."""
    return out / "runs" / method / subject / f"lr{lr:g}"


def judged(judge, out: Path, method: str, subject: str, lr: float, count: int) -> dict:
    """The judge's fractions for one run, computed once (`judged.json` in the run folder)."""
    folder = run_folder(out, method, subject, lr)
    cache = folder / "judged.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("samples") == count and "subject_parts" in cached:
            return cached
    result = judge_subject(judge, folder / ADAPTER_FILE, subject, count, grid=folder / "judged.png")
    result.update(learning_rate=lr, samples=count)
    cache.write_text(json.dumps(result, indent=1))
    return result


def base_judged(judge, out: Path, subjects, count: int) -> dict:
    """The base model's rows (prompt following; each subject's fractions), computed once (`base.json`)."""
    cache = out / "base.json"
    base = json.loads(cache.read_text()) if cache.is_file() else {}
    if base.get("samples") != count:
        base = {"samples": count, "subjects": {}}
    if "prompt_following" not in base:
        base["prompt_following"] = prompt_following(judge, max(1, count // 4))
    words = base.setdefault("look_in_words", {})
    for subject in subjects:
        if subject not in base["subjects"]:
            base["subjects"][subject] = judge_subject(judge, None, subject, count)
        if subject not in words:
            words[subject] = look_in_words(judge, subject, count)
    cache.write_text(json.dumps(base, indent=1))
    return {"prompt_following": base["prompt_following"], "subjects": {s: base["subjects"][s] for s in subjects},
            "look_in_words": {s: words[s] for s in subjects}}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def log(message):
        print(f"[{time.time() - started:6.0f} s] {message}", flush=True)

    judge = Judge()
    classes = class_images(out, args.class_images)
    if args.sweep:
        runs = [(m, SWEEP_SUBJECT, METHODS[m].dreambooth_lr * f) for m in args.methods for f in SWEEP_FACTORS]
    else:
        runs = [(m, s, config_rate(m)) for s in args.subjects for m in args.methods]  # a subject at a time
    trained = sum((run_folder(out, *run) / ADAPTER_FILE).is_file() for run in runs)
    log(f"{len(runs)} runs, {trained} trained already; {args.jobs} at a time")

    judging = threading.Lock()

    def train_and_judge(run):
        # Each run is judged as soon as it is trained, so judging one overlaps training another. One judging
        # at a time: diffusers' lazy imports are not thread-safe (two threads loading a pipeline at once got
        # "cannot import name 'StableDiffusionPipeline'"), and the machine's cores are busy training anyway.
        method, subject, lr = run
        train(method, subject, run_folder(out, *run), classes, args.class_images, lr, log)
        with judging:
            result = judged(judge, out, method, subject, lr, args.samples)
        log(f"{method} {subject} lr {lr:g}: " + ", ".join(f"{k} {pct(result[k])}" for k in ("subject", "subject_parts", "scene", "other_toys")))
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(runs, pool.map(train_and_judge, runs)))

    if args.sweep:
        lines = [f"| method | lr | {RESULT_COLUMNS} |", "|---|---|---|---|---|---|---|"]
        chosen = {}
        for method in args.methods:
            by_rate = {lr: r for (m, _, lr), r in results.items() if m == method}
            chosen[method] = choose_rate(by_rate)
            for lr, r in by_rate.items():
                mark = " (chosen)" if lr == chosen[method] else ""
                lines.append(f"| {method} | {lr:g}{mark} | {result_cells(r)} |")
        text = f"Learning-rate sweep on {SWEEP_SUBJECT} (600 steps, batch 1, prior preservation):\n\n" + "\n".join(lines)
        (out / "chosen_rates.json").write_text(json.dumps(chosen, indent=1))
        report = out / "sweep.md"
    else:
        base = base_judged(judge, out, args.subjects, args.samples)
        pf = base["prompt_following"]
        text = (f"Base model prompt following ({pf['samples']} samples of {pf['prompts']} prompts "
                f"\"a photo of a <colour> <object> <scene>\"): object {pct(pf['kind'])}, colour {pct(pf['colour'])}, "
                f"scene {pct(pf['scene'])}\n\n" + table(base, {(m, s): r for (m, s, _), r in results.items()}))
        (out / "results.json").write_text(json.dumps(
            {"base": base, "runs": {f"{m}/{s}": r for (m, s, _), r in results.items()}}, indent=1))
        report = out / "report.md"
    text += f"\n\n{args.samples} samples per prompt; {time.time() - started:.0f} s in all.\n"
    report.write_text(text)
    print(text)


if __name__ == "__main__":
    run_cli(main)
