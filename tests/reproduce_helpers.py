"""What the tests of `evaluate.reproduce` share: a launch of the driver as a user runs it (or the driver in the
test's process), and what its folder says about the runs in it."""
import os
import subprocess
from pathlib import Path

from trainer_helpers import REPO

ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(cmd, check=True):
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def drive(argv) -> int:
    """`python -m evaluate.reproduce ARGV` in this process: its exit code. (Its trainers are processes of their
    own either way; a new driver process would spend seconds importing what this one has.)"""
    from ether_diffusion.errors import run_cli
    from evaluate import reproduce

    try:
        return run_cli(reproduce.main, [str(a) for a in argv])
    except SystemExit as e:  # the traceback, and the driver's lock with it, go at the end of this block
        return e.code


def runs_of(out: Path) -> dict[str, Path]:
    return {f"{p.parent.name}/{p.name}": p for p in sorted(out.glob("runs/*/*")) if p.is_dir()}


def trainer_starts(run_dir: Path) -> int:
    return sum(line.startswith("$ ") for line in (run_dir / "train.log").read_text().splitlines())
