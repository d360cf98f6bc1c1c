#!/usr/bin/env python
"""One command from subjects (or label maps) to the paper's Table 2 (or Table 3): train every run, keep each
run's best checkpoint, evaluate, and write one report beside the paper's numbers.

    # Table 2: every DreamBooth subject x method; one run per process at a time, here on 8 GPUs
    accelerate launch --num_processes 8 -m evaluate.reproduce dreambooth \\
        --dataset data/dreambooth --config_dir configs/dreambooth \\
        --methods ether,ether+,lora,oft --output_dir reproduce/table2

    # Table 3: one run per method on ADE20K (`none`: the signal encoder alone, the paper's "Encoder-only")
    accelerate launch --num_processes 4 -m evaluate.reproduce s2i \\
        --dataset data/ADEChallengeData2016 --caption_file data/ade20k_captions.jsonl \\
        --config_dir configs/s2i --methods none,ether,ether+,oft --select_every 1000 --output_dir reproduce/table3

A run is (subject, method) for DreamBooth and (method) for S2I, trained by the project's own trainer with the
method's config file (`--config_dir DIR`: `DIR/<method>.yaml` or `DIR/<task>-<method>.yaml`, "+" spelled
"plus"; or `--config METHOD=FILE`). In order:

1. Train. Each process takes every N-th run and starts the trainer (`ether_diffusion.trainers.dreambooth`,
   `.s2i`) as a plain single process: no gradient sync between independent runs
   (`evaluate/shards.py`). It checkpoints every `--select_every` steps and resumes from its latest checkpoint,
   so a stopped run goes on where it stopped. DreamBooth runs of one class share their class images.
2. Select (`evaluate/selection.py`): every checkpoint is scored by the evaluator on a small, stated subset
   (DreamBooth: every 5th prompt of the subject, `--select_images` images each; S2I: the first
   `--select_maps` validation maps) and the best by `--select_by` is kept (default: DINO + CLIP-T, subject
   and prompt fidelity with equal weight; S2I: mIoU), recorded in the run's `selection.json`. `done.json`,
   written last, makes a run done.
3. Evaluate the selected adapters with `evaluate/dreambooth.py` (generation: `--subjects_per_batch` subjects of
   a method in one batch, each through its own adapter, these groups split over the processes; then one
   scoring per method) or `evaluate/s2i.py` (one per method).
4. Report (`evaluate/reproduce_report.py`): `report.md` and `report.json` with our rows beside the paper's,
   parameter counts, selected steps, `per_subject.csv` (DreamBooth) and `grids/`; every failed run named with
   its error line.

Everything is written atomically and every step is recorded when it ends, so the command can be stopped at
any moment and run again with the same arguments: finished work is skipped, stopped work resumes, and the
report is the same as from one uninterrupted go. A failed run is recorded with its error line and the rest goes
on; the exit code is 1 when anything failed. Slurm job arrays and several nodes: see docs/reproduce.md.
"""
import argparse
import contextlib
import csv
import ctypes
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ether_diffusion import adapter_batch, checks
from ether_diffusion.adapter_file import ADAPTER_FILE
from ether_diffusion.adapters.methods import METHODS
from ether_diffusion.arguments import NO_ADAPTER
from ether_diffusion.control import ENCODER_WEIGHTS
from ether_diffusion.errors import ArgumentParser, UserError, first_line, run_cli
from ether_diffusion.files import read_json, write_text
from ether_diffusion.run_folder import (RunLock, describe_holder, holder_of, keep, read_holder,
                                        written_by_an_ended_process)
from ether_diffusion.trainers import dreambooth as dreambooth_trainer, s2i as s2i_trainer
from evaluate import dreambooth as dreambooth_eval
from evaluate import reproduce_report, s2i as s2i_eval, selection, shards
from evaluate.harness import same_path, write_json
from evaluate.protocol import load_protocol

SETTINGS = "reproduce.json"  # the settings of the whole reproduction, checked when it is run again
RUN = "run.json"  # a run's identity: its trainer command and config text
TRAINED = "trained.json"
DONE = "done.json"  # written last: the run is done
FAILED = "failed.json"
EVAL_DIR, RUNS_DIR = "eval", "runs"
POLL_SECONDS = 1  # reading a few small records: cheap
LOCKS = "locks"  # one lock file per process of the launches working in the folder
# Flags the driver sets itself in every evaluator call: not accepted in --eval_args.
DRIVER_EVAL_FLAGS = ("--dataset", "--pretrained_model_name_or_path", "--model", "--adapters", "--manifest", "--subjects_per_batch",
                     "--output_dir", "--subjects", "--skip_generation", "--skip_metrics", "--token", "--control_dir",
                     "--caption_file")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    tasks = parser.add_subparsers(dest="task", required=True, metavar="{dreambooth,s2i}")
    for task, help_text in (("dreambooth", "subjects x methods: Table 2"), ("s2i", "methods on ADE20K: Table 3")):
        p = tasks.add_parser(task, help=help_text, description=help_text)
        p.error = parser.error  # one-line UserErrors from the sub-command too
        g = p.add_argument_group("what to run")
        g.add_argument("--dataset", required=True,
                       help="DreamBooth layout (<subject>/*.jpg + prompts_and_classes.txt)" if task == "dreambooth"
                       else "ADEChallengeData2016 folder (or its parent)")
        if task == "s2i":
            g.add_argument("--caption_file", default=None, help="metadata.jsonl captions, for training and evaluation")
        g.add_argument("--methods", required=True, type=_comma_list,
                       help="comma-separated methods, e.g. ether,ether+,lora,oft" + (" (none: encoder only)" if task == "s2i" else ""))
        g.add_argument("--config_dir", default=None, help="folder of the methods' configs: <method>.yaml or "
                       f"{task}-<method>.yaml, with '+' spelled 'plus' (etherplus.yaml)")
        g.add_argument("--config", action="append", default=[], metavar="METHOD=FILE",
                       help="one method's config file (repeat the flag); wins over --config_dir")
        g.add_argument("--model", default=None, help="base model for every run (default: each config's)")
        if task == "dreambooth":
            g.add_argument("--subjects", type=_comma_list, default=None, help="comma-separated subjects (default: all)")
            g.add_argument("--token", default="qwe", help='the identifier: instance prompts are "a photo of qwe <class>"')
            g.add_argument("--subjects_per_batch", type=int, default=4,
                           help="evaluation images: K subjects of a method in one batch, each through its own adapter "
                                "(the same images as 1; memory grows with K: docs/adapter_batch.md)")
        g.add_argument("--output_dir", required=True)
        g.add_argument("--lr_multipliers", type=_float_list, default=[1.0],
                       help="train every method at these multiples of its config's learning rate (e.g. 0.1,1,10,100)")
        g.add_argument("--lr_relative_to", choices=["config", "paper"], default="config",
                       help="paper: the multiples are of the method's paper learning rate (the paper's Figures 5 and 8; "
                            "the encoder-only S2I run keeps its config's)")
        g.add_argument("--max_train_steps", type=int, default=None, help="override the configs' number of steps")
        g.add_argument("--train_args", default="", help='extra trainer arguments for every run, e.g. "--mixed_precision fp16"')
        g.add_argument("--eval_args", default="",
                       help='extra evaluator arguments, e.g. "--clip DIR --dino DIR" (backbones) or "--num_inference_steps 25"')
        g.add_argument("--stage", choices=["all", "train", "evaluate"], default="all",
                       help="train: train and select only; evaluate: evaluate what is trained and report")
        g = p.add_argument_group("checkpoint selection (the paper's: every 200 steps, keep the best)")
        g.add_argument("--select_every", type=int, default=200,
                       help="checkpoint and score every N steps; 0: keep the final adapter")
        if task == "dreambooth":
            g.add_argument("--select_prompts", type=_int_list, default=None,
                           help="prompt indices scored (default: every 5th prompt of the subject's list)")
            g.add_argument("--select_images", type=int, default=2, help="images per prompt when scoring a checkpoint")
            g.add_argument("--select_by", default="dino+clip_t",
                           help=f"metrics summed (+) or subtracted (-): {', '.join(dreambooth_eval.METRICS)}")
        else:
            g.add_argument("--select_maps", type=int, default=50, help="validation maps scored (the first N)")
            g.add_argument("--select_by", default="miou", help="metrics summed (+) or subtracted (-): miou, accuracy, fid")
    args = parser.parse_args(argv)

    if args.select_every < 0:
        raise UserError(f"--select_every must be 0 (keep the final adapter) or positive, got {args.select_every}")
    checks.at_least(args, 1, "max_train_steps", *(("select_images", "subjects_per_batch") if args.task == "dreambooth"
                                                  else ("select_maps",)))
    if min(args.lr_multipliers) <= 0:
        raise UserError(f"--lr_multipliers must be positive, got {args.lr_multipliers}")
    metrics = dreambooth_eval.METRICS if args.task == "dreambooth" else ("miou", "accuracy", "fid")
    args.criterion = selection.Criterion.parse(args.select_by, metrics)
    args.train_args, args.eval_args = _split(args.train_args, "--train_args"), _split(args.eval_args, "--eval_args")
    for token in args.eval_args:
        if token.split("=")[0] in DRIVER_EVAL_FLAGS:
            raise UserError(f"--eval_args: {token.split('=')[0]} is set by the driver for every evaluation")
    return args


def _comma_list(value) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _number_list(kind):
    def parse(value):
        try:
            return [kind(v) for v in _comma_list(value)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {value!r}") from None
    return parse


_int_list, _float_list = _number_list(int), _number_list(float)


def _split(value: str, flag: str) -> list[str]:
    try:
        return shlex.split(value)
    except ValueError as e:
        raise UserError(f"{flag} {value!r}: {e}") from None


# ================================================================================================ the plan
@dataclass(frozen=True)
class Variant:
    """A method at a multiple of its config's learning rate: one row of the report."""
    method: str
    lr_multiplier: float
    name: str  # folder and row name: "ether+", or "ether+-x10" when several multipliers are run
    config: Path


@dataclass
class Run:
    variant: Variant
    subject: str | None  # None for S2I
    folder: Path
    trainer: object = field(repr=False)  # the trainer's module: ether_diffusion.trainers.dreambooth or .s2i
    argv: list[str] = field(repr=False)  # its command line
    settings: argparse.Namespace = field(repr=False)  # its arguments as it will parse them

    @property
    def name(self) -> str:
        return f"{self.variant.name}/{self.subject}" if self.subject else self.variant.name


def config_file(args, method: str) -> Path:
    explicit = dict(item.split("=", 1) for item in args.config if "=" in item)
    bad = [item for item in args.config if "=" not in item]
    if bad:
        raise UserError(f"--config {bad[0]!r}: expected METHOD=FILE")
    if method in explicit:
        path = Path(explicit[method])
    else:
        if args.config_dir is None:
            raise UserError(f"no config for method {method}: pass --config_dir DIR or --config {method}=FILE")
        stem = method.replace("+", "plus")
        names = [f"{stem}.yaml", f"{args.task}-{stem}.yaml"]
        path = next((Path(args.config_dir, n) for n in names if Path(args.config_dir, n).is_file()), None)
        if path is None:
            raise UserError(f"no config for method {method} in {args.config_dir} (looked for {' or '.join(names)})")
    if not path.is_file():
        raise UserError(f"config file not found: {path} (method {method})")
    return path


def variants(args) -> list[Variant]:
    known = list(METHODS) + ([NO_ADAPTER] if args.task == "s2i" else [])
    out = []
    for method in dict.fromkeys(args.methods):
        if method not in known:
            raise UserError(f"--methods: unknown method {method!r} (choose from {', '.join(known)})")
        config = config_file(args, method)
        for multiplier in args.lr_multipliers:
            name = method if args.lr_multipliers == [1.0] else f"{method}-x{multiplier:g}"
            out.append(Variant(method, multiplier, name, config))
    return out


def trainer_of(args):
    return dreambooth_trainer if args.task == "dreambooth" else s2i_trainer


def plan_run(args, variant: Variant, subject=None, class_name=None) -> Run:
    """The trainer's command line for one run, parsed by the trainer itself now: a bad config or value fails
    here, before anything trains."""
    output_dir = Path(args.output_dir)
    folder = output_dir / RUNS_DIR / variant.name / (subject or "")
    argv = ["--config", str(variant.config)]
    if args.model:
        argv += ["--pretrained_model_name_or_path", args.model]
    if args.task == "dreambooth":
        argv += ["--instance_data_dir", str(Path(args.dataset, subject)),
                 "--instance_prompt", f"a photo of {args.token} {class_name}", "--class_prompt", f"a photo of {class_name}"]
    else:
        argv += ["--train_data_dir", args.dataset] + (["--caption_file", args.caption_file] if args.caption_file else [])
    argv += ["--output_dir", str(folder)]
    if args.max_train_steps:
        argv += ["--max_train_steps", str(args.max_train_steps)]
    argv += args.train_args
    settings = trainer_of(args).parse_args(argv)
    if settings.method != variant.method:
        raise UserError(f"{variant.config} trains method {settings.method}, not {variant.method}")
    rate = settings.learning_rate
    if args.lr_relative_to == "paper" and variant.method in METHODS:
        rate = METHODS[variant.method].dreambooth_lr if args.task == "dreambooth" else METHODS[variant.method].s2i_lr
    if rate * variant.lr_multiplier != settings.learning_rate:
        argv += ["--learning_rate", repr(rate * variant.lr_multiplier)]
    if args.select_every:
        # Every checkpoint is a candidate: none may be pruned before the selection.
        argv += ["--checkpointing_steps", str(args.select_every)]
        if settings.checkpoints_total_limit is not None:
            argv += ["--checkpoints_total_limit", str(10**9)]
    if args.task == "dreambooth" and settings.with_prior_preservation and \
            Path(settings.class_data_dir) == folder / "class-images":  # not chosen by the config: share per class
        argv += ["--class_data_dir", str(output_dir / "class-images" / f"{class_name}-{settings.resolution}px")]
    argv += ["--resume_from_checkpoint", "latest"]
    trainer = trainer_of(args)
    return Run(variant, subject, folder, trainer, argv, trainer.parse_args(argv))


def plan_runs(args, protocol) -> list[Run]:
    """Every run, in an order that deals each process a mix of methods (variant order rotates per subject)."""
    variant_list = variants(args)
    if args.task == "s2i":
        return [plan_run(args, v) for v in variant_list]
    subjects = args.subjects or list(protocol.subjects)
    unknown = [s for s in subjects if s not in protocol.subjects]
    if unknown:
        raise UserError(f"--subjects: {unknown[0]!r} is not in {Path(args.dataset, 'prompts_and_classes.txt')}")
    protocol.check_photos(subjects)
    runs = []
    for j, subject in enumerate(subjects):
        for k in range(len(variant_list)):
            variant = variant_list[(j + k) % len(variant_list)]
            runs.append(plan_run(args, variant, subject, protocol.subjects[subject].class_name))
    return runs


def check_settings(args, runs: list[Run]):
    """The first launch writes the reproduction's settings; a later one must ask for the same (methods and
    subjects may be added). Each run's trainer command and config text are checked the same way: a finished
    run is never mixed with one trained otherwise."""
    settings = {"task": args.task, "dataset": args.dataset, "model": args.model,
                "token": getattr(args, "token", None), "caption_file": getattr(args, "caption_file", None),
                "max_train_steps": args.max_train_steps, "train_args": args.train_args, "eval_args": args.eval_args,
                "select_every": args.select_every, "select_by": args.criterion.text,
                "select_prompts": getattr(args, "select_prompts", None),
                "select_images": getattr(args, "select_images", None), "select_maps": getattr(args, "select_maps", None)}
    _same_or_new(Path(args.output_dir, SETTINGS), settings, "this --output_dir holds a reproduction made with")
    for run in runs:
        # what this driver writes in the trainer's folder is ours: the trainer must not take it for a user's
        keep(run.folder, RUN, TRAINED, DONE, FAILED, "train.log", "select.log", selection.SCORES_DIR, selection.SELECTION)
        identity = {"argv": run.argv, "config_text": run.variant.config.read_text()}
        _same_or_new(run.folder / RUN, identity, f"run {run.name} was made with")


def _same_or_new(path: Path, value: dict, what: str):
    saved = read_json(path)
    if saved is None:
        write_json(path, value)
        return
    for key in value:
        if _paths_resolved(saved.get(key)) != _paths_resolved(value[key]):
            raise UserError(f"{what} {key} = {saved.get(key)!r}, but this command asks for {value[key]!r} ({path}); "
                            "use the same settings or another --output_dir")


def _paths_resolved(value):
    """A setting with its paths absolute (`harness.same_path`): a rerun that writes a folder another way
    (absolute instead of relative, a trailing /) asks for the same reproduction."""
    if isinstance(value, list):
        return [_paths_resolved(v) for v in value]
    return same_path(value) if isinstance(value, str) else value


def lock_launch(output_dir, shard, launch_id: str) -> RunLock:
    """Hold `<output_dir>/locks/process-<shard>.lock` while this process works, and refuse to start while a
    process of another launch works in the folder: two launches would train the same runs and write the same
    records. (Killing torchrun or accelerate with SIGKILL leaves its workers running: they hold their locks
    until they end.) The tasks of one Slurm job array share the folder: they count as one launch."""
    folder = Path(output_dir, LOCKS)
    folder.mkdir(parents=True, exist_ok=True)
    mine = f"array {os.environ['SLURM_ARRAY_JOB_ID']}" if shard.in_array and "SLURM_ARRAY_JOB_ID" in os.environ \
        else f"launch {launch_id}"
    user = "a process of another reproduction launch"
    lock = RunLock(folder, f"process-{shard.index}.lock", user, mine).acquire()
    for path in sorted(folder.glob("process-*.lock")):
        if path == lock.path:
            continue
        for _ in range(50):  # a process of this launch may have locked its file and not yet written it
            text = holder_of(path)
            if text is None or (read_holder(text).get("about") is not None and not written_by_an_ended_process(text)):
                break
            time.sleep(0.1)
        if text is not None and read_holder(text).get("about") != mine:
            lock.release()
            raise UserError(f"{output_dir} is in use by {user} ({describe_holder(text)}; {path}): wait for it to "
                            "finish or stop all of its processes (killing torchrun/accelerate with SIGKILL leaves "
                            "them running), or use another --output_dir")
    return lock


# ================================================================================================ one run
def run_status(run: Run, launch_id: str) -> str:
    """done, failed (in this launch; an earlier launch's failure is tried again) or pending."""
    if read_json(run.folder / DONE) is not None:
        return "done"
    failed = read_json(run.folder / FAILED)
    return "failed" if failed is not None and failed.get("launch") == launch_id else "pending"


def record_failure(folder: Path, stage: str, error: str, launch_id: str, name: str):
    write_json(folder / FAILED, {"stage": stage, "error": error, "launch": launch_id})
    print(f"FAILED {name} ({stage}): {error}", flush=True)


def train(run: Run) -> str | None:
    """The trainer as a subprocess of this (already single-process) environment, its output in `train.log`.
    Returns None, or the error line when it failed."""
    log_path = run.folder / "train.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", run.trainer.__name__, *run.argv]
    with open(log_path, "a") as log:
        start = log.tell()
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=stop_with_parent if sys.platform == "linux" else None)
        try:
            code = process.wait()
        finally:  # the driver was stopped: stop its trainer too (it resumes from its checkpoint next time)
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
    if code == 0:
        return None
    with open(log_path) as log:
        log.seek(start)
        return error_line(log.read(), code)


def stop_with_parent():
    """In the trainer's process before it starts: SIGTERM it when the driver dies, however the driver dies
    (SIGKILL included), so no trainer outlives its launch and races the next one (Linux `prctl`)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def error_line(output: str, code: int) -> str:
    """What a failed trainer said: its `error: ...` line, else the last line of its traceback."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    for line in reversed(lines):
        if line.split(":")[0].split(".")[-1].endswith(("Error", "Exception", "Interrupt")):
            return line
    return f"the trainer exited with code {code}" if code > 0 else f"the trainer was killed by signal {-code}"


def call_logged(main, argv: list[str], log_path: Path):
    """An evaluator's `main(argv)` in this process (a plain single process: see shards), its output appended
    to `log_path`. Returns what main returns; raises what it raises, after logging it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"$ {main.__module__} {shlex.join(argv)}", flush=True)
        try:
            return main(argv)
        except Exception as e:
            print(f"error: {e}" if isinstance(e, UserError) else traceback.format_exc(), flush=True)
            raise


def describe_error(e: Exception) -> str:
    return first_line(e) if isinstance(e, UserError) else f"{type(e).__name__}: {first_line(e)}"


def eval_common(args, run: Run) -> list[str]:
    """The evaluator arguments every call for this run's variant shares: dataset, model, the training
    resolution (unless --eval_args says otherwise), then --eval_args."""
    settings = run.settings
    argv = ["--dataset", args.dataset, "--pretrained_model_name_or_path", settings.pretrained_model_name_or_path,
            "--resolution", str(settings.resolution)]
    if args.task == "dreambooth":
        argv += ["--token", args.token]
    else:
        argv += (["--caption_file", args.caption_file] if args.caption_file else []) + \
                (["--conditioning_is_rgb"] if settings.conditioning_is_rgb else [])
    return argv + args.eval_args


def selection_prompts(args, protocol, subject: str) -> list[int]:
    count = len(protocol.prompts_for(subject))
    prompts = args.select_prompts if args.select_prompts is not None else list(range(0, count, 5))
    bad = [p for p in prompts if not 0 <= p < count]
    if bad:
        raise UserError(f"--select_prompts: prompt {bad[0]} is out of range (subject {subject} has {count} prompts)")
    return prompts


def write_manifest(path: Path, entries) -> Path:
    """The evaluator's manifest: for each (subject, prompts, adapter) of `entries`, the adapter for every prompt of
    the subject (paths relative to the file)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["subject", "prompt_index", "adapter"])
    for subject, prompts, adapter in entries:
        relative = os.path.relpath(adapter, path.parent)
        writer.writerows([subject, p, relative] for p in prompts)
    return write_text(path, out.getvalue())


def score_candidate(args, run: Run, protocol, step: int, folder: Path) -> dict:
    """The evaluator on the selection subset for one candidate of `run`; returns its metrics."""
    out = run.folder / selection.SCORES_DIR / f"step-{step}"
    if args.task == "dreambooth":
        prompts = selection_prompts(args, protocol, run.subject)
        manifest = write_manifest(out / "manifest.csv", [(run.subject, prompts, folder / ADAPTER_FILE)])
        argv = eval_common(args, run) + ["--manifest", str(manifest), "--output_dir", str(out), "--subjects",
                                         run.subject, "--prompts", ",".join(map(str, prompts)),
                                         "--images_per_prompt", str(args.select_images)]
        main = dreambooth_eval.main
    else:
        argv = eval_common(args, run) + ["--control_dir", str(folder), "--output_dir", str(out),
                                         "--limit", str(args.select_maps)]
        main = s2i_eval.main
    return call_logged(main, argv, run.folder / "select.log")["metrics"]


def selection_subset(args) -> str:
    if args.task == "dreambooth":
        prompts = "every 5th prompt" if args.select_prompts is None else f"prompts {args.select_prompts}"
        return f"the run's subject, {prompts}, {args.select_images} images each"
    return f"the first {args.select_maps} validation maps"


def parameter_counts(args, candidate: Path) -> dict:
    counts = {"adapter": reproduce_report.tensor_elements(candidate / ADAPTER_FILE)}
    if args.task == "s2i":
        counts["encoder"] = reproduce_report.tensor_elements(candidate / ENCODER_WEIGHTS)
    return counts


def do_run(args, run: Run, protocol, launch_id: str) -> bool:
    """Train (unless trained), select, record done. Returns True when the run is done."""
    (run.folder / FAILED).unlink(missing_ok=True)  # an earlier launch's failure: try again
    if read_json(run.folder / TRAINED) is None:
        error = train(run)
        if error is not None:
            record_failure(run.folder, "train", error, launch_id, run.name)
            return False
        write_json(run.folder / TRAINED, {"final_step": selection.final_step(run.folder)})
    try:
        record = selection.select(run.folder, args.select_every, args.criterion,
                                  lambda step, folder: score_candidate(args, run, protocol, step, folder),
                                  selection_subset(args))
    except Exception as e:  # noqa: BLE001 - recorded with its line (and logged in select.log); the others go on
        record_failure(run.folder, "select", describe_error(e), launch_id, run.name)
        return False
    chosen = run.folder / record["selected"]["path"]
    # `id` is new for every incarnation of the run: evaluation images of an earlier one are never reused.
    rates = {"learning_rate": run.settings.learning_rate}  # the multiplier is in the trainer's arguments already
    if args.task == "s2i":
        rates["encoder_learning_rate"] = run.settings.encoder_learning_rate
    write_json(run.folder / DONE, {"run": run.name, "id": uuid.uuid4().hex, **rates,
                                   "selected_step": record["selected"]["step"], "selected": record["selected"]["path"],
                                   "parameters": parameter_counts(args, chosen)})
    return True


# ================================================================================================ progress
class Progress:
    """Runs done / left, elapsed time and an estimate, printed as each run of this process ends."""

    def __init__(self, shard, runs: list[Run], mine: list[Run], launch_id: str):
        self.shard, self.runs, self.mine, self.launch_id = shard, runs, mine, launch_id
        self.start = time.monotonic()
        self.worked, self.finished = 0.0, 0

    def counts(self, runs) -> dict:
        states = [run_status(run, self.launch_id) for run in runs]
        return {s: states.count(s) for s in ("done", "failed", "pending")}

    def report(self, run: Run, seconds: float, ok: bool):
        self.worked += seconds
        self.finished += 1
        left = sum(run_status(r, self.launch_id) == "pending" for r in self.mine)
        estimate = self.worked / self.finished * left
        everyone = self.counts(self.runs)
        print(f"[{self.shard.name()}] {'done' if ok else 'FAILED'} {run.name} in {_duration(seconds)}; this process: "
              f"{len(self.mine) - left}/{len(self.mine)} runs finished, elapsed {_duration(time.monotonic() - self.start)}, "
              f"about {_duration(estimate)} left; all: {everyone['done']} done, {everyone['failed']} failed, "
              f"{everyone['pending']} to go", flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def wait_until(finished, what: str, shard) -> None:
    """Poll until `finished()` returns an empty list of what is still running elsewhere."""
    last_print = 0.0
    while True:
        left = finished()
        if not left:
            return
        if time.monotonic() - last_print > 60:
            print(f"[{shard.name()}] waiting for {len(left)} {what} on other processes: "
                  f"{', '.join(left[:4])}{' ...' if len(left) > 4 else ''}", flush=True)
            last_print = time.monotonic()
        time.sleep(POLL_SECONDS)


# ================================================================================================ evaluation
# Each evaluation task writes `<record>.json` with complete=false before it starts and complete=true when it
# ends, naming the runs (their done.json) it evaluates; a failure goes to `<record>.failed.json` with the launch.
# Images left by a stopped task are kept when the record names the same runs, and removed otherwise.
def done_record(run: Run) -> dict | None:
    return read_json(run.folder / DONE)


def eval_folder(args, variant: Variant) -> Path:
    return Path(args.output_dir, EVAL_DIR, variant.name)


def generation_record(args, run: Run) -> Path:
    return eval_folder(args, run.variant) / "generated" / f"{run.subject}.json"


def scoring_record(args, variant: Variant) -> Path:
    return eval_folder(args, variant) / "scored.json"


def failure_path(record: Path) -> Path:
    return record.with_name(record.stem + ".failed.json")


def is_complete(record: Path, inputs) -> bool:
    saved = read_json(record)
    return bool(saved and saved.get("complete") and saved.get("inputs") == inputs)


def task_finished(record: Path, inputs, launch_id: str) -> bool:
    """Complete for these inputs, or failed in this launch."""
    failed = read_json(failure_path(record))
    return is_complete(record, inputs) or bool(failed and failed.get("launch") == launch_id)


def run_task(records, work, what: str, launch_id: str) -> bool:
    """`work()` (one evaluator call) for `records`, a list of (record, inputs, stale folders): unless every record
    is complete for its inputs. A record's stale folders are removed first when it names other inputs. Returns
    whether they are complete."""
    pending = [(record, inputs, stale) for record, inputs, stale in records if not is_complete(record, inputs)]
    if not pending:
        return True
    for record, inputs, stale in pending:
        saved = read_json(record)
        if saved is None or saved.get("inputs") != inputs:
            for folder in stale:
                shutil.rmtree(folder, ignore_errors=True)
        failure_path(record).unlink(missing_ok=True)
        write_json(record, {"inputs": inputs, "complete": False})
    try:
        result = work()
    except Exception as e:  # noqa: BLE001 - recorded with its line (the log has the rest); the others go on
        for record, _, _ in pending:
            write_json(failure_path(record), {"error": describe_error(e), "launch": launch_id})
        print(f"FAILED {what}: {describe_error(e)}", flush=True)
        return False
    for record, inputs, _ in pending:
        write_json(record, {"inputs": inputs, "complete": True, "metrics": (result or {}).get("metrics")})
    return True


def generation_groups(args, runs: list[Run]) -> list[list[Run]]:
    """The done runs of each variant, `--subjects_per_batch` at a time: one evaluator call each."""
    by_variant = {}
    for run in done_runs(runs):
        by_variant.setdefault(run.variant, []).append(run)
    return [group[i:i + args.subjects_per_batch] for group in by_variant.values()
            for i in range(0, len(group), args.subjects_per_batch)]


def generate(args, group: list[Run], protocol, launch_id: str) -> bool:
    """DreamBooth: the evaluation images of runs of one variant (`--skip_metrics`), each subject with its run's
    selected adapter, those not generated yet in one batch (`--subjects_per_batch`), or one at a time where
    their adapter files cannot share a batch (a text-encoder part)."""
    out = eval_folder(args, group[0].variant)
    done = {run.subject: done_record(run) for run in group}  # one run per subject in a variant's group
    todo = [run for run in group if not is_complete(generation_record(args, run), done[run.subject])]
    if not todo:
        return True
    adapters = {run.subject: run.folder / done[run.subject]["selected"] / ADAPTER_FILE for run in todo}
    subjects = ",".join(adapters)

    def work():
        manifest = write_manifest(out / "manifests" / f"{todo[0].subject}.csv",
                                  [(run.subject, range(len(protocol.prompts_for(run.subject))), adapters[run.subject])
                                   for run in todo])
        per_batch = len(todo)
        if per_batch > 1:
            try:
                adapter_batch.check_batchable(adapters.values())
            except UserError as e:
                print(f"{group[0].variant.name}: one subject per batch: {first_line(e)}", flush=True)
                per_batch = 1
        argv = eval_common(args, group[0]) + ["--manifest", str(manifest), "--output_dir", str(out), "--subjects",
                                              subjects, "--skip_metrics", "--subjects_per_batch", str(per_batch)]
        return call_logged(dreambooth_eval.main, argv, out / "eval.log")

    tasks = [(generation_record(args, run), done[run.subject], [out / run.subject]) for run in todo]
    return run_task(tasks, work, f"generation for {group[0].variant.name}: {subjects}", launch_id)


def scoring_inputs(args, variant: Variant, runs: list[Run]) -> list[dict]:
    """What one variant's scoring covers: the done.json of each of its runs that is done (DreamBooth: and
    whose images are generated)."""
    inputs = []
    for run in runs:
        done = done_record(run) if run.variant == variant else None
        if done is None:
            continue
        if args.task == "dreambooth" and not is_complete(generation_record(args, run), done):
            continue
        inputs.append(done)
    return inputs


def score(args, variant: Variant, runs: list[Run], launch_id: str) -> bool:
    """Score a variant: DreamBooth on the images generated for its runs (`--skip_generation`); S2I generates
    from the selected checkpoint and scores."""
    out = eval_folder(args, variant)
    inputs = scoring_inputs(args, variant, runs)
    record = scoring_record(args, variant)
    if not inputs:
        failure_path(record).unlink(missing_ok=True)
        write_json(failure_path(record), {"error": "no run of this method finished", "launch": launch_id})
        return False
    by_name = {run.name: run for run in runs}
    first = by_name[inputs[0]["run"]]
    if args.task == "dreambooth":
        subjects = [by_name[done["run"]].subject for done in inputs]
        argv = eval_common(args, first) + ["--output_dir", str(out), "--subjects", ",".join(subjects), "--skip_generation"]
        main, stale = dreambooth_eval.main, []
    else:
        argv = eval_common(args, first) + ["--control_dir", str(first.folder / inputs[0]["selected"]),
                                           "--output_dir", str(out)]
        main, stale = s2i_eval.main, [out / "images"]
    return run_task([(record, inputs, stale)], lambda: call_logged(main, argv, out / "eval.log"),
                    f"evaluation of {variant.name}", launch_id)


# ================================================================================================ main
def launch_runs(runs: list[Run], shard) -> list[Run]:
    """The runs of this launch's processes (all of them, except in a Slurm job array)."""
    return [run for i, run in enumerate(runs) if i % shard.count in shard.launch_shards]


def train_stage(args, runs, shard, protocol, launch_id) -> None:
    mine = shard.mine(runs)
    pending = [run for run in mine if run_status(run, launch_id) != "done"]
    print(f"[{shard.name()}] {len(runs)} runs in all; this process: {len(mine)} runs, {len(mine) - len(pending)} "
          f"already done", flush=True)
    progress = Progress(shard, runs, mine, launch_id)
    for run in pending:
        start = time.monotonic()
        ok = do_run(args, run, protocol, launch_id)
        progress.report(run, time.monotonic() - start, ok)


def wait_for_runs(runs, shard, launch_id) -> None:
    wait_until(lambda: [r.name for r in runs if run_status(r, launch_id) == "pending"], "runs", shard)


def evaluate_stage(args, runs, variant_list, shard, protocol, launch_id) -> None:
    """Generation (DreamBooth: one task per done run), then scoring (one task per variant), each task by
    the process whose turn it is; the first process waits for all and writes the report."""
    if args.task == "dreambooth":
        generation = done_runs(runs)
        for group in shard.mine(generation_groups(args, runs)):
            generate(args, group, protocol, launch_id)
    for variant in shard.mine(variant_list):
        if args.task == "dreambooth":
            wait_until(lambda: [r.name for r in generation if r.variant == variant and not task_finished(
                generation_record(args, r), done_record(r), launch_id)], "generation tasks", shard)
        score(args, variant, runs, launch_id)
    if shard.reports:
        wait_until(lambda: [v.name for v in variant_list if not task_finished(
            scoring_record(args, v), scoring_inputs(args, v, runs), launch_id)], "evaluations", shard)


def done_runs(runs: list[Run]) -> list[Run]:
    return [run for run in runs if done_record(run) is not None]


def report(args, runs: list[Run], variant_list: list[Variant], launch_id: str) -> dict:
    """Gather the records into the report (`reproduce_report.write_report`)."""
    out = Path(args.output_dir)
    run_rows, failures, rows, eval_dirs = [], [], [], {}
    order = {variant: i for i, variant in enumerate(variant_list)}
    runs = sorted(runs, key=lambda run: order[run.variant])  # stable: subjects stay in the dataset's order
    for run in runs:
        done, failed = done_record(run), read_json(run.folder / FAILED)
        if done is not None:
            run_rows.append({"run": run.name, "status": "done", "selected_step": done["selected_step"],
                             **{k: v for k, v in done.items() if k.endswith("learning_rate")}})
        else:
            status = "failed" if failed else "not trained"
            run_rows.append({"run": run.name, "status": status})
            failures.append({"what": run.name, "stage": failed["stage"] if failed else "train",
                             "error": failed["error"] if failed else "not trained yet (run --stage train)"})
        if done is not None and args.task == "dreambooth":
            failed_generation = read_json(failure_path(generation_record(args, run)))
            if failed_generation and not is_complete(generation_record(args, run), done):
                failures.append({"what": run.name, "stage": "generate", "error": failed_generation["error"]})
    for variant in variant_list:
        record = read_json(scoring_record(args, variant))
        inputs = scoring_inputs(args, variant, runs)
        complete = is_complete(scoring_record(args, variant), inputs)
        failed = read_json(failure_path(scoring_record(args, variant)))
        if not complete and failed:
            failures.append({"what": variant.name, "stage": "evaluate", "error": failed["error"]})
        scored = {"scored": {"runs": inputs}, "metrics": record["metrics"]} if complete else None
        rows.append(reproduce_report.our_row(args.task, variant, inputs, scored))
        if complete:
            eval_dirs[variant.name] = eval_folder(args, variant)
    first_eval = next(iter(eval_dirs.values()), None)
    settings = read_json(out / SETTINGS)
    if args.task == "dreambooth":
        records = {(run.variant.name, run.subject): done_record(run) or {} for run in runs}
        per_subject = reproduce_report.per_subject_csv(eval_dirs, records)
        subjects = list(dict.fromkeys(run.subject for run in runs))
        grids = reproduce_report.dreambooth_grids(out, subjects, eval_dirs)
    else:
        per_subject = None
        first = runs[0]
        dataset_args = s2i_eval.parse_args(eval_common(args, first) + ["--output_dir", str(out), "--skip_generation"])
        grids = reproduce_report.s2i_grid(out, s2i_eval.load_dataset(dataset_args), eval_dirs)
    selection_text = (f"every {args.select_every} steps, the best by {args.criterion.text} on "
                      f"{selection_subset(args)} (earliest step on a tie)" if args.select_every
                      else "none: the final adapter of each run")
    settings["models"] = list(dict.fromkeys(run.settings.pretrained_model_name_or_path for run in runs))
    return reproduce_report.write_report(
        out, args.task, settings, selection_text, rows, run_rows, failures, grids,
        reproduce_report.evaluator_settings(first_eval) if first_eval else None, per_subject,
        list(eval_dirs))


def stop_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through `train`, which stops the trainer it started


def main(argv=None):
    args = parse_args(argv)
    shard = shards.shard_from_environment()
    if shard.in_array and args.stage != "train":
        raise UserError("in a Slurm job array use --stage train, then --stage evaluate in one job after the array "
                        "(see docs/reproduce.md)")
    launch_id = shards.agree_on_launch_id(shard)
    lock = lock_launch(args.output_dir, shard, launch_id)
    try:
        return run_launch(args, shard, launch_id)
    finally:
        lock.release()


def run_launch(args, shard, launch_id: str) -> int:
    """This process's part of the reproduction (its lock held): train, evaluate, report; the exit code."""
    threads = shards.run_as_single_process(shard)
    signal.signal(signal.SIGTERM, stop_on_sigterm)

    protocol = load_protocol(args.dataset) if args.task == "dreambooth" else None
    runs = plan_runs(args, protocol)
    variant_list = list(dict.fromkeys(run.variant for run in runs))
    check_settings(args, runs)
    print(f"[{shard.name()}] {args.task}: {len(runs)} runs ({len(variant_list)} methods), {threads} thread(s) per "
          f"process, output {args.output_dir}", flush=True)

    if args.stage in ("all", "train"):
        train_stage(args, runs, shard, protocol, launch_id)
    mine = launch_runs(runs, shard)
    if args.stage == "train":
        if not shard.reports:  # the launch's first process speaks for it (an early non-zero exit would stop
            return 0           # torchrun's other processes)
        wait_for_runs(mine, shard, launch_id)
        failed = [r.name for r in mine if run_status(r, launch_id) != "done"]
        print(f"[{shard.name()}] trained: {len(mine) - len(failed)} of {len(mine)} runs done"
              + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
        return 1 if failed else 0
    if args.stage == "all":
        wait_for_runs(runs, shard, launch_id)
    evaluate_stage(args, runs, variant_list, shard, protocol, launch_id)
    if not shard.reports:
        return 0
    result = report(args, runs, variant_list, launch_id)
    print(f"wrote {Path(args.output_dir, 'report.md')}", flush=True)
    for failure in result["failed"]:
        print(f"FAILED {failure['what']} ({failure['stage']}): {failure['error']}", flush=True)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
