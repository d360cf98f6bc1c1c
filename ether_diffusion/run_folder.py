"""One run per output folder: the trainers' `--output_dir` holds one run's checkpoints, adapter, log and
samples, never two runs' mixed.

- While a run trains, its main process holds `run.lock` in the folder (an OS file lock, `flock`), which also
  names it: a second trainer on the folder stops with the holder's pid and host. The kernel drops the lock
  when its process ends however it ends (kill -9 too), so the lock file of a killed run is stale and the next
  run takes it over (logged) instead of asking the user to delete it.
- A run starts in a folder that holds another run's checkpoints or adapter only when told what to do with
  them: `--resume_from_checkpoint` continues that run, `--overwrite_output_dir` deletes its outputs first
  (checkpoints, adapter, encoder, train log, samples, TensorBoard logs; class images and built-in data, which
  are inputs, stay). Not both.
- A resumed run must be the same run (`checkpoints.check_resume_settings`), and never replaces the finished
  adapter with an older state (`check_final_step`).
"""
import atexit
import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
from pathlib import Path

from . import checkpoints, processes
from .adapter_file import ADAPTER_FILE, read_adapter_metadata
from .errors import UserError, writing
from .export import EXPORT_FILE_NAMES, MODEL_CARD

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
TRAIN_LOG = "train_log.jsonl"
SAMPLES_DIR = "samples"

_held: dict[Path, "RunLock"] = {}  # this process's locks by folder, released at exit (a kill releases them too)


# ------------------------------------------------------------------------------------------- the lock
class RunLock:
    """An exclusive `flock` on `<folder>/<name>` (`run.lock`), whose text says who holds it (pid, host, start,
    command, and `about`: what the holder says of itself). `user` names the kind of holder in the error."""

    def __init__(self, folder, name=LOCK_FILE, user="another training run", about=None):
        self.path = Path(folder, name)
        self.user, self.about = user, about
        self.file = None

    def acquire(self):
        while True:
            f = open(self.path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = describe_holder(f.read())
                f.close()
                raise UserError(f"{self.path.parent} is in use by {self.user} ({holder}): wait for it to "
                                "finish, stop it, or use another --output_dir") from None
            except OSError as e:  # a file system without locks (some network mounts)
                f.close()
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                logger.warning("cannot lock %s (%s): nothing stops a second run in this folder", self.path, e.strerror)
                return self
            # Locked; but a run that finished meanwhile may have deleted the file we opened: lock the file
            # that is there now, or two runs could each hold a lock on a different file.
            if _same_file(f, self.path):
                break
            f.close()
        f.seek(0)
        previous = f.read().strip()
        if previous:
            logger.warning("taking over %s from a run that is no longer running (%s)", self.path,
                           describe_holder(previous))
        f.seek(0)
        f.truncate()
        with writing(self.path):
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "started": datetime.datetime.now().isoformat(timespec="seconds"),
                                "command": " ".join(sys.argv), "about": self.about}) + "\n")
            f.flush()
        self.file = f
        return self

    def release(self):
        if self.file is not None:
            self.path.unlink(missing_ok=True)  # while still locked: the next run never sees a half-released lock
            self.file.close()
            self.file = None


def _same_file(f, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False


def holder_of(path) -> str | None:
    """The text the live holder of the lock file `path` wrote (`describe_holder` reads it), or None when no
    live process holds it (a stale file, or none)."""
    try:
        f = open(path)
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read()
        except OSError:  # a file system without locks: nothing can be known
            return None
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def read_holder(text: str) -> dict:
    """What a lock file's text says of its holder ({} when it says nothing readable)."""
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(text: str) -> str:
    holder = read_holder(text)
    if not {"pid", "host", "started"} <= holder.keys():
        return "its pid is unknown"
    return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"


def lock_output_dir(output_dir) -> RunLock:
    """Hold `output_dir`'s run lock until `release_output_dir` or the end of this process. A lock this
    process already holds there is from a run that is over (a `main` called again in the same process)."""
    folder = Path(output_dir).resolve()
    if folder in _held:
        _held.pop(folder).release()
    _held[folder] = RunLock(folder).acquire()
    return _held[folder]


def release_output_dir(output_dir):
    lock = _held.pop(Path(output_dir).resolve(), None)
    if lock is not None:
        lock.release()


@atexit.register
def _release_all():  # a run that stopped with an error is over too: its lock file should not look stale
    for folder in list(_held):
        release_output_dir(folder)


# ------------------------------------------------------------------------------------------- the decision
def claim(accelerator, args, adapter_config, settings: dict, outputs=()) -> Path | None:
    """Make `args.output_dir` this run's (see the module docstring); returns the checkpoint to resume from,
    or None for a new run. Decided on the main process and shared, so every process resumes the same
    checkpoint or every process stops with the same error.

    A checkpoint is resumed only with the same adapter and `settings` (`checkpoints.run_settings`);
    `outputs` are the trainer's own output files besides the adapter (the S2I control encoder)."""
    def decide():
        output_dir = Path(args.output_dir)
        with writing(output_dir):
            output_dir.mkdir(parents=True, exist_ok=True)
        lock_output_dir(output_dir)
        try:
            return _decide(output_dir)
        except BaseException:
            release_output_dir(output_dir)
            raise

    def _decide(output_dir: Path):
        if args.overwrite_output_dir and args.resume_from_checkpoint:
            raise UserError("--overwrite_output_dir deletes the run that --resume_from_checkpoint would continue: "
                            "give one of them")
        resume_from = checkpoints.find_resume_checkpoint(output_dir, args.resume_from_checkpoint)
        if resume_from is not None:
            checkpoints.check_resume(resume_from, adapter_config, settings)
            return str(resume_from)
        found = previous_run(output_dir, outputs)
        if found and not args.overwrite_output_dir:
            hint = ("it has no checkpoint to resume from: pass --overwrite_output_dir to train again"
                    if args.resume_from_checkpoint else
                    "pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it")
            raise UserError(f"{output_dir} holds another run ({', '.join(found)}): {hint}, or use another --output_dir")
        # Overwriting; or only a log and samples are there, of a run that stopped before its first checkpoint.
        remove_outputs(output_dir, args.logging_dir, outputs)
        return None

    resume_from = processes.on_main(accelerator, decide)
    return Path(resume_from) if resume_from is not None else None


def previous_run(output_dir: Path, outputs=()) -> list[str]:
    """What makes `output_dir` another run's: the names of its checkpoints (whole or damaged; the newest two)
    and of its adapter and the trainer's other outputs."""
    found = [p.name for _, p in checkpoints.checkpoint_folders(output_dir)][-2:]
    return found + [name for name in (ADAPTER_FILE, *outputs) if (output_dir / name).exists()]


def remove_outputs(output_dir: Path, logging_dir, outputs=()):
    """Delete what a run writes in `output_dir` (checkpoints first: a run cut short here is never resumable
    halfway), logged; TensorBoard's folder only when it is inside `output_dir`."""
    paths = [p for _, p in checkpoints.checkpoint_folders(output_dir)]
    paths += [output_dir / name for name in (ADAPTER_FILE, *outputs, TRAIN_LOG, SAMPLES_DIR, MODEL_CARD,
                                             *EXPORT_FILE_NAMES.values())]
    tensorboard = (output_dir / logging_dir).resolve()
    if tensorboard.is_relative_to(output_dir.resolve()) and tensorboard != output_dir.resolve():
        paths.append(tensorboard)
    paths += sorted(output_dir.glob("checkpoint-*.tmp")) + sorted(output_dir.glob("checkpoint-*.old"))
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        logger.info("removed %s (a previous run's)", path)


def check_final_step(output_dir, max_train_steps: int, resume_from: Path | None = None):
    """A resumed run must end at or after its checkpoint, and at or after the finished adapter already in
    `output_dir` (a shorter rerun would replace it with an older state)."""
    if resume_from is not None:
        step = checkpoints.read_state(resume_from)["global_step"]
        if max_train_steps < step:
            raise UserError(f"{resume_from} is at step {step}, past --max_train_steps {max_train_steps}: resume with "
                            f"--max_train_steps {step} or more")
    adapter = Path(output_dir, ADAPTER_FILE)
    if not adapter.is_file():
        return
    try:
        finished = int(read_adapter_metadata(adapter).get("steps", 0))
    except (UserError, ValueError):
        return  # unreadable: nothing worth keeping
    if max_train_steps < finished:
        raise UserError(f"{adapter} was trained for {finished} steps; this run would replace it with the state at "
                        f"step {max_train_steps}: use --max_train_steps {finished} or more, or another --output_dir")
