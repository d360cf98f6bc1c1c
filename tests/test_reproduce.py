"""evaluate/reproduce.py. DreamBooth: a toy-world subject (of two in the dataset) x 2 methods on `builtin:toy-sd` with stand-in
backbones, on two processes (`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2`, one thread each, its workers and
their trainers forked from this process: tests/forked.py): every run
trained exactly once as its own single process, a stop in the middle and a restart give the same report as one
go, the paper's rows are the paper's numbers. The pieces (selection, sharding, config lookup) on their own. S2I:
test_reproduce_s2i.py."""
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reproduce_helpers import drive, launch, runs_of, start, trainer_starts
from forked import hold_in_a_child

from ether_diffusion.adapters.methods import METHODS
from ether_diffusion.errors import UserError
from ether_diffusion.toy import world
from evaluate import reproduce, selection, shards
from evaluate.paper_tables import TABLE_2
from evaluate.protocol import load_protocol
from evaluate.tiny_backbones import write_tiny_backbones

SUBJECTS = ("star_toy", "heart_toy")  # two of the toy world's subjects, class "toy", in the dataset
SUBJECT = "star_toy"  # the one the launches reproduce (--subjects): two runs, one per process
CONFIG = """pretrained_model_name_or_path: builtin:toy-sd
method: {method}
resolution: 32
train_batch_size: 1
max_train_steps: 2
learning_rate: {lr}
with_prior_preservation: true
num_class_images: 1
class_inference_steps: 1
seed: 0
num_validation_images: 1
validation_inference_steps: 1
validation_steps: 1000
report_to: none
distance_logging_steps: 0
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    configs = root / "configs"
    configs.mkdir()
    (configs / "etherplus.yaml").write_text(CONFIG.format(method="ether+", lr="6e-3"))
    (configs / "dreambooth-lora.yaml").write_text(CONFIG.format(method="lora", lr="6e-4"))  # the toy configs' naming
    b = write_tiny_backbones(root / "backbones")
    eval_args = (f"--dino {b['dino']} --clip {b['clip']} --lpips_net {b['lpips']} --lpips_resolution 64 "
                 "--prompts 0,1 --images_per_prompt 1 --num_inference_steps 1")
    dataset = world.write_subjects(root / "dataset", SUBJECTS, count=2)
    return {"root": root, "dataset": dataset, "configs": configs, "eval_args": eval_args}


def command(setup, out, methods="ether+,lora", extra=()):
    """The driver's arguments (after `python -m evaluate.reproduce`)."""
    return ["dreambooth", "--dataset", str(setup["dataset"]), "--config_dir", str(setup["configs"]), "--methods",
            methods, "--subjects", SUBJECT, "--output_dir", str(out), "--select_every", "1", "--select_prompts", "0",
            "--select_images", "1", "--eval_args", setup["eval_args"], *extra]


@pytest.fixture(scope="module")
def one_go(setup):
    out = setup["root"] / "one_go"
    return out, launch(command(setup, out), processes=2)


def test_every_run_is_trained_exactly_once_on_its_own(one_go):
    out, result = one_go
    runs = runs_of(out)
    assert sorted(runs) == [f"ether+/{SUBJECT}", f"lora/{SUBJECT}"]
    for name, run_dir in runs.items():
        assert trainer_starts(run_dir) == 1, name
        log = (run_dir / "train.log").read_text()
        # a plain single process: no process group spans two runs
        assert re.search(r"Distributed environment: (DistributedType\.)?NO\b", log) and "Num processes: 1" in log
        steps = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        assert steps == [1, 2], name
        assert (run_dir / "done.json").is_file() and not (run_dir / "failed.json").exists()
    # both processes trained, and the progress line counts runs and time
    for process in ("1/2", "2/2"):
        assert f"[process {process}] done " in result.stdout
    assert "runs finished, elapsed" in result.stdout and "left; all:" in result.stdout
    # the runs of a class shared its class images (both methods' runs are of a toy)
    assert sorted(p.name for p in (out / "class-images").iterdir()) == ["toy-32px"]


def test_selection_is_recorded_in_each_run(one_go):
    out, _ = one_go
    for name, run_dir in runs_of(out).items():
        record = json.loads((run_dir / "selection.json").read_text())
        assert [c["step"] for c in record["candidates"]] == [1, 2]
        assert record["criterion"] == "dino+clip_t"
        scores = {c["step"]: c["metrics"]["dino"] + c["metrics"]["clip_t"] for c in record["candidates"]}
        best = max(scores, key=lambda step: (scores[step], -step))
        assert record["selected"] == {"step": best, "path": f"checkpoint-{best}"}
        done = json.loads((run_dir / "done.json").read_text())
        assert done["selected_step"] == best and done["parameters"]["adapter"] > 0


def test_report_has_the_papers_rows_and_ours(one_go):
    out, _ = one_go
    report = json.loads((out / "report.json").read_text())
    assert report["paper"]["rows"] == [list(row) for row in TABLE_2]
    md = (out / "report.md").read_text()
    for method, params, dino, clip_i, clip_t, lpips in TABLE_2:
        cells = [f"{v:.3f}" if v is not None else "" for v in (dino, clip_i, clip_t, lpips)]
        assert f"| {method} (paper) | {params or ''} | {' | '.join(cells)} |" in md
    ours = {row["variant"]: row for row in report["ours"]}
    assert set(ours) == {"ether+", "lora"} and ours["ether+"]["paper_row"] == "ETHER+"
    # ETHER+ n=1 on q/k/v/out: 2 (in + out) per layer, 28 C + 512 per transformer block of width C
    # (cross-attention keys/values from 128), three blocks of 64 and seven of 128 in the toy UNet
    assert ours["ether+"]["parameters"]["adapter"] == 3 * (28 * 64 + 512) + 7 * (28 * 128 + 512)
    assert all(row["runs_scored"] == 1 and 0 < row["metrics"]["dino"] <= 1 for row in ours.values())
    assert report["failed"] == []
    subjects = (out / "per_subject.csv").read_text().splitlines()
    assert subjects[0].startswith("subject,class,method,selected_step") and len(subjects) == 1 + 2
    assert Image.open(out / "grids" / f"{SUBJECT}.png").size == (2 * 32, 2 * 32)  # methods x prompts
    assert not (out / "grids" / "heart_toy.png").exists()  # not asked for


def test_stop_in_the_middle_and_restart_gives_the_same_report(setup, one_go):
    """Stopped and restarted on one process (plain python): the same report as the one go on two."""
    reference, _ = one_go
    out = setup["root"] / "stopped"
    process = start(command(setup, out))
    deadline = time.monotonic() + 600
    while not list(out.glob("runs/*/*/done.json")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the launch's session: the driver and its trainer
    process.wait()
    deadline = time.monotonic() + 60
    while live_processes_in_session(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not live_processes_in_session(process.pid)
    finished = {name for name, run_dir in runs_of(out).items() if (run_dir / "done.json").is_file()}
    assert finished and not (out / "report.json").exists()  # stopped in the middle

    assert drive(command(setup, out)) == 0  # the restart, in this process
    for name in ("report.json", "report.md", "per_subject.csv", f"grids/{SUBJECT}.png"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    for name, run_dir in runs_of(out).items():
        if name in finished:
            assert trainer_starts(run_dir) == 1, name  # finished work is not redone


def moved_adapter(path: Path, seed: int, text_encoder: bool = False):
    """Rewrite an adapter file with its tensors moved (another subject's adapter, as training would make it), and
    with a text-encoder part (`--train_text_encoder`) if asked."""
    from safetensors import safe_open

    from ether_diffusion import inject_adapters, save_adapter
    from ether_diffusion.adapters import adapter_config_of, adapter_parameters, text_encoder_config
    from ether_diffusion.pipelines import load_pipeline

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    pipe = load_pipeline("builtin:toy-sd", adapter=path)
    if text_encoder:
        inject_adapters(pipe.text_encoder, text_encoder_config(adapter_config_of(pipe.unet)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder) if text_encoder else (pipe.unet,):
            for p in adapter_parameters(model):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    save_adapter(pipe.unet, path, extra_metadata=metadata, text_encoder=pipe.text_encoder if text_encoder else None)


def test_a_methods_subjects_are_generated_in_one_batch_as_one_at_a_time(setup, one_go, tmp_path, capsys):
    """--subjects_per_batch (default 4): the done runs of a method are generated in one evaluator call, both subjects
    in each batch, each through its own adapter: the images of one subject at a time. Adapter files that cannot
    share a batch (a text-encoder part) are generated one subject at a time, said in a line."""
    trained = runs_of(one_go[0])[f"ether+/{SUBJECT}"]

    def generate(out, *extra, text_encoder=False):
        argv = command(setup, out, methods="ether+", extra=["--subjects", ",".join(SUBJECTS), *extra])
        args = reproduce.parse_args(argv)
        protocol = load_protocol(args.dataset)
        runs = reproduce.plan_runs(args, protocol)
        for i, run in enumerate(runs):  # both done, with the trained run's selected adapter moved per subject
            shutil.copytree(trained, run.folder)
            moved_adapter(run.folder / reproduce.done_record(run)["selected"] / "adapter.safetensors", i, text_encoder)
        groups = reproduce.generation_groups(args, runs)
        assert all(reproduce.generate(args, group, protocol, "launch") for group in groups)
        assert all(reproduce.is_complete(reproduce.generation_record(args, run), reproduce.done_record(run)) for run in runs)
        return [[run.subject for run in group] for group in groups], (out / "eval" / "ether+" / "eval.log").read_text()

    groups, log = generate(tmp_path / "batched")
    assert groups == [list(SUBJECTS)] and log.count("--subjects_per_batch 2") == 1
    groups, log = generate(tmp_path / "one", "--subjects_per_batch", "1")
    assert groups == [[subject] for subject in SUBJECTS] and log.count("--subjects_per_batch 1") == 2
    images = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one" / "eval").rglob("*/[0-9]/*.png"))
    assert len(images) == len(SUBJECTS) * 2  # two prompts (--prompts 0,1), one image each
    for image in images:
        a, b = (np.asarray(Image.open(root / image), dtype=np.int16) for root in (tmp_path / "batched", tmp_path / "one"))
        assert np.abs(a - b).max() <= 1, image
    star, heart = (np.asarray(Image.open(tmp_path / "one" / "eval" / "ether+" / s / "0" / "00.png"), dtype=np.int16)
                   for s in SUBJECTS)
    assert np.abs(star - heart).max() > 10  # the subjects' adapters differ

    capsys.readouterr()
    groups, log = generate(tmp_path / "text_encoder", text_encoder=True)
    said = capsys.readouterr().out
    assert groups == [list(SUBJECTS)] and "--subjects_per_batch 1" in log and "--subjects_per_batch 2" not in log
    assert "ether+: one subject per batch: " in said and "holds a text-encoder adapter" in said, said


def live_processes_in_session(session: int) -> list[int]:
    """The pids of the live processes (not zombies) of a session."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
            if proc.name.isdigit() and int(fields[3]) == session and fields[0] != "Z":
                pids.append(int(proc.name))
    return pids


def test_a_second_launch_on_a_folder_in_use_is_refused(tmp_path):
    """A process of another launch holds its lock in the folder (as the workers of a torchrun killed with
    SIGKILL do): a new launch stops at once with its pid; once it is gone, its lock file is stale."""
    with hold_in_a_child(reproduce.lock_launch, tmp_path, shards.shard_from_environment({}), "old") as holder:
        second = shards.shard_from_environment({"RANK": "1", "WORLD_SIZE": "2"})
        with pytest.raises(UserError, match=f"is in use by a process of another reproduction launch \\(pid {holder.pid} "):
            reproduce.lock_launch(tmp_path, second, "new")
        reproduce.lock_launch(tmp_path, second, "old").release()  # a process of the same launch is welcome
    assert reproduce.lock_launch(tmp_path, shards.shard_from_environment({}), "new").file is not None


def test_a_killed_launchs_text_in_a_lock_just_taken_over_is_not_taken_for_a_holder(tmp_path):
    """The restart after a kill: one process of the new launch has locked its file but not yet replaced the
    killed process's text in it; another process of the new launch waits for the text instead of refusing
    (the stop-and-restart test failed so, now and then)."""
    with hold_in_a_child(lambda: None) as ended:
        pass  # then killed: a pid no process has any more
    locks = tmp_path / "locks"
    locks.mkdir()
    old = json.dumps({"pid": ended.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00",
                      "command": "killed", "about": "launch old"})
    (locks / "process-1.lock").write_text(old + "\n")

    def take_over(path):  # locks the file at once, writes its own text a second later
        f = open(path, "a+")
        fcntl.flock(f, fcntl.LOCK_EX)
        threading.Timer(1, write_text_of_the_new_launch, (f,)).start()
        return f

    with hold_in_a_child(take_over, locks / "process-1.lock"):
        reproduce.lock_launch(tmp_path, shards.shard_from_environment({"RANK": "0", "WORLD_SIZE": "2"}), "new").release()


def write_text_of_the_new_launch(f):
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now", "command": "new",
                        "about": "launch new"}))
    f.flush()


# ------------------------------------------------------------------------------------------ the pieces
def test_criterion_and_selection(tmp_path):
    criterion = selection.Criterion.parse("dino + clip_t", ("dino", "clip_t", "fid"))
    assert criterion.score({"dino": 0.5, "clip_t": 0.25}) == 0.75
    assert criterion.score({"dino": float("nan"), "clip_t": 0.25}) is None
    assert selection.Criterion.parse("miou-fid", ("miou", "fid")).score({"miou": 0.3, "fid": 10.0}) == pytest.approx(-9.7)
    for bad, message in (("dino*2", "expected metric names"), ("dinoo", "unknown metric 'dinoo'")):
        with pytest.raises(UserError, match=message):
            selection.Criterion.parse(bad, ("dino", "clip_t"))

    run_dir = tmp_path / "run"
    for step in (2, 4, 6):
        (run_dir / f"checkpoint-{step}").mkdir(parents=True)
        (run_dir / f"checkpoint-{step}" / "state.json").write_text("{}")
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)))
    assert [s for s, _ in selection.candidates(run_dir, 2)] == [2, 4, 6, 7]  # the final output is step 7
    assert [s for s, _ in selection.candidates(run_dir, 4)] == [4, 7]
    assert selection.candidates(run_dir, 0) == [(7, run_dir)]  # --select_every 0: the final output alone
    values = {2: 0.5, 4: 0.75, 6: 0.75, 7: None}  # None: not computed (all images black)
    scored = []

    def score(step, folder):
        scored.append(step)
        return {"dino": values[step], "clip_t": 0.0}

    record = selection.select(run_dir, 2, criterion, score, "a subset")
    assert record["selected"] == {"step": 4, "path": "checkpoint-4"}  # the earliest of the tied best
    assert record["candidates"][-1] == {"step": 7, "path": ".", "metrics": {"dino": None, "clip_t": 0.0}, "score": None}
    assert json.loads((run_dir / "selection.json").read_text()) == record
    selection.select(run_dir, 2, criterion, score, "a subset")  # scores are kept: nothing is scored twice
    assert scored == [2, 4, 6, 7]
    one = selection.select(run_dir, 0, criterion, score, "a subset")  # one candidate: nothing to score
    assert one["selected"] == {"step": 7, "path": "."} and one["candidates"][0]["metrics"] is None
    assert scored == [2, 4, 6, 7] and one["criterion"] == "the final output (one candidate)"


@pytest.mark.parametrize("task, flag", [("dreambooth", "--select_images"), ("dreambooth", "--subjects_per_batch"),
                                        ("dreambooth", "--max_train_steps"), ("s2i", "--select_maps")])
def test_counts_below_one_are_refused_naming_the_flag(task, flag):
    with pytest.raises(UserError, match=f"^{flag} must be at least 1, got 0$"):
        reproduce.parse_args([task, "--dataset", "d", "--methods", "ether", "--output_dir", "o", flag, "0"])


def test_shards_from_the_launchers_environment():
    torchrun = shards.shard_from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (torchrun.index, torchrun.count, torchrun.local_rank, torchrun.in_array) == (3, 4, 1, False)
    assert torchrun.mine(list(range(10))) == [3, 7] and not torchrun.reports
    array = shards.shard_from_environment({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1",
                                           "SLURM_ARRAY_TASK_COUNT": "8"})
    assert (array.index, array.count, array.in_array, array.reports) == (4, 8, True, True)
    both = shards.shard_from_environment({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2",
                                          "RANK": "1", "WORLD_SIZE": "2"})
    assert (both.index, both.count, list(both.launch_shards)) == (3, 4, [2, 3])
    assert shards.shard_from_environment({}).count == 1

    environ = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
               "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "x", "CUDA_VISIBLE_DEVICES": "4,6",
               "OMP_NUM_THREADS": str(__import__("torch").get_num_threads()), "HOME": "/root"}
    shards.run_as_single_process(shards.shard_from_environment(environ), environ)
    assert environ == {"CUDA_VISIBLE_DEVICES": "6", "OMP_NUM_THREADS": environ["OMP_NUM_THREADS"], "HOME": "/root"}


@pytest.mark.user_error("a method without a config, or a config of another method", tool="evaluate/reproduce.py")
def test_configs_are_found_by_method_or_refused(setup, tmp_path):
    base = ["dreambooth", "--dataset", str(setup["dataset"]), "--output_dir", str(tmp_path / "o")]
    args = reproduce.parse_args(base + ["--config_dir", str(setup["configs"]), "--methods", "ether+,lora"])
    assert [v.config.name for v in reproduce.variants(args)] == ["etherplus.yaml", "dreambooth-lora.yaml"]
    args = reproduce.parse_args(base + ["--config_dir", str(setup["configs"]), "--methods", "oft"])
    with pytest.raises(UserError, match="no config for method oft in .* \\(looked for oft.yaml or dreambooth-oft.yaml\\)"):
        reproduce.variants(args)
    args = reproduce.parse_args(base + ["--config", f"ether={setup['configs'] / 'etherplus.yaml'}", "--methods", "ether"])
    with pytest.raises(UserError, match="etherplus.yaml trains method ether\\+, not ether"):
        reproduce.plan_runs(args, reproduce.load_protocol(setup["dataset"]))
    with pytest.raises(UserError, match="--eval_args: --output_dir is set by the driver"):
        reproduce.parse_args(base + ["--methods", "ether", "--eval_args", "--output_dir x"])


@pytest.mark.user_error("a rerun with the same folders written as absolute paths (relative the first time)",
                        tool="evaluate/reproduce.py")
def test_a_rerun_with_the_folders_written_otherwise_is_the_same_reproduction(setup, tmp_path, monkeypatch):
    monkeypatch.chdir(setup["root"])

    def launch(out, dataset, configs, *extra):
        args = reproduce.parse_args(["dreambooth", "--dataset", dataset, "--config_dir", configs, "--methods", "ether+",
                                     "--subjects", SUBJECT, "--output_dir", out, *extra])
        reproduce.check_settings(args, reproduce.plan_runs(args, reproduce.load_protocol(args.dataset)))

    out = os.path.relpath(tmp_path / "o")  # relative to the working folder
    launch(out, "dataset", "configs")
    launch(f"{tmp_path / 'o'}/", str(setup["dataset"]), f"{setup['configs']}/")  # absolute, trailing /
    with pytest.raises(UserError, match="reproduction made with max_train_steps = None, but this command asks for 3"):
        launch(out, "dataset", "configs", "--max_train_steps", "3")  # a real change is still refused


@pytest.mark.user_error("--stage all inside a Slurm job array", tool="evaluate/reproduce.py")
def test_a_job_array_trains_only(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    with pytest.raises(UserError, match="in a Slurm job array use --stage train"):
        reproduce.main(["dreambooth", "--dataset", str(setup["dataset"]), "--methods", "ether+",
                        "--config_dir", str(setup["configs"]), "--output_dir", str(tmp_path / "o")])


def test_learning_rate_outcomes_are_read_beside_the_runs_distances(one_go, tmp_path):
    """benchmarks/lr_robustness.py --from_reproduction: one row per variant with the report's metrics and the
    distances of its runs' selected adapters; a plot and a table."""
    from benchmarks import lr_robustness

    out, _ = one_go
    task, rows = lr_robustness.outcomes_from_reproduction(out)
    report = json.loads((out / "report.json").read_text())
    assert task == "dreambooth" and [r["method"] for r in rows] == [row["method"] for row in report["ours"]]
    by_method = {r["method"]: r for r in rows}
    assert by_method["ether+"]["dino"] == next(r["metrics"]["dino"] for r in report["ours"] if r["method"] == "ether+")
    assert by_method["ether+"]["runs"] == 1 and 0 < by_method["ether+"]["transform_distance_per_block"] <= 2
    assert "transform_distance_per_block" not in by_method["lora"] and by_method["lora"]["weight_distance"] > 0
    lr_robustness.main(["--from_reproduction", str(out), "--output_dir", str(tmp_path)])
    assert (tmp_path / "lr_outcomes_dreambooth.png").is_file()
    with pytest.raises(UserError, match="no report.json: not a finished evaluate/reproduce.py folder"):
        lr_robustness.outcomes_from_reproduction(tmp_path)
    assert "| ether+ | 1 | 0.006 |" in (tmp_path / "lr_outcomes_dreambooth.md").read_text()


def test_learning_rate_multiples_of_the_config_or_of_the_paper(setup, tmp_path):
    base = ["dreambooth", "--dataset", str(setup["dataset"]), "--config_dir", str(setup["configs"]),
            "--methods", "ether+,lora", "--lr_multipliers", "0.1,10", "--output_dir", str(tmp_path / "o")]
    for relative_to, rates in (("config", {"ether+": 6e-3, "lora": 6e-4}),  # the test configs' rates
                               ("paper", {m: METHODS[m].dreambooth_lr for m in ("ether+", "lora")})):
        args = reproduce.parse_args(base + ["--lr_relative_to", relative_to])
        runs = reproduce.plan_runs(args, reproduce.load_protocol(setup["dataset"]))
        got = {(r.variant.method, r.variant.lr_multiplier): r.settings.learning_rate for r in runs}
        assert got == pytest.approx({(m, x): rate * x for m, rate in rates.items() for x in (0.1, 10)}), relative_to
