"""What the trainer tests share: a real `accelerate launch`, the in-process bad-input check, the trainers'
whole argument parser and a two-layer model."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn as nn

import forked
import user_errors
from ether_diffusion import arguments
from ether_diffusion.errors import ArgumentParser, run_cli

REPO = Path(__file__).resolve().parents[1]
TINY = "builtin:tiny-sd"
TRAINERS = "train_dreambooth.py, train_controlnet_s2i.py"  # the tool column of docs/user_errors.md for both


def launch(script: str, *args, timeout=300):
    """`accelerate launch <script> ...` as `make demo` runs it; returns the finished process."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", script, *map(str, args)]
    # One thread: tiny models run faster so, other processes share the machine, and two runs that must agree
    # to 1e-6 use the same kernels.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def torchrun(script: str, *args, processes: int = 2, timeout=600, check: bool = True):
    """`torchrun --nproc_per_node 2 <script> ...` on CPU (ACCELERATE_USE_CPU=1), one thread per process, its
    workers forked from this process (`forked.torchrun`); returns the finished launch (which must have
    succeeded, with `check`)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = forked.torchrun([script, *args], processes, env, cwd=REPO, timeout=timeout)
    assert proc.returncode == 0 or not check, proc.stderr[-4000:]
    return proc


def train(trainer, *args):
    """A trainer's `main` in this process (no launch: seconds cheaper than `launch`), as `accelerate launch`
    with one process runs it; accelerate's process-wide state is reset before and after (a test that ran a
    trainer's main otherwise may have left it), so each run may choose its precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return trainer.main([str(a) for a in args])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def stop_and_resume(script, common, root: Path, stop_at: int = 4, run=launch) -> tuple[Path, Path]:
    """A run in root/full, and the same run "stopped" after step `stop_at` and resumed in root/stopped: what the
    stopped run would have left behind is the full run's checkpoint there and its log one step further (a crash
    after the next step's log line). `common` must save a checkpoint at `stop_at`; `run(script, *args)` runs
    the trainer (`launch` a script, `train` a trainer module in-process, or `torchrun` two processes)."""
    full = root / "full"
    run(script, *common, "--output_dir", full)
    stopped = root / "stopped"
    stopped.mkdir()
    shutil.copytree(full / f"checkpoint-{stop_at}", stopped / f"checkpoint-{stop_at}")
    lines = (full / "train_log.jsonl").read_text().splitlines()
    (stopped / "train_log.jsonl").write_text("\n".join(lines[:stop_at + 1]) + "\n")
    run(script, *common, "--output_dir", stopped, "--resume_from_checkpoint", "latest")
    return full, stopped


def record_loss_weightings(monkeypatch) -> set:
    """The (snr_gamma, x0_max_weight) pairs `training.diffusion_loss` is called with from now on."""
    from ether_diffusion import training

    weightings, loss = set(), training.diffusion_loss
    monkeypatch.setattr(training, "diffusion_loss", lambda *a: weightings.add(a[4:]) or loss(*a))
    return weightings


def fails(main, argv, capsys) -> str:
    """Run a trainer's main in-process: it must exit 2 with a one-line error and no traceback; returns the line."""
    with pytest.raises(SystemExit) as e:
        run_cli(main, [str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return user_errors.record(last)


def make_parser():
    """Every argument group the trainers share, as a DreamBooth trainer has them."""
    p = ArgumentParser()
    arguments.add_config_arg(p)
    arguments.add_model_args(p, output_dir="out")
    arguments.add_adapter_args(p)
    arguments.add_training_args(p, task="dreambooth")
    arguments.add_checkpoint_args(p)
    arguments.add_validation_args(p)
    arguments.add_logging_args(p)
    return p


def trainer_args(*extra):
    """What the trainers check before any file is read: the parse and `check_common_args`."""
    args = arguments.parse_args(make_parser(), ["--pretrained_model_name_or_path", "m", *map(str, extra)])
    arguments.check_common_args(args)
    return args


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(8, 8)
        self.to_v = nn.Linear(8, 4)
