"""Adapter-only checkpoints and the RNG state that makes resuming exact.

`checkpoint-N/` holds the adapter, optimizer, scheduler, grad scaler, one RNG file per process and
whatever a trainer adds (the S2I control encoder); `state.json` (global step, data seed, settings) is
written last. Everything goes to `checkpoint-N.tmp/` first and is renamed into place, so a crash during a
save leaves the older checkpoints intact and `latest` only ever sees complete folders. The frozen model is
never saved (SD-1.5 would be 3.4 GB per checkpoint).
"""
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .adapter_file import (ADAPTER_FILE, config_difference, config_from_metadata, load_adapter, read_adapter_metadata,
                           save_adapter)
from .adapters import AdapterConfig, adapter_config_of
from .errors import UserError

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_STATE = "state.json"  # written last inside the temporary folder


# ------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Python, NumPy and torch RNG states, as types `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete `checkpoint-N` folders by step. A `.tmp` folder (a save that did not finish) never counts."""
    output_dir = Path(output_dir)
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and (p / CHECKPOINT_STATE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def find_resume_checkpoint(output_dir, value) -> Path | None:
    """`--resume_from_checkpoint`: None, "latest" (None if there is none yet, as in diffusers) or a folder."""
    if not value:
        return None
    if value == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            logger.info("no checkpoint in %s yet: starting a new run", output_dir)
        return path
    path = Path(value)
    if not path.exists() and not path.is_absolute():
        path = Path(output_dir, value)
    if not (path / CHECKPOINT_STATE).is_file():
        raise UserError(f"checkpoint not found: {value} (no {CHECKPOINT_STATE} in {path})")
    return path


def check_checkpoint_matches(checkpoint: Path, cfg: AdapterConfig | None):
    """Resuming with another adapter than the checkpoint's (or with none, `cfg=None`, where it has one, and
    the other way round) is an error, checked before any model load."""
    has_adapter = (checkpoint / ADAPTER_FILE).is_file()
    if cfg is None or not has_adapter:
        if cfg is not None or has_adapter:
            raise UserError(f"{checkpoint} was trained {'with' if has_adapter else 'without'} an adapter but this run "
                            f"asks for {'none' if cfg is None else 'one'}; resume with the same --method or use "
                            "another --output_dir")
        return
    file_cfg = config_from_metadata(read_adapter_metadata(checkpoint / ADAPTER_FILE))
    difference = config_difference(file_cfg, cfg)
    if difference:
        key, have, want = difference
        raise UserError(f"{checkpoint} was trained with {key}={have!r} but this run asks for {key}={want!r}; "
                        "resume with the same setting or use another --output_dir")


def save_checkpoint(accelerator, output_dir, step: int, model, optimizer, lr_scheduler, state: dict,
                    total_limit: int | None = None, adapter_metadata: dict | None = None, save_extra=None) -> Path:
    """Write `checkpoint-<step>/` atomically (see the module docstring) and prune to `total_limit`.
    `save_extra(folder)` (main process) writes whatever else a trainer trains, e.g. the S2I control encoder."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")  # each process has its own RNG
    if accelerator.is_main_process:
        if adapter_config_of(accelerator.unwrap_model(model)) is not None:  # none with --method none
            save_adapter(accelerator.unwrap_model(model), tmp / ADAPTER_FILE, extra_metadata=adapter_metadata)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        if save_extra is not None:
            save_extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / CHECKPOINT_STATE).write_text(json.dumps({"global_step": step, **state}, indent=2, default=str))
        _replace_dir(tmp, final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def _replace_dir(src: Path, dst: Path):
    if dst.exists():  # the same step saved again (a rerun in the same output_dir): swap, then delete the old
        old = dst.with_name(dst.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def prune_checkpoints(output_dir, total_limit: int | None):
    """Keep the `total_limit` newest complete checkpoints; remove leftovers of interrupted saves."""
    output_dir = Path(output_dir)
    for p in output_dir.glob("checkpoint-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    if total_limit is None:
        return
    found = list_checkpoints(output_dir)
    for _, path in found[: max(len(found) - total_limit, 0)]:
        logger.info("removing old checkpoint %s", path.name)
        shutil.rmtree(path)


def load_checkpoint(accelerator, checkpoint: Path, model, optimizer, lr_scheduler, cfg: AdapterConfig | None,
                    load_extra=None) -> dict:
    """Restore adapter, optimizer, scheduler, grad scaler and RNG (and `load_extra(folder)`: what `save_extra`
    wrote); returns the saved state (global_step...)."""
    def load(name):
        return torch.load(checkpoint / name, map_location="cpu", weights_only=True)

    state = json.loads((checkpoint / CHECKPOINT_STATE).read_text())
    if cfg is not None:
        load_adapter(accelerator.unwrap_model(model), checkpoint / ADAPTER_FILE, config=cfg)
    if load_extra is not None:
        load_extra(checkpoint)
    optimizer.load_state_dict(load("optimizer.pt"))
    lr_scheduler.load_state_dict(load("scheduler.pt"))
    if accelerator.scaler is not None and (checkpoint / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(load("scaler.pt"))
    rng_file = checkpoint / f"rng-{accelerator.process_index}.pt"
    if not rng_file.is_file():
        logger.warning("%s has no RNG state for process %d: the resumed run is not bit-exact",
                       checkpoint, accelerator.process_index)
        rng_file = checkpoint / "rng-0.pt"
    set_rng_state(torch.load(rng_file, weights_only=True))
    return state
