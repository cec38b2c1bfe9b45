"""runc (or crun) command lines, run through the reaper.

Every command gets the same global flags as containerd's runc shim uses (`--root`,
`--log <bundle>/log.json --log-format json`, `--systemd-cgroup`), runs with the bundle as
cwd and the shim's environment minus NOTIFY_SOCKET. runc writes its errors to log.json,
not to stderr, so a failure's message is the last error line found there.

No runc command may hang the shim: each verb has a bound (`BOUNDS`), shortened to the
caller's deadline when the request that runs it has one (`request_deadline`, set by the
Task service around each call). A command still running at its bound is SIGKILLed and
fails with a message that names the verb and the bound.
"""

from __future__ import annotations

import contextvars
import json
import os
import select
import signal
import subprocess
import time
from typing import IO, Any, Callable

from shim.linux.reaper import Child, Reaper
from shim.probe import hooks as probe
from shim.runtime.config import RuncConfig


class RuncError(Exception):
    """A runc command failed; the message is runc's own error text, `status` its exit
    status (-1 when it could not be run)."""

    def __init__(self, message: str, status: int = -1) -> None:
        super().__init__(message)
        self.status = status


# Seconds a runc verb may take before it is killed. Verbs that only signal, read or
# remove state must never hang (a frozen cgroup, a stuck runc): 10 s, well above their
# usual few ms. Verbs that start processes run hooks and set up namespaces: 120 s, the
# kubelet's default runtime-request timeout (a caller that waited longer has given up).
# checkpoint and restore scale with the container's memory: bounded only by a deadline.
QUICK_BOUND = 10.0
START_BOUND = 120.0
BOUNDS: dict[str, float | None] = {
    "state": QUICK_BOUND, "kill": QUICK_BOUND, "delete": QUICK_BOUND, "ps": QUICK_BOUND,
    "pause": QUICK_BOUND, "resume": QUICK_BOUND, "update": QUICK_BOUND,
    "create": START_BOUND, "start": START_BOUND, "exec": START_BOUND,
    "checkpoint": None, "restore": None,
}

# time.monotonic() by which the request being served must be answered (ttrpc's
# timeout), or None; set per call by the Task service, read by every runc command.
request_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "request_deadline", default=None)


def bound_for(verb: str) -> float | None:
    """Seconds `verb` may run now: its bound, or less if the request's deadline is nearer."""
    bound = BOUNDS.get(verb, QUICK_BOUND)
    deadline = request_deadline.get()
    if deadline is not None:
        left = max(0.0, deadline - time.monotonic())
        bound = left if bound is None else min(bound, left)
    return bound


class Runc:
    def __init__(self, reaper: Reaper, config: RuncConfig, namespace: str, bundle: str) -> None:
        self.reaper = reaper
        self.config = config
        self.bundle = bundle
        self.namespace = namespace
        self.log_path = os.path.join(bundle, "log.json")
        self._env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}

    def run(self, *args: str, stdio: tuple[Any, Any, Any] | None = None,
            input: bytes | None = None, capture: bool = False,
            running: Callable[[], None] | None = None) -> bytes:
        """Run one runc command to completion; returns its stdout when `capture`.
        `running` is called once runc has been started, while it runs (the stdio copy
        loops start then: their thread starts overlap runc's own start-up)."""
        argv = self.config.command(self.namespace, self.bundle, *args)
        if probe.ON:  # the bundle's name is the container id (Create checks it)
            return probe.runc(os.path.basename(self.bundle), args[0], argv,
                              lambda: self._run(args[0], argv, stdio, input, capture, running),
                              RuncError)
        return self._run(args[0], argv, stdio, input, capture, running)

    def _run(self, verb: str, argv: list[str], stdio: tuple[Any, Any, Any] | None, input: bytes | None,
             capture: bool, running: Callable[[], None] | None = None) -> bytes:
        stdin: Any = subprocess.DEVNULL
        stdout: Any = subprocess.PIPE if capture else subprocess.DEVNULL
        stderr: Any = subprocess.PIPE
        if stdio is not None:
            # None: the stream is unused. Never let runc inherit the shim's own fds
            # (stderr is the shim's log).
            stdin, stdout, stderr = (subprocess.DEVNULL if fd is None else fd for fd in stdio)
        elif input is not None:
            stdin = subprocess.PIPE
        try:
            child = self.reaper.spawn(argv, cwd=self.bundle, env=self._env,
                                      stdin=stdin, stdout=stdout, stderr=stderr)
        except OSError as e:
            raise RuncError(f"{self.config.binary}: {e.strerror}") from None
        popen = child.popen
        bound = bound_for(verb)
        deadline = None if bound is None else time.monotonic() + bound
        if popen.stdin is not None:
            _write_all(popen.stdin, input or b"")
        if running is not None:
            try:
                running()
            except BaseException:
                _kill(child)
                raise
        out, err = _collect(popen.stdout, popen.stderr, deadline)
        try:
            code = child.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            _kill(child)
            raise RuncError(f"{self.config.binary} {verb} did not finish within "
                            f"{bound:g}s and was killed") from None
        if code != 0:
            text = self.last_error() or err.decode(errors="replace").strip()
            raise RuncError(text or f"{self.config.binary} {verb} exited with status {code}", code)
        return out

    def last_error(self) -> str:
        """The message of the last error runc wrote to log.json (only the file's tail is read)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 65536))
                lines = f.read().splitlines()
        except OSError:
            return ""
        for line in reversed(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
                return str(entry.get("msg", ""))
        return ""

    # -- the commands -------------------------------------------------------------------

    def create(self, cid: str, pid_file: str, stdio: tuple[Any, Any, Any],
               console_socket: str | None = None,
               running: Callable[[], None] | None = None) -> None:
        args = ["create", "--bundle", self.bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if self.config.no_pivot_root:
            args.append("--no-pivot")
        if self.config.no_new_keyring:
            args.append("--no-new-keyring")
        self.run(*args, cid, stdio=stdio, running=running)

    def checkpoint(self, cid: str, image_path: str, work_path: str, *, leave_running: bool,
                   tcp_established: bool = False, ext_unix_sk: bool = False,
                   shell_job: bool = False, file_locks: bool = False,
                   cgroups_mode: str = "", empty_ns: list[str] | None = None) -> None:
        args = ["checkpoint", "--image-path", image_path, "--work-path", work_path]
        for flag, on in (("--tcp-established", tcp_established), ("--ext-unix-sk", ext_unix_sk),
                         ("--shell-job", shell_job), ("--file-locks", file_locks)):
            if on:
                args.append(flag)
        if cgroups_mode:
            args += ["--manage-cgroups-mode", cgroups_mode]
        for ns in empty_ns or []:
            args += ["--empty-ns", ns]
        if leave_running:
            args.append("--leave-running")
        self.run(*args, cid)

    def restore(self, cid: str, image_path: str, work_path: str, pid_file: str,
                stdio: tuple[Any, Any, Any], parent_path: str = "",
                console_socket: str | None = None) -> None:
        args = ["restore", "--image-path", image_path, "--work-path", work_path]
        if parent_path:
            args += ["--parent-path", parent_path]
        args += ["--detach", "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if self.config.no_pivot_root:
            args.append("--no-pivot")
        # The shim is the subreaper; runc must not become one for the restored tree.
        args += ["-no-subreaper", "--bundle", self.bundle]
        self.run(*args, cid, stdio=stdio)

    def start(self, cid: str) -> None:
        self.run("start", cid)

    def exec(self, cid: str, process_json: str, pid_file: str, stdio: tuple[Any, Any, Any],
             console_socket: str | None = None,
             running: Callable[[], None] | None = None) -> None:
        args = ["exec", "--process", process_json]
        if console_socket:
            args += ["--console-socket", console_socket]
        self.run(*args, "--detach", "--pid-file", pid_file, cid, stdio=stdio, running=running)

    def kill(self, cid: str, sig: int, all: bool = False) -> None:
        self.run("kill", *(["--all"] if all else []), cid, str(sig))

    def delete(self, cid: str) -> None:
        self.run("delete", cid)

    def pause(self, cid: str) -> None:
        self.run("pause", cid)

    def resume(self, cid: str) -> None:
        self.run("resume", cid)

    def update(self, cid: str, resources_json: bytes) -> None:
        self.run("update", "--resources", "-", cid, input=resources_json)

    def ps(self, cid: str) -> list[int]:
        out = self.run("ps", "--format", "json", cid, capture=True)
        try:
            pids = json.loads(out.strip() or b"[]")
            return [int(p) for p in pids or []]
        except (ValueError, TypeError):
            # A failure of runc like any other, not an exception the RPC layer never expects.
            raise RuncError(f"{self.config.binary} ps: unexpected output {out[:200]!r}") from None


def _kill(child: Child) -> None:
    try:
        os.kill(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait(5.0)  # reaped by the reaper; never leave it to reuse its pid


def _collect(stdout: IO[bytes] | None, stderr: IO[bytes] | None,
             deadline: float | None) -> tuple[bytes, bytes]:
    """Read both pipes to EOF, or until `deadline`; close them. (stdout, stderr)."""
    fds = [-1 if pipe is None else pipe.fileno() for pipe in (stdout, stderr)]
    chunks: dict[int, list[bytes]] = {fd: [] for fd in fds}
    poller = select.poll()
    for fd in fds:
        if fd >= 0:
            poller.register(fd, select.POLLIN)
    open_fds = {fd for fd in fds if fd >= 0}
    while open_fds:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        for fd, _ in poller.poll(None if left is None else int(left * 1000) + 1):
            data = os.read(fd, 65536)
            if data:
                chunks[fd].append(data)
            else:
                poller.unregister(fd)
                open_fds.discard(fd)
    for pipe in (stdout, stderr):
        if pipe is not None:
            pipe.close()
    return b"".join(chunks[fds[0]]), b"".join(chunks[fds[1]])


def _write_all(pipe: IO[bytes], data: bytes) -> None:
    try:
        pipe.write(data)
    except BrokenPipeError:
        pass
    finally:
        try:
            pipe.close()
        except BrokenPipeError:
            pass

