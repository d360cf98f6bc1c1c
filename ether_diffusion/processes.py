"""What the processes of one run do together, so that none is left waiting when another stops.

A process that stops alone (a user error, a full disk) leaves the others blocked in their next collective (a
barrier, DDP's gradient all-reduce) until the launcher kills them, and they print a traceback about a lost
connection instead of the error. So every piece of work that can fail on one process ends with the processes
exchanging outcomes: if it failed anywhere it fails everywhere, with its own error on the process where it
failed and `StoppedWithAnotherProcess` naming that process and its error on the others.

`state` is an `accelerate.Accelerator` or `PartialState`. With one process nothing is exchanged. The work
itself must not wait for the other processes (no barrier inside): the exchange is the barrier.
"""
import torch.distributed as dist

from .errors import UserError, is_disk_full


class StoppedWithAnotherProcess(UserError):
    """Raised on the processes whose own work succeeded when another process's failed."""


def on_main(state, work):
    """`work()` on the main process (writing a file, choosing a checkpoint); every process returns its result,
    or every process raises."""
    return _together(state, work, main_only=True)[0]


def everywhere(state, work) -> list:
    """`work()` on every process (each saving its own RNG state, say): it succeeds everywhere or raises
    everywhere. Returns every process's result, by process index."""
    return _together(state, work, main_only=False)


def _together(state, work, main_only: bool) -> list:
    result, error = None, None
    if state.is_main_process or not main_only:
        try:
            result = work()
        except Exception as e:  # not KeyboardInterrupt: that ends every process anyway
            error = e
    outcomes = [(_describe(error), result)]
    if state.num_processes > 1:
        outcomes = [None] * state.num_processes
        dist.all_gather_object(outcomes, (_describe(error), result if error is None else None))
    if error is not None:
        raise error
    failed = [(index, message) for index, (message, _) in enumerate(outcomes) if message is not None]
    if failed:
        index, message = failed[0]
        raise StoppedWithAnotherProcess(f"{message} (on process {index}; every process stopped)")
    return [result for _, result in outcomes]


def _describe(error) -> str | None:
    if error is None:
        return None
    if isinstance(error, UserError):
        return str(error)
    if is_disk_full(error):
        return "no space left on device"
    return f"{type(error).__name__}: {error}"
