"""What the tests of `evaluate.reproduce` share: the driver launched as a user runs it (its processes and their
trainers forked from this process: `forked`), or the driver in the test's process, and what its folder says
about the runs in it."""
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import forked
from trainer_helpers import REPO

ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
DRIVER = [sys.executable, "-m", "evaluate.reproduce"]


def trainers_forked():
    """In a driver's process: the trainers it starts (`reproduce.train`, through subprocess.Popen) are forks too."""
    subprocess.Popen = forked.ForkedPopen


def launch(argv, processes: int = 2):
    """`torchrun --nproc_per_node PROCESSES -m evaluate.reproduce ARGV`, which must succeed."""
    result = forked.torchrun(DRIVER[1:] + list(map(str, argv)), processes, ENV, cwd=REPO, timeout=900,
                             preexec_fn=trainers_forked)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def start(argv) -> forked.ForkedPopen:
    """`python -m evaluate.reproduce ARGV` in a session of its own (its trainers in it), its output dropped."""
    return forked.ForkedPopen(DRIVER + list(map(str, argv)), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=trainers_forked)


def drive(argv) -> int:
    """`python -m evaluate.reproduce ARGV` in this process (its trainers forked from it): its exit code."""
    from ether_diffusion.errors import run_cli
    from evaluate import reproduce

    try:
        with mock.patch.object(subprocess, "Popen", forked.ForkedPopen):
            return run_cli(reproduce.main, [str(a) for a in argv])
    except SystemExit as e:
        return e.code


def runs_of(out: Path) -> dict[str, Path]:
    return {f"{p.parent.name}/{p.name}": p for p in sorted(out.glob("runs/*/*")) if p.is_dir()}


def trainer_starts(run_dir: Path) -> int:
    return sum(line.startswith("$ ") for line in (run_dir / "train.log").read_text().splitlines())
