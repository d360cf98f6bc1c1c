"""The tests' forks of their own process: `ForkedPopen`, `subprocess.Popen` for the project's own Python commands,
started as a fork instead of a new interpreter; `hold_in_a_child`, a child that holds a lock as a running
trainer or launch holds it.

A new interpreter spends about 8 s importing torch and diffusers before a tiny trainer takes its first step; a
fork starts in milliseconds with this process's imports. The child runs the command as `python` would run it
(`python -m module ...`, `python script.py ...`, `python -c code`): its sys.argv, environment, working directory,
default signal dispositions, stdout and stderr where asked, and the command's exit code. `torchrun` starts
processes the same way, with the environment torchrun gives its workers.

One test still starts a real launcher, so the entry point is proven as users start it: `accelerate launch
train_dreambooth.py --config configs/dreambooth/demo.yaml` (test_train_dreambooth.py).
"""
import contextlib
import io
import logging
import multiprocessing
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback


class ForkedPopen:
    """`subprocess.Popen(args, ...)` for `args = [sys.executable, "-m" | "-c" | script, ...]`. stdout and stderr
    may be None (this process's), DEVNULL, PIPE, STDOUT (stderr only), a file or a file descriptor.
    `preexec_fn` runs in the child before the command, as with Popen."""

    def __init__(self, args, cwd=None, env=None, stdout=None, stderr=None, text=False, preexec_fn=None,
                 start_new_session=False):
        if args[0] != sys.executable or len(args) < 2:
            raise ValueError(f"ForkedPopen runs `{sys.executable} ...` commands only, not {args}")
        self.args, self.text, self.returncode = list(args), text, None
        self._pipes, self._opened = {}, []
        targets = [self._target(stdout, "stdout"), self._target(stderr, "stderr")]
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            _child(self.args, cwd, env, targets, preexec_fn, start_new_session)  # never returns
        for fd in self._opened:  # the child's now
            os.close(fd)

    def _target(self, where, name):
        """The file descriptor the child's stdout/stderr goes to (-1: stdout's, for STDOUT)."""
        if where is None:
            return 1 if name == "stdout" else 2
        if where == subprocess.STDOUT:
            return -1
        if where == subprocess.DEVNULL:
            self._opened.append(os.open(os.devnull, os.O_WRONLY))
            return self._opened[-1]
        if where == subprocess.PIPE:  # a file, read once the child has ended (no pipe to fill and block on)
            self._pipes[name] = tempfile.TemporaryFile()
            return self._pipes[name].fileno()
        return where if isinstance(where, int) else where.fileno()

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def communicate(self, timeout=None):
        self.wait(timeout)
        return self._read("stdout"), self._read("stderr")

    def _read(self, name):
        pipe = self._pipes.get(name)
        if pipe is None:
            return None
        pipe.seek(0)
        data = pipe.read()
        return data.decode(errors="replace") if self.text else data

    def send_signal(self, signum):
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def _child(args, cwd, env, targets, preexec_fn, start_new_session):
    """The forked child: become `python ARGS` and exit with its code (never back into the test's process)."""
    code = 1
    try:
        out, err = targets
        os.dup2(out, 1)
        os.dup2(1 if err == -1 else err, 2)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True,
                                      errors="backslashreplace")
        _as_a_new_interpreter(cwd, env, start_new_session)
        if preexec_fn is not None:
            preexec_fn()
        code = _run_command(args[1:])
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            from ether_diffusion import run_folder

            run_folder.release_all()  # what the interpreter's exit would do (atexit): no lock left behind
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _as_a_new_interpreter(cwd, env, start_new_session):
    """What differs between this forked process and a new interpreter, put as the new interpreter has it."""
    if start_new_session:
        os.setsid()
    if cwd is not None:
        os.chdir(cwd)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # logging: no pytest capture handler on the root logger; library handlers write to the new stderr
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.WARNING)
    for logger in [root, *logging.root.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler:
                handler.stream = sys.stderr  # (not setStream: it flushes the old stream, which may be closed)
    import torch
    from accelerate.state import AcceleratorState, GradientState

    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _run_command(argv) -> int:
    """`python ARGV`'s exit code."""
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1


def run(args, capture_output=False, timeout=None, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` with ForkedPopen: the child is killed when the timeout passes."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child = ForkedPopen(args, **kwargs)
    try:
        out, err = child.communicate(timeout)
    finally:
        child.kill()
    return subprocess.CompletedProcess(args, child.returncode, out, err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, processes: int, env: dict, cwd=None, timeout=600, preexec_fn=None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node PROCESSES ARGS` (ARGS as after `python`): the workers with
    torchrun's environment, their output together; when one fails, the others get SIGTERM as torchrun sends
    it. Returns the finished launch: its code is the first failed worker's, else 0."""
    port = free_port()
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    workers = []
    for rank in range(processes):
        worker_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0",
                      "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "forked"}
        workers.append(ForkedPopen([sys.executable, *map(str, args)], cwd=cwd, env=worker_env, stdout=out,
                                   stderr=err, preexec_fn=preexec_fn))
    deadline, code = time.monotonic() + timeout, 0
    while any(w.poll() is None for w in workers):
        failed = [w.returncode for w in workers if w.returncode not in (None, 0)]
        if failed and not code:
            code = failed[0]
            for w in workers:
                w.terminate()
        if time.monotonic() > deadline:
            for w in workers:
                w.kill()
            raise subprocess.TimeoutExpired(args, timeout)
        time.sleep(0.02)
    code = code or next((w.returncode for w in workers if w.returncode), 0)
    out.seek(0)
    err.seek(0)
    return subprocess.CompletedProcess(args, code, out.read().decode(errors="replace"),
                                       err.read().decode(errors="replace"))


@contextlib.contextmanager
def hold_in_a_child(hold, *args):
    """A forked child process that calls `hold(*args)` (takes a lock, as a running trainer or launch holds it)
    and then sleeps; the block runs once `hold` has returned, and the child is killed (SIGKILL: no clean-up, as a
    `kill -9`) when the block ends. Forked, it starts in milliseconds with this process's imports, where a new
    interpreter would spend seconds importing torch."""
    fork = multiprocessing.get_context("fork")
    ready = fork.Event()

    def body():
        held = hold(*args)  # noqa: F841 - kept until the child is killed
        ready.set()
        threading.Event().wait()

    child = fork.Process(target=body, daemon=True)
    child.start()
    try:
        assert ready.wait(60), "the child did not take its lock"
        yield child
    finally:
        child.kill()
        child.join()
