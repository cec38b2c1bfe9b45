"""The one place in the daemon that waits for children.

The shim is a child subreaper: container processes (grandchildren through runc) are
re-parented to it. Exactly one loop calls waitpid(-1), so every exit is seen once:
  * exits of commands started with `spawn` (runc, loggers) go straight to their waiter,
    never through a lock that request handlers hold, so a handler waiting for runc
    cannot deadlock with exit processing;
  * every other exit (container init and exec processes) goes to `on_exit`, which must
    only queue it.
CPython's own Popen.wait must never be used here: it would race this loop and report a
reaped child as exit status 0.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from typing import Any, Callable

from shim.linux.libc import check, libc

PR_SET_CHILD_SUBREAPER = 36


def exit_code(status: int) -> int:
    """A wait status as containerd reports it: the exit code, or 128 + signal number."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def set_child_subreaper() -> None:
    check(libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


class Child:
    """A command started through the reaper; `wait` returns its exit code."""

    __slots__ = ("popen", "_done", "code")

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self._done = threading.Event()
        self.code: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _exited(self, code: int) -> None:
        self.code = code
        # Tell Popen the child is gone, so its finalizer never waits for a pid that
        # may by then belong to somebody else.
        self.popen.returncode = code
        self._done.set()

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise TimeoutError(f"process {self.pid} still running after {timeout}s")
        assert self.code is not None
        return self.code


ExitCallback = Callable[[int, int, float], None]


class Reaper:
    def __init__(self, on_exit: ExitCallback) -> None:
        self._on_exit = on_exit
        self._children: dict[int, Child] = {}
        # Held across Popen so the loop cannot reap a new child before it is registered.
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def install(self) -> None:
        """Route SIGCHLD to the wake-up pipe. Must run in the main thread."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        # A Python-level handler (not SIG_IGN/SIG_DFL) so the C handler writes the wake-up
        # byte; handled dispositions are reset to default in exec'd children.
        signal.signal(signal.SIGCHLD, lambda *_: None)

    def spawn(self, argv: list[str], **popen_kwargs: Any) -> Child:
        """Start a command whose exit status this reaper delivers to the returned Child."""
        with self._lock:
            popen = subprocess.Popen(argv, close_fds=True, **popen_kwargs)
            child = Child(popen)
            self._children[popen.pid] = child
        return child

    def run(self, should_stop: Callable[[], bool]) -> None:
        """Reap until `should_stop()` is true; `wake()` re-checks it at once."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        while not should_stop():
            self.reap()
            try:
                poller.poll(1000)
            except InterruptedError:
                pass
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        self.reap()

    def close(self) -> None:
        """Close the wake-up pipe (a reaper that was never installed: the zygote's rehearsal)."""
        os.close(self._wake_r)
        os.close(self._wake_w)

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code, when = exit_code(status), time.time()
            with self._lock:
                child = self._children.pop(pid, None)
            if child is not None:
                child._exited(code)
            else:
                self._on_exit(pid, code, when)
