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
- A run's own files are known by its record, `run_files.json`, not by their names: every run writes there the
  names it writes in the folder (`outputs`) and the inputs it keeps there (`kept`: class images, built-in
  data, the log of the tool that launched it, see `keep`). A folder holding anything else is refused, naming
  it; with `--overwrite_output_dir` the run writes beside such files, as long as it would not write over one
  of them, and deletes only what a record names. (A folder without a record that a run is resumed in is taken
  as a run of an older version: its checkpoint, with its settings and checksums, is the record.)
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
import re
import shlex
import shutil
import socket
import sys
from pathlib import Path

from . import checkpoints, errors, processes
from .adapter_file import ADAPTER_FILE, read_adapter_metadata
from .errors import UserError, writing
from .export import EXPORT_FILE_NAMES, MODEL_CARD
from .files import TEMPORARY_PREFIX, read_json, write_text

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
RECORD_FILE = "run_files.json"
TRAIN_LOG = "train_log.jsonl"
SAMPLES_DIR = "samples"
# A checkpoint folder, a save that did not finish and the older copy a save swaps out (`files.replace_folder`):
# the record names them by this pattern, as the steps a run will save are not known when it starts.
CHECKPOINT_ENTRY_RE = re.compile(r"^checkpoint-\d+(\.tmp|\.old)?$")

_held: dict[Path, "RunLock"] = {}  # this process's locks by folder, released at exit (a kill releases them too)
# A forked child (a DataLoader worker, a test's fork) holds none of them: its exit must not release the parent's.
os.register_at_fork(after_in_child=_held.clear)


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
        # Empty the file at once: until our text is in it, a reader must not take a killed holder's text for ours
        # (`holder_of` readers wait for a text with an `about`).
        f.seek(0)
        previous = f.read().strip()
        f.seek(0)
        f.truncate()
        if previous:
            logger.warning("taking over %s from a run that is no longer running (%s)", self.path,
                           describe_holder(previous))
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


def written_by_an_ended_process(text: str) -> bool:
    """The text names a process of this machine that has ended (or is a zombie): a killed holder's text, in a
    file that a new holder has locked and not yet rewritten."""
    holder = read_holder(text)
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        state = Path(f"/proc/{holder['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")  # a zombie holds no lock: its files were closed when it ended
    except FileNotFoundError:
        return True
    except (OSError, IndexError):  # no /proc here: nothing can be known
        return False


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
    errors.describe_interrupt = lambda: describe_stop(output_dir)  # Ctrl-C / SIGTERM from here on: say where
    return _held[folder]


def release_output_dir(output_dir):
    lock = _held.pop(Path(output_dir).resolve(), None)
    if lock is not None:
        lock.release()
        errors.describe_interrupt = None


def describe_stop(output_dir) -> str:
    """Where a run in `output_dir` stopped (the last step in its train log, its last whole checkpoint) and the
    command that continues it: the words after "interrupted" (`errors.interrupted_line`)."""
    lines = Path(output_dir, TRAIN_LOG).read_text().splitlines() if Path(output_dir, TRAIN_LOG).is_file() else []
    try:
        step = f"at step {json.loads(lines[-1])['step']}" if lines else "before the first step"
    except (ValueError, KeyError, TypeError):  # a line cut short by the interrupt
        step = f"at step {len(lines)}"
    whole = checkpoints.list_checkpoints(output_dir)
    if not whole:
        return f"{step}, before the first checkpoint: nothing to resume, run the same command again"
    argv, skip = [], False
    for arg in sys.argv:  # this command, continuing the run instead of starting or replacing one
        if skip or arg == "--overwrite_output_dir" or arg.startswith("--resume_from_checkpoint="):
            skip = False
            continue
        skip = arg == "--resume_from_checkpoint"
        if not skip:
            argv.append(arg)
    return (f"{step}; {whole[-1][1]} is the last checkpoint: resume with "
            f"`python {shlex.join([*argv, '--resume_from_checkpoint', 'latest'])}`")


@atexit.register
def release_all():  # at exit: a run that stopped with an error is over too, its lock file should not look stale
    for folder in list(_held):
        release_output_dir(folder)


# ------------------------------------------------------------------------------------------- the decision
def claim(accelerator, args, adapter_config, settings: dict, outputs=(), inputs=()) -> Path | None:
    """Make `args.output_dir` this run's (see the module docstring); returns the checkpoint to resume from,
    or None for a new run. Decided on the main process and shared, so every process resumes the same
    checkpoint or every process stops with the same error.

    A checkpoint is resumed only with the same adapter and `settings` (`checkpoints.run_settings`);
    `outputs` are the trainer's own output files besides the adapter (the S2I control encoder), `inputs` the
    folders and files it reads (which may lie in output_dir: built-in data, class images; never deleted)."""
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
        planned = planned_outputs(args, outputs)
        kept = entries_in(output_dir, [p for p in inputs if p is not None])
        resume_from = checkpoints.find_resume_checkpoint(output_dir, args.resume_from_checkpoint)
        if resume_from is not None:
            checkpoints.check_resume(resume_from, adapter_config, settings)
            remove_leftovers(output_dir, checkpoints.read_state(resume_from)["global_step"])
            write_record(output_dir, planned, kept)
            return str(resume_from)
        found = previous_run(output_dir, outputs)
        if found and not args.overwrite_output_dir:
            hint = ("it has no checkpoint to resume from: pass --overwrite_output_dir to train again"
                    if args.resume_from_checkpoint else
                    "pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it")
            raise UserError(f"{output_dir} holds another run ({', '.join(found)}): {hint}, or use another --output_dir")
        check_foreign(output_dir, planned, kept, args.overwrite_output_dir)
        # Overwriting; or only a log and samples are there, of a run that stopped before its first checkpoint.
        remove_outputs(output_dir)
        write_record(output_dir, planned, kept)
        return None

    resume_from = processes.on_main(accelerator, decide)
    return Path(resume_from) if resume_from is not None else None


def previous_run(output_dir: Path, outputs=()) -> list[str]:
    """What makes `output_dir` another run's: the names of its checkpoints (whole or damaged; the newest two)
    and of its adapter and the trainer's other outputs."""
    found = [p.name for _, p in checkpoints.checkpoint_folders(output_dir)][-2:]
    return found + [name for name in (ADAPTER_FILE, *outputs) if (output_dir / name).exists()]


# ------------------------------------------------------------------------------------------- the record
def planned_outputs(args, outputs=()) -> set[str]:
    """The names a trainer may write in `args.output_dir` (besides checkpoints): the adapter, `outputs`, the
    train log, samples, the model card, the exported LoRA files, and the TensorBoard folder and merged
    export where they lie inside it (their first folder)."""
    names = {ADAPTER_FILE, *outputs, TRAIN_LOG, TRAIN_LOG + ".tmp", SAMPLES_DIR, MODEL_CARD, *EXPORT_FILE_NAMES.values()}
    output_dir = Path(args.output_dir)
    if args.report_to not in (None, "", "none"):
        names |= entries_in(output_dir, [output_dir / args.logging_dir])
    names |= entries_in(output_dir, [getattr(args, "export_merged", None)])
    return names


def entries_in(folder: Path, paths) -> set[str]:
    """The names of the entries of `folder` that hold one of `paths` (those inside it; `folder` itself never)."""
    folder = folder.resolve()
    names = set()
    for path in paths:
        if path is None:
            continue
        path = Path(path).resolve()
        if path != folder and path.is_relative_to(folder):
            names.add(path.relative_to(folder).parts[0])
    return names


def read_record(output_dir: Path) -> dict | None:
    """`output_dir`'s record of what runs of ours wrote there ({"outputs": [...], "kept": [...]}), or None."""
    record = read_json(Path(output_dir, RECORD_FILE))
    if not isinstance(record, dict):
        return None
    return {key: set(record.get(key) or ()) for key in ("outputs", "kept")}


def write_record(output_dir: Path, outputs: set[str], kept: set[str] = frozenset()):
    """Add `outputs` and `kept` to `output_dir`'s record, which keeps the names of the earlier runs' entries
    that are still there (a resumed run's checkpoints, an export it no longer asks for)."""
    record = read_record(output_dir) or {"outputs": set(), "kept": set()}
    record["outputs"] = {n for n in record["outputs"] if (output_dir / n).exists()} | set(outputs)
    record["kept"] = {n for n in record["kept"] if (output_dir / n).exists()} | set(kept)
    path = Path(output_dir, RECORD_FILE)
    with writing(path):
        write_text(path, json.dumps({"written_by": "ether-diffusion", "outputs": sorted(record["outputs"]),
                                     "kept": sorted(record["kept"])}, indent=1) + "\n")


def keep(output_dir, *names):
    """Record the entries `names` of `output_dir` as ours to keep: what a tool that launches a trainer writes
    in the trainer's folder (its log, its records) must not make the folder look like someone else's."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_record(output_dir, set(), set(names))


def is_ours(name: str, record: dict | None) -> bool:
    """Whether the entry `name` of a run folder with `record` (None: none) was written by a run of ours."""
    if name in (LOCK_FILE, RECORD_FILE):
        return True
    if record is None:
        return False
    return (name in record["outputs"] or name in record["kept"] or CHECKPOINT_ENTRY_RE.match(name) is not None
            or name.startswith(TEMPORARY_PREFIX))


def check_foreign(output_dir: Path, planned: set[str], inputs: set[str], overwrite: bool):
    """Refuse a folder that holds entries no run of ours wrote (and that are not this run's `inputs`): naming
    them; with `overwrite`, only those this run would write over (the `planned` names, its checkpoints)."""
    record = read_record(output_dir)
    foreign = sorted(p.name for p in output_dir.iterdir() if not is_ours(p.name, record) and p.name not in inputs)
    if not foreign:
        return
    if not overwrite:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise UserError(f"{output_dir} holds files that no run of ether-diffusion wrote ({shown}): use a new or "
                        "empty --output_dir, or pass --overwrite_output_dir to write beside them (it deletes only "
                        f"what a run recorded in {RECORD_FILE})")
    clash = [name for name in foreign if name in planned or CHECKPOINT_ENTRY_RE.match(name)]
    if clash:
        raise UserError(f"{output_dir / clash[0]} was not written by a run of ether-diffusion (no {RECORD_FILE} "
                        "names it), and this run would write there: move it away or use another --output_dir")


def remove_outputs(output_dir: Path):
    """Delete what runs of ours recorded as their outputs in `output_dir` (checkpoints first: a run cut short
    here is never resumable halfway), and their leftover temporaries; logged. Nothing else is touched."""
    record = read_record(output_dir)
    if record is None:
        return
    entries = sorted(output_dir.iterdir(), key=lambda p: CHECKPOINT_ENTRY_RE.match(p.name) is None)
    for path in entries:
        if path.name in (LOCK_FILE, RECORD_FILE) or path.name in record["kept"] or not is_ours(path.name, record):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        logger.info("removed %s (a previous run's)", path)


def remove_leftovers(output_dir: Path, step: int):
    """Before a run resumes at `step`: what an interrupted run of ours left that no run will use (temporary
    files, a checkpoint save that did not finish or the older copy it swapped out, validation grids of the
    steps after `step`, which the resumed run makes again), logged."""
    record = read_record(output_dir)
    leftovers = [p for p in output_dir.iterdir() if p.name.startswith(TEMPORARY_PREFIX) or
                 (CHECKPOINT_ENTRY_RE.match(p.name) and p.suffix in (".tmp", ".old"))]
    leftovers += [p for p in sorted(Path(output_dir, SAMPLES_DIR).glob("step-*.png"))
                  if (m := re.fullmatch(r"step-(\d+)\.png", p.name)) and int(m[1]) > step]
    for path in leftovers:
        if record is None and path.parent == output_dir and path.name.startswith(TEMPORARY_PREFIX):
            continue  # a folder without our record: a hidden file there may be anyone's
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        logger.info("removed %s (left by the interrupted run)", path)


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
