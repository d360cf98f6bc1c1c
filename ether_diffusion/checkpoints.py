"""Adapter-only checkpoints, the RNG state that makes resuming exact, and the checks that make it safe.

`checkpoint-N/` holds the adapter, optimizer, scheduler, grad scaler, one RNG file per process and
whatever a trainer adds (the S2I control encoder); `state.json` (global step, data seed, the run's settings
and every file's size and SHA-256) is written last. Everything goes to `checkpoint-N.tmp/` first, is flushed
to disk and renamed into place, so a crash during a save leaves the older checkpoints intact and `latest`
only ever sees complete folders. The frozen model is never saved (SD-1.5 would be 3.4 GB per checkpoint).

Resuming checks, before any model is loaded:
- the checkpoint is whole: each file as `state.json` lists it. "latest" falls back to the newest whole one
  and says which file of which checkpoint is damaged (a truncated file, a missing RNG file, a disk that lost
  the last writes before a power cut);
- the run is the same: every setting that changes the trained adapter (`run_settings`: method, n, targets,
  rank, resolution, batch size, accumulation, learning rate and schedule, precision, number of processes,
  dataset size, ...) equals the checkpoint's, or the difference is named.
"""
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from . import processes
from .adapter_file import (ADAPTER_FILE, config_difference, config_from_metadata, load_adapter, read_adapter_metadata,
                           save_adapter, text_encoder_config_from_metadata)
from .adapters import AdapterConfig, adapter_config_of
from .adapters.methods import METHODS, SETTING_FLAGS
from .errors import UserError, first_line, writing
from .files import replace_folder

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_STATE = "state.json"  # written last inside the temporary folder

# Arguments that do not change the trained adapter, so a resumed run may change them: where things are
# written and how often, validation, logging, speed switches, paths of the data (the data is compared by its
# size), the seed (the checkpoint's RNG and data seed replace it) and the length (`check_final_step`).
NOT_IN_THE_RESULT = frozenset({
    "config", "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "checkpointing_steps",
    "checkpoints_total_limit", "logging_dir", "report_to", "distance_logging_steps", "validation_prompt",
    "num_validation_images", "validation_steps", "validation_inference_steps", "validation_maps", "export_merged",
    "instance_data_dir", "class_data_dir", "train_data_dir", "dataset_name", "caption_file", "sample_batch_size",
    "validation_image", "tracker_project_name", "num_validation_maps",
    "class_inference_steps", "prior_generation_precision", "seed", "max_train_steps", "num_train_epochs",
    "gradient_checkpointing", "enable_xformers_memory_efficient_attention", "allow_tf32", "dataloader_num_workers",
    "mixed_precision",  # compared as the precision accelerate actually uses (`run_settings`)
    "export_lora",  # written from the finished adapter: another format (or none) trains the same
})
# Paths compared as the folders they name: `model/`, `./model` and `/abs/model` are one model.
PATH_SETTINGS = ("pretrained_model_name_or_path",)


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


# ------------------------------------------------------------------------------------------- finding one
def checkpoint_folders(output_dir) -> list[tuple[int, Path]]:
    """Every `checkpoint-N` folder by step, whole or not. A `.tmp` folder (a save that did not finish) never
    counts: it is not a checkpoint yet."""
    output_dir = Path(output_dir)
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints (their `state.json` written) by step."""
    return [(step, p) for step, p in checkpoint_folders(output_dir) if (p / CHECKPOINT_STATE).is_file()]


def read_state(checkpoint) -> dict:
    """A checkpoint's `state.json`; a `UserError` names it when it is missing or damaged."""
    path = Path(checkpoint, CHECKPOINT_STATE)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise UserError(f"{path} is damaged (no global_step)")
    return state


def checkpoint_problem(checkpoint) -> str | None:
    """Why `checkpoint` cannot be resumed from ("optimizer.pt is truncated (...)"), or None if it is whole.

    Every file is compared with the size and SHA-256 that `state.json` recorded when it was saved."""
    checkpoint = Path(checkpoint)
    try:
        files = read_state(checkpoint).get("files")
    except UserError as e:
        return str(e).replace(f"{checkpoint}{os.sep}", "")
    if files is None:  # saved before checkpoints listed their files: the ones every checkpoint has
        files = {name: None for name in (ADAPTER_FILE, "optimizer.pt", "scheduler.pt", "rng-0.pt")}
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if expected is None:
            continue
        size = path.stat().st_size
        if size != expected["bytes"]:
            what = "truncated" if size < expected["bytes"] else "longer than saved"
            return f"{name} is {what} ({size} of {expected['bytes']} bytes)"
        if _sha256(path) != expected["sha256"]:
            return f"{name} is damaged (its contents changed after it was saved)"
    return None


def find_resume_checkpoint(output_dir, value) -> Path | None:
    """`--resume_from_checkpoint`: None, "latest" or a folder.

    "latest" is the newest whole checkpoint: a damaged newer one is named and skipped (logged); none at all
    starts a new run (None, as in diffusers); only damaged ones is an error naming them. A folder given
    by name must be whole."""
    if not value:
        return None
    if value == "latest":
        damaged = []
        for _, path in reversed(checkpoint_folders(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                if damaged:
                    logger.warning("%s: resuming from %s instead", "; ".join(damaged), path.name)
                return path
            damaged.append(f"{path.name} is damaged: {problem}")
        if damaged:
            raise UserError(f"no usable checkpoint in {output_dir}: {'; '.join(damaged)}")
        logger.info("no checkpoint in %s yet: starting a new run", output_dir)
        return None
    path = Path(value)
    if not path.exists() and not path.is_absolute():
        path = Path(output_dir, value)
    if not path.is_dir():
        raise UserError(f"checkpoint not found: {value} (no folder {path})")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"checkpoint {path} is damaged: {problem} (--resume_from_checkpoint latest takes the "
                        "newest whole one)")
    return path


# ------------------------------------------------------------------------------------------- same run?
def check_checkpoint_matches(checkpoint: Path, cfg: AdapterConfig | None, text_encoder: bool = False):
    """Resuming with another adapter than the checkpoint's (or with none, `cfg=None`, where it has one, and
    the other way round; with a text-encoder part, `text_encoder`, where it has none, and the other way round)
    is an error, checked before any model load."""
    has_adapter = (checkpoint / ADAPTER_FILE).is_file()
    if cfg is None or not has_adapter:
        if cfg is not None or has_adapter:
            raise UserError(f"{checkpoint} was trained {'with' if has_adapter else 'without'} an adapter but this run "
                            f"asks for {'none' if cfg is None else 'one'}; resume with the same --method or use "
                            "another --output_dir")
        return
    meta = read_adapter_metadata(checkpoint / ADAPTER_FILE)
    difference = config_difference(config_from_metadata(meta), cfg)
    if difference:
        key, have, want = difference
        raise UserError(f"{checkpoint} was trained with {key}={have!r} but this run asks for {key}={want!r}; "
                        "resume with the same setting or use another --output_dir")
    has_text_encoder = text_encoder_config_from_metadata(meta) is not None
    if has_text_encoder != text_encoder:
        raise UserError(f"{checkpoint} was trained {'with' if has_text_encoder else 'without'} --train_text_encoder "
                        f"but this run {'asks for it' if text_encoder else 'does not'}; resume with the same setting or "
                        "use another --output_dir")


def check_resume(checkpoint: Path, cfg: AdapterConfig | None, settings: dict):
    """The checkpoint is this run's: the same adapter (`check_checkpoint_matches`) and the same settings
    (`check_resume_settings`)."""
    check_checkpoint_matches(checkpoint, cfg, text_encoder=settings.get("train_text_encoder", False))
    check_resume_settings(checkpoint, settings)


def run_settings(accelerator, args, dataset_size: int) -> dict:
    """What decides the trained adapter besides the data's content: the arguments not in
    `NOT_IN_THE_RESULT`, the precision and number of processes, and the dataset's size. Saved in every
    checkpoint; a resumed run must have the same (`check_resume_settings`)."""
    settings = {k: v for k, v in vars(args).items() if k not in NOT_IN_THE_RESULT}
    # Each method on the adapter settings it uses: --rank changes no ETHER run, --n_blocks no LoRA run, and
    # neither an S2I run without an adapter (--method none).
    used = METHODS[args.method].settings if args.method in METHODS else ()
    for key, flag in SETTING_FLAGS.items():
        if key not in used:
            settings.pop(flag, None)
    settings.update(mixed_precision=accelerator.mixed_precision, num_processes=accelerator.num_processes,
                    dataset_size=dataset_size)
    return json.loads(json.dumps(settings, default=str))  # as state.json will hold them (lists, not tuples)


def same_folder(a, b) -> bool:
    """Whether two path settings name one existing folder (however each was written)."""
    if not (isinstance(a, str) and isinstance(b, str) and Path(a).is_dir() and Path(b).is_dir()):
        return False
    return Path(a).resolve() == Path(b).resolve()


def check_resume_settings(checkpoint: Path, settings: dict):
    """Refuse to resume `checkpoint` with other settings than it was trained with, naming the first one."""
    saved = read_state(checkpoint).get("settings")
    if saved is None:
        logger.warning("%s was saved before checkpoints recorded their settings: only the adapter's are checked",
                       checkpoint)
        return
    for key, have in saved.items():
        want = settings.get(key, have)  # a setting this version no longer has cannot be compared
        if want == have or (key in PATH_SETTINGS and same_folder(have, want)):
            continue
        if key == "num_processes":
            raise UserError(f"{checkpoint} was saved by {have} processes but this run has {want}: resume with {have} "
                            "(each process's random state and share of the data are in the checkpoint)")
        if key == "dataset_size":
            raise UserError(f"{checkpoint} was trained on {have} examples but this run has {want}: resume with the "
                            "same data or use another --output_dir")
        raise UserError(f"{checkpoint} was trained with {key}={have!r} but this run asks for {key}={want!r}; "
                        "resume with the same setting or use another --output_dir")


# ------------------------------------------------------------------------------------------- saving
def save_checkpoint(accelerator, output_dir, step: int, model, optimizer, lr_scheduler, state: dict,
                    total_limit: int | None = None, adapter_metadata: dict | None = None, save_extra=None,
                    text_encoder=None) -> Path:
    """Write `checkpoint-<step>/` atomically (see the module docstring) and prune to `total_limit`.
    `save_extra(folder)` (main process) writes whatever else a trainer trains, e.g. the S2I control encoder;
    `text_encoder`'s adapter (--train_text_encoder) goes into the adapter file beside the model's.

    Every process saves its RNG state; a failure anywhere (a full disk) stops every process with the same
    message, the temporary folder removed and the older checkpoints untouched."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"

    def start():
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(final):
            tmp.mkdir(parents=True)

    def write_files():
        unwrapped = accelerator.unwrap_model(model)
        unwrapped_text_encoder = accelerator.unwrap_model(text_encoder) if text_encoder is not None else None
        _save_torch(rng_state(), tmp, final, f"rng-{accelerator.process_index}.pt")  # each process has its own RNG
        if accelerator.is_main_process:
            if adapter_config_of(unwrapped) is not None:  # none with --method none
                with writing(final / ADAPTER_FILE):
                    save_adapter(unwrapped, tmp / ADAPTER_FILE, extra_metadata=adapter_metadata,
                                 text_encoder=unwrapped_text_encoder)
            _save_torch(optimizer.state_dict(), tmp, final, "optimizer.pt")
            _save_torch(lr_scheduler.state_dict(), tmp, final, "scheduler.pt")
            if accelerator.scaler is not None:
                _save_torch(accelerator.scaler.state_dict(), tmp, final, "scaler.pt")
            if save_extra is not None:
                with writing(final):
                    save_extra(tmp)
        return trained_checksum(unwrapped, unwrapped_text_encoder)

    def finish():
        files = {name: {"bytes": path.stat().st_size, "sha256": _sha256(path, flush=True)}
                 for name, path in _files(tmp)}
        with writing(final / CHECKPOINT_STATE):
            _write_flushed(tmp / CHECKPOINT_STATE, json.dumps({"global_step": step, **state, "files": files},
                                                             indent=2, default=str))
        replace_folder(tmp, final)  # the same step saved again (a resumed run passing it again) replaces it
        _flush_dir(output_dir)
        prune_checkpoints(output_dir, total_limit)

    try:
        processes.on_main(accelerator, start)
        checksums = processes.everywhere(accelerator, write_files)
        if len(set(checksums)) > 1:  # DDP keeps every copy equal; anything else is a bug, not a checkpoint
            raise RuntimeError(f"the processes' trained parameters differ at step {step}: {checksums}")
        processes.on_main(accelerator, finish)
    except Exception:  # (a kill leaves the .tmp folder; the next save or resume ignores and removes it)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs back
        raise
    return final


def trained_checksum(*models) -> tuple[float, float]:
    """Sums of the trainable parameters of `models` (None: absent) and of their squares: equal on every
    process while DDP keeps the copies in step."""
    params = [p.detach() for model in models if model is not None for p in model.parameters() if p.requires_grad]
    sums = torch.stack([p.sum(dtype=torch.float64) for p in params]).sum()
    squares = torch.stack([torch.linalg.vector_norm(p, dtype=torch.float64) ** 2 for p in params]).sum()
    return sums.item(), squares.item()


def _save_torch(obj, tmp: Path, final: Path, name: str):
    # Through a file object: on a full disk torch.save then raises with the OSError in its chain (to a path it
    # raises a bare "unexpected pos" RuntimeError), so `writing` can say what happened.
    with writing(final / name), open(tmp / name, "wb") as f:
        torch.save(obj, f)


def _files(folder: Path):
    return [(p.relative_to(folder).as_posix(), p) for p in sorted(folder.rglob("*")) if p.is_file()]


def _sha256(path: Path, flush: bool = False) -> str:
    """The file's SHA-256; `flush=True` also forces it to disk (a rename is only atomic across a power cut
    for data that reached the disk before it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if flush:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _write_flushed(path: Path, text: str):
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _flush_dir(folder: Path):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


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


# ------------------------------------------------------------------------------------------- loading
def load_checkpoint(accelerator, checkpoint: Path, model, optimizer, lr_scheduler, cfg: AdapterConfig | None,
                    load_extra=None, text_encoder=None) -> dict:
    """Restore adapter (the text encoder's too, into `text_encoder`), optimizer, scheduler, grad scaler and RNG
    (and `load_extra(folder)`: what `save_extra` wrote); returns the saved state (global_step...). A file that fails to load is named (`find_resume_checkpoint`
    has checked them already; this catches what a checksum cannot, such as a file saved by another version)."""
    checkpoint = Path(checkpoint)

    def load(name):
        try:
            return torch.load(checkpoint / name, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(f"{checkpoint / name} is missing") from None
        except Exception as e:  # pickle, zip and torch errors alike: the file is not what we saved
            raise UserError(f"{checkpoint / name} is damaged ({first_line(e)})") from None

    state = read_state(checkpoint)
    if cfg is not None:  # --method none: no adapter
        load_adapter(accelerator.unwrap_model(model), checkpoint / ADAPTER_FILE, config=cfg,
                     text_encoder=accelerator.unwrap_model(text_encoder) if text_encoder is not None else None)
    if load_extra is not None:
        load_extra(checkpoint)
    optimizer.load_state_dict(load("optimizer.pt"))
    lr_scheduler.load_state_dict(load("scheduler.pt"))
    if accelerator.scaler is not None and (checkpoint / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(load("scaler.pt"))
    set_rng_state(load(f"rng-{accelerator.process_index}.pt"))  # each process continues its own stream
    return state
