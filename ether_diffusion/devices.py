"""Devices, precisions and CPU threads, decided one way for the trainers, the evaluators and `sample`."""
import os

import torch

from .errors import UserError

# Precision names as the command lines spell them ("no" is accelerate's for full precision).
TORCH_DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device(name: str) -> str:
    """A `--device` value that torch knows and this machine has; `UserError` otherwise (torch would fail
    only when the model is moved, with a traceback)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device (cuda, cuda:N, mps or cpu)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {name}: MPS (Apple GPU) is not available here (use --device cpu)")
    elif device.type not in ("cuda", "mps", "cpu"):
        raise UserError(f"--device {name}: only cuda, mps and cpu are supported")
    return name


def share_cpu_cores(accelerator) -> int:
    """Give each of several CPU processes on this machine its share of the cores; returns the thread count.

    Torch uses every core in every process, so N processes on a CPU run N times oversubscribed: one training
    step measured 0.1 s alone and several seconds with three processes on 2 cores. An explicit
    OMP_NUM_THREADS (which torchrun sets to 1 for its workers) is the user's choice and is kept."""
    if accelerator.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))  # processes on this machine
    if local > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return torch.get_num_threads()
