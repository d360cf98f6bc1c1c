"""One exception type for user mistakes.

Library code raises `UserError` for anything a user can fix (a wrong path, a bad value, a mismatched
adapter file). Command-line entry points parse with `ArgumentParser` and run `main` through `run_cli`,
which prints one line with exit code 2, so a user never sees a traceback for their own mistake, while
programming errors still show one. A full disk is treated the same way (`writing`, `is_disk_full`): the user
can fix it, and a traceback from deep inside torch.save would not even say what happened.
"""
import argparse
import contextlib
import errno
import math
import os
import signal
import sys

INT64_MAX = 2**63 - 1


class UserError(Exception):
    """A mistake in the user's input: the message names the file, value or layer."""


# ENOSPC and EDQUOT; the libraries that write our files report them three ways: an OSError, an OSError in
# the chain of the RuntimeError of torch.save to a file object ("unexpected pos ..."; to a path it loses the
# OSError, so we never save to a path), or safetensors' text "(os error 28)".
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# A file or folder the user may not write (or read): read-only folders and file systems, another user's.
_NOT_ALLOWED_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from or during, is a full disk (or an exceeded quota)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(error) for text in _DISK_FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def writing(what):
    """A full disk while writing `what` (a path, or words) is the one line "no space left on device while
    writing <what>" instead of whatever the writing library raised."""
    try:
        yield
    except Exception as e:
        if is_disk_full(e):
            raise UserError(f"no space left on device while writing {what}") from None
        raise


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are `UserError`s: one line naming the problem, no usage dump, exit code 2
    through `run_cli`. Every command line here (trainers, sample, evaluators, export) uses it."""

    def error(self, message):
        raise UserError(message)

    def parse_known_args(self, args=None, namespace=None):
        """argparse's parse, then every int and float value (given or default) checked by `number_problem`."""
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            if action.type not in (int, float):
                continue
            values = getattr(namespace, action.dest, None)
            for value in values if isinstance(values, list) else [values]:
                problem = number_problem(value)
                if problem:
                    raise UserError(f"{(action.option_strings or [action.dest])[0]} {problem}")
        return namespace, extras


def number_problem(value) -> str | None:
    """What is wrong with a number a user gave, or None. NaN and infinity mean nothing as a setting (a NaN
    learning rate trains an all-NaN adapter without a word), and an integer beyond 64 bits overflows in
    torch, numpy or tqdm with a traceback deep in a run."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
        return f"{value} is too large (at most {INT64_MAX})"
    return None


def first_line(error) -> str:
    """Library errors often span lines (hub hints, causes); a user's error is one line."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised where the program is (as Ctrl-C raises KeyboardInterrupt), so the same clean-up runs:
    temporary files are removed, locks released, and one line says where the command stopped."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


# Says where an interrupted command stopped and how to continue ("at step 40; ...: resume with ..."), or
# None: set by what knows (a trainer's run folder, `run_folder.lock_output_dir`).
describe_interrupt = None


def interrupted_line(signum: int) -> str:
    where = describe_interrupt() if describe_interrupt is not None else None
    return f"interrupted ({signal.Signals(signum).name})" + (f" {where}" if where else "")


def run_cli(main, argv=None):
    """Call `main(argv)`; turn a `UserError`, a full disk or a file it may not write into `error: <message>`
    on stderr and exit code 2, and Ctrl-C or
    SIGTERM into one line (`interrupted_line`; on the first process only) and exit code 128 + the signal."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _raise_interrupted)
    except ValueError:  # not the main thread: nothing to install
        previous = None
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        if os.environ.get("RANK", "0") == "0":
            print(interrupted_line(signum), file=sys.stderr)
        sys.exit(128 + signum)
    except Exception as e:  # a full disk where no `writing` names the file: still one line
        if isinstance(e, OSError) and e.errno in _NOT_ALLOWED_ERRNOS and e.filename:
            print(f"error: {e.filename}: {e.strerror} (a read-only folder, or another user's?)", file=sys.stderr)
            sys.exit(2)
        if not is_disk_full(e):
            raise
        where = f" while writing {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: no space left on device{where}", file=sys.stderr)
        sys.exit(2)
    finally:
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, previous)
