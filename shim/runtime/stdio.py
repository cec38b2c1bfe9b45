"""A process's stdio: pipes (or a pty) to the container, copy loops to the client's FIFOs.

The container never writes to a FIFO directly: it writes to a pipe (or its terminal)
that the shim drains, so the container's stdio does not depend on the client (ctr,
containerd) being there.
  * stdout/stderr FIFOs: the shim opens each for writing once the client has opened it
    for reading, then once more for reading; that extra reader is never read, it keeps
    writes from failing with EPIPE while the client is away. Data then waits in the FIFO
    for the next reader.
  * stdin FIFO: the shim opens it for reading, then holds its own write end, so the
    container does not see EOF when a client disconnects; CloseIO drops that end, and
    the container sees EOF once the client has closed too.
  * `file:///path` appends stdout and stderr to a file; `binary:///path?k=v` starts a
    logging binary that reads the container's pipes itself (fds 3 and 4) and signals
    readiness on fd 5 (containerd's protocol for shim loggers).
Each copy loop owns the fds it uses and closes them when it ends, so no fd is closed
under a loop still using it; `close` only asks the loops to stop.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable
from urllib.parse import parse_qsl, unquote, urlsplit

from shim.probe import hooks as probe

log = logging.getLogger("shim.runtime.stdio")

CHUNK = 1 << 16
LOGGER_STOP_TIMEOUT = 12.0
EOT = b"\x04"  # what a terminal reads as end of input
QUIET_MS = 100  # a terminal whose process exited is copied until it is this long quiet
# How long Delete waits for the client to read what an output FIFO still holds, and how
# long it waits when nobody reads it at all (a detached client): see `wait_read`.
READ_TIMEOUT = 2.0
READ_STALL = 0.25
# The longest a copy loop waits between two looks for the client's late reader: a reader
# that never comes (its client died first) then costs one wake-up a second.
READER_POLL = 1.0


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _open_writer(path: str) -> int | None:
    """The FIFO at `path` opened for (blocking) writes, None while nobody reads it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.ENXIO:
            raise
        return None
    os.set_blocking(fd, True)
    return fd


def _open_keepalive(path: str) -> int:
    """A reader of the FIFO (or file) at `path` that is never read."""
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


def _copy(src: int, dst: int, stop_fd: int, quiet_fd: int | None = None,
          limit: int | None = None) -> int:
    """Move bytes from src to dst until EOF on src or until stop_fd becomes readable; once
    quiet_fd is readable too, also as soon as src has had nothing to read for QUIET_MS;
    with a `limit`, once that many bytes are copied. Returns the bytes copied."""
    copied = 0
    use_splice = True
    poller = select.poll()
    poller.register(src, select.POLLIN)
    poller.register(stop_fd, select.POLLIN)
    if quiet_fd is not None:
        poller.register(quiet_fd, select.POLLIN)
    timeout = None
    while limit is None or copied < limit:
        ready = [fd for fd, _ in poller.poll(timeout)]
        if stop_fd in ready or not ready:  # nothing ready: quiet for QUIET_MS
            return copied
        if quiet_fd in ready:
            poller.unregister(quiet_fd)
            timeout = QUIET_MS
            if src not in ready:
                continue
        chunk = CHUNK if limit is None else min(CHUNK, limit - copied)
        try:
            if use_splice:
                n = os.splice(src, dst, chunk)
                if n == 0:
                    return copied
                copied += n
                continue
            data = os.read(src, chunk)
            if not data:
                return copied
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view):]
            copied += len(data)
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno == errno.EINVAL and use_splice:
                use_splice = False  # not both ends are pipes: plain read/write
                continue
            if e.errno == errno.EIO:
                return copied  # a pty master after the last slave fd closed: end of output
            raise
    return copied


def _wait(fd: int) -> None:
    """Block until `fd` is readable (the stop pipe)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.poll()


def _drain(src: int, stop_fd: int) -> None:
    """Read and drop everything: keeps the container from blocking once its
    destination has failed."""
    poller = select.poll()
    poller.register(src, select.POLLIN)
    poller.register(stop_fd, select.POLLIN)
    while not any(fd == stop_fd for fd, _ in poller.poll()):
        try:
            if not os.read(src, CHUNK):
                return
        except OSError:
            return


Spawn = Callable[..., object]  # Reaper.spawn


class ProcessIO:
    """Stdio of one init or exec process, set up before runc runs it.

    Usage: construct; pass `runc_stdio` (and `console_socket`, for a terminal) to runc,
    with `begin` to call once runc runs; then call `started()`; `close()` when the
    process is deleted. The copy loops' threads start in `begin` (or at the latest in
    `started` or `close`): starting them while runc runs takes them off the caller's
    critical path, and nothing is lost meanwhile (the pipes hold what the process writes).
    """

    def __init__(self, label: str, stdin: str, stdout: str, stderr: str, *,
                 terminal: bool = False, uid: int = -1, gid: int = -1,
                 spawn: Spawn | None = None, env: dict[str, str] | None = None,
                 ids: tuple[str, str] = ("", "")) -> None:
        self.label = label
        self.ids = ids  # (container id, exec id), for traces and failpoints
        self.terminal = terminal
        self._uid, self._gid = uid, gid
        self._lock = threading.Lock()
        self._child: list[int] = []   # ends for runc; closed here once runc has them
        self._threads: list[threading.Thread] = []
        self._unstarted: list[threading.Thread] = []  # until begin()
        self._drained: list[threading.Event] = []
        self._stdin_keepalive: int | None = None
        self._stdin_src: int | None = None
        self._outputs: list[tuple[int | None, int | None, str, str]] = []  # (writer, keepalive, path, stream)
        self._readers: list[int] = []  # output keep-alive fds, ours until close()
        self._fifo_readers: list[int] = []  # those of them on a FIFO
        self._console: int | None = None
        self._console_dir: str | None = None
        self._console_listener: socket.socket | None = None
        self._logger: object | None = None  # reaper Child of a binary:// logger
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._exited: int | None = None  # eventfd: the terminal's process exited
        self._closing = False
        self.console_socket: str | None = None
        self._pending: list[int] = []  # fds not yet owned by a loop; closed on failure
        self._begun = False
        try:
            self.runc_stdio = self._setup(stdin, stdout, stderr, spawn, env or {})
        except BaseException:
            for fd in self._pending:
                _close(fd)
            self.close()
            raise
        self._pending.clear()

    # -- set-up ---------------------------------------------------------------------------

    def _setup(self, stdin: str, stdout: str, stderr: str, spawn: Spawn | None,
               env: dict[str, str]) -> tuple[int | None, int | None, int | None]:
        scheme = urlsplit(stdout).scheme if "://" in stdout else ""
        if stdin:
            self._open_stdin_fifo(stdin)
        if self.terminal:
            self._listen_console()
            if scheme == "binary":
                raise OSError(errno.EINVAL, "binary:// logging is not supported with a terminal")
            if stdout:
                self._outputs.append((*self._open_destination(stdout), "stdout"))
            return (None, None, None)
        runc_in = self._stdin_pipe() if stdin else None
        if scheme == "binary":
            if spawn is None:
                raise OSError(errno.EINVAL, "binary:// needs a process spawner")
            return (runc_in, *self._start_logger(stdout, spawn, env))
        runc_out = self._output_pipe(stdout, "stdout") if stdout else None
        runc_err = self._output_pipe(stderr if scheme != "file" else stdout, "stderr") \
            if (stderr or scheme == "file") else None
        return (runc_in, runc_out, runc_err)

    def _own(self, fd: int) -> int:
        self._pending.append(fd)
        return fd

    def _pipe(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        self._own(r), self._own(w)
        if self._uid >= 0 or self._gid >= 0:
            os.fchown(r, self._uid, self._gid)
            os.fchown(w, self._uid, self._gid)
        return r, w

    def _for_runc(self, fd: int) -> int:
        self._pending.remove(fd)
        self._child.append(fd)
        return fd

    def _open_stdin_fifo(self, path: str) -> None:
        # Reader first (never blocks), then our own writer, which can only succeed now
        # that a reader exists: no race with a client that closes its end early.
        # Not in `_pending`: `_stdin_src` is its one owner until a copy loop takes it.
        self._stdin_src = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._stdin_keepalive = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(self._stdin_src, True)

    def _stdin_pipe(self) -> int:
        r, w = self._pipe()
        assert self._stdin_src is not None
        self._start_stdin(w, False)
        return self._for_runc(r)

    def _start_stdin(self, dst: int, terminal: bool) -> None:
        # The loop owns (and closes) the FIFO now: `close` must not close it again, as
        # by then its number may belong to another process's stdio.
        src, self._stdin_src = self._stdin_src, None
        self._start(f"{self.label} stdin", self._pump_stdin, src, dst, terminal)

    def _open_destination(self, uri: str) -> tuple[int | None, int | None, str]:
        """(writer, keep-alive fd, path) for a FIFO or file URI; (None, None, path) for a
        FIFO the client has not opened yet (the copy loop waits for it: `_wait_for_reader`)."""
        if uri.startswith("file://"):
            path = unquote(urlsplit(uri).path)
            os.makedirs(os.path.dirname(path) or "/", mode=0o755, exist_ok=True)
            fd = self._own(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                   0o644))
            return fd, self._own(os.dup(fd)), path
        path = uri[len("fifo://"):] if uri.startswith("fifo://") else uri
        if "://" in path:
            raise OSError(errno.EINVAL, f"unknown STDIO scheme {urlsplit(path).scheme}")
        writer = _open_writer(path)
        if writer is None:
            return None, None, path
        return self._own(writer), self._own(_open_keepalive(path)), path

    def _output_pipe(self, uri: str, stream: str) -> int:
        writer, keepalive, path = self._open_destination(uri)
        r, w = self._pipe()
        self._start_output(r, writer, keepalive, path, stream)
        return self._for_runc(w)

    def _start_output(self, src: int, writer: int | None, keepalive: int | None, path: str,
                      stream: str, quiet_fd: int | None = None) -> None:
        done = threading.Event()
        self._drained.append(done)
        if keepalive is not None:
            if keepalive in self._pending:
                self._pending.remove(keepalive)
            self._keep(keepalive)
        self._start(f"{self.label} output", self._pump_output, src, writer, path, done, quiet_fd,
                    stream)

    def _keep(self, keepalive: int) -> None:
        """Hold an output's keep-alive reader until close(): it outlives the copy loop,
        and `wait_read` looks at the FIFO through it. Closed at once if closing already."""
        with self._lock:
            if self._closing:
                _close(keepalive)
                return
            self._readers.append(keepalive)
            if stat.S_ISFIFO(os.fstat(keepalive).st_mode):
                self._fifo_readers.append(keepalive)

    def _wait_for_reader(self, path: str) -> int | None:
        """A writer on the FIFO at `path` once the client has it open for reading; None
        if the stdio is closed first.

        Not a blocking open(2), which cannot be stopped, and not before the keep-alive
        reader (which would let it return at once): containerd's client opens its end in
        the background, blocking until a writer is there, and an open that came only
        after the output was copied and the writer closed would wait for ever; the output,
        in the FIFO all along, would be lost with it. runc-v2 waits for the reader too."""
        # The client's open usually comes within milliseconds, or tens of them on a loaded
        # machine, and the exit event waits for it: look again after a quarter of the time
        # waited so far (from 0.5 ms, up to READER_POLL).
        delay = 0.0005
        poller = select.poll()
        poller.register(self._stop_r, select.POLLIN)
        while (fd := _open_writer(path)) is None:
            if poller.poll(delay * 1000):
                return None
            delay = min(delay * 1.25, READER_POLL)
        return fd

    def _start(self, name: str, target: Callable[..., None], *args: object) -> None:
        """A copy loop, which owns the fds in `args` from now on; its thread starts in
        begin() (at once, once begin() has been called)."""
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(t)
        self._pending[:] = [fd for fd in self._pending if fd not in args]
        self._unstarted.append(t)
        if self._begun:
            self.begin()

    def begin(self) -> None:
        """Start the copy loops set up so far; those set up later start at once."""
        with self._lock:
            self._begun = True
            unstarted, self._unstarted = self._unstarted, []
        for t in unstarted:
            t.start()

    # -- binary:// loggers ----------------------------------------------------------------

    def _start_logger(self, uri: str, spawn: Spawn, env: dict[str, str]) -> tuple[int, int]:
        u = urlsplit(uri)
        argv = [unquote(u.path)]
        for k, v in parse_qsl(u.query, keep_blank_values=True):
            argv += [k, v] if v else [k]
        out_r, out_w = self._pipe()
        err_r, err_w = self._pipe()
        ready_r, ready_w = self._pipe()
        # The logger must get its pipes as fds 3, 4 and 5; Popen only maps 0-2, so a
        # minimal trampoline does the dup2s (and restores the signal dispositions that
        # an interpreter start changes) before exec'ing it.
        tramp = ("import os,signal,sys;a=sys.argv;[os.dup2(int(f),n,inheritable=True)"
                 " for n,f in ((3,a[1]),(4,a[2]),(5,a[3]))];"
                 "[signal.signal(s,signal.SIG_DFL) for s in (signal.SIGPIPE,signal.SIGXFSZ)];"
                 "os.execve(a[4],a[4:],os.environ)")
        self._logger = spawn([sys.executable, "-I", "-S", "-c", tramp, str(out_r), str(err_r),
                              str(ready_w), *argv],
                             pass_fds=(out_r, err_r, ready_w), env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        for fd in (out_r, err_r, ready_w):
            self._pending.remove(fd)
            _close(fd)
        try:
            # Ready when the logger writes to fd 5 or closes it (exit included).
            select.select([ready_r], [], [], 10)
        finally:
            self._pending.remove(ready_r)
            _close(ready_r)
        return self._for_runc(out_w), self._for_runc(err_w)

    # -- terminals ------------------------------------------------------------------------

    def _listen_console(self) -> None:
        base = os.environ.get("XDG_RUNTIME_DIR") or None
        self._console_dir = tempfile.mkdtemp(prefix="pty", dir=base)
        self.console_socket = os.path.join(self._console_dir, "pty.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(self.console_socket)
        sock.listen(1)
        self._console_listener = sock

    def _receive_console(self, timeout: float = 10.0) -> int:
        """The pty master runc sends over the console socket (SCM_RIGHTS)."""
        assert self._console_listener is not None
        self._console_listener.settimeout(timeout)
        conn, _ = self._console_listener.accept()
        with conn:
            conn.settimeout(timeout)
            _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        if len(fds) != 1:
            for fd in fds:
                _close(fd)
            raise OSError(errno.EPROTO, "runc sent no pty master over the console socket")
        os.set_inheritable(fds[0], False)
        return fds[0]

    def resize(self, width: int, height: int) -> None:
        if self._console is None:
            return  # no console: nothing to resize
        import fcntl
        import struct
        import termios
        fcntl.ioctl(self._console, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    # -- copy loops -----------------------------------------------------------------------

    def _pump_output(self, src: int, dst: int | None, path: str,
                     done: threading.Event, quiet_fd: int | None, stream: str) -> None:
        copied = 0
        fault = probe.stdio_start(*self.ids, stream) if probe.ON else None
        try:
            if dst is None:  # nobody read the FIFO at set-up
                log.debug("%s: nobody reads %s yet: its copy waits for the client", self.label, stream)
                dst = self._wait_for_reader(path)
                if dst is None:
                    return
                self._keep(_open_keepalive(path))
            if fault is None:
                copied = _copy(src, dst, self._stop_r, quiet_fd)
            else:  # a failpoint: copy up to its byte count, then stop or close
                copied = _copy(src, dst, self._stop_r, quiet_fd, limit=int(fault.arg or 0))
                if fault.type == "stop":
                    _wait(self._stop_r)
        except OSError as e:
            log.warning("%s: copying output to %s failed: %s", self.label, path, e)
            _drain(src, self._stop_r)
        finally:
            for fd in (src, dst):
                _close(fd)
            done.set()
            if probe.ON:
                probe.stdio_end(*self.ids, stream, copied)

    def _pump_stdin(self, src: int, dst: int, terminal: bool) -> None:
        copied = 0
        fault = probe.stdio_start(*self.ids, "stdin") if probe.ON else None
        try:
            if fault is None:
                copied = _copy(src, dst, self._stop_r)
            else:  # a failpoint: copy up to its byte count, then stop or close
                copied = _copy(src, dst, self._stop_r, limit=int(fault.arg or 0))
                if fault.type == "stop":
                    _wait(self._stop_r)
            if terminal:
                os.write(dst, EOT)  # a terminal has no half-close: send end-of-input
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.EIO):  # the container side is gone
                log.warning("%s: copying stdin failed: %s", self.label, e)
        finally:
            _close(src)
            _close(dst)  # for a pipe, this is the container's EOF
            if probe.ON:
                probe.stdio_end(*self.ids, "stdin", copied)

    # -- life cycle -----------------------------------------------------------------------

    def started(self) -> None:
        """runc has run: take the terminal (if any) and drop the shim's copies of the
        container's pipe ends, which would otherwise keep them from reaching EOF."""
        self.begin()
        self._drop_child_fds()
        if self.terminal and self._console is None:
            try:
                self._console = self._receive_console()
            finally:
                self._close_console_socket()
            if self._outputs:
                writer, keepalive, path, stream = self._outputs.pop()
                # A terminal ends (EIO) only once every process holding it is gone, and a
                # child the process left behind may hold it for ever: after the exit
                # (`wait_drained`), the copy ends as soon as the terminal falls quiet.
                self._exited = os.eventfd(0, os.EFD_CLOEXEC)
                self._start_output(os.dup(self._console), writer, keepalive, path, stream,
                                   self._exited)
            if self._stdin_src is not None:
                self._start_stdin(os.dup(self._console), True)

    def _close_console_socket(self) -> None:
        if self._console_listener is not None:
            self._console_listener.close()
            self._console_listener = None
        if self._console_dir is not None:
            shutil.rmtree(self._console_dir, ignore_errors=True)
            self._console_dir = None

    def close_stdin(self) -> None:
        with self._lock:
            _close(self._stdin_keepalive)
            self._stdin_keepalive = None

    def wait_drained(self, timeout: float) -> bool:
        """Once the process has exited: wait (bounded) until its output was copied, to
        EOF of its pipes, or for a terminal until it fell quiet."""
        with self._lock:
            if self._exited is not None:
                os.eventfd_write(self._exited, 1)
        deadline = time.monotonic() + timeout
        return all(done.wait(max(0.0, deadline - time.monotonic())) for done in self._drained)

    def wait_read(self, timeout: float = READ_TIMEOUT, stall: float = READ_STALL) -> bool:
        """Before the process is deleted: wait until the client has read everything its
        output FIFOs still hold. containerd's client (1.7 and later) closes its FIFO
        readers as soon as Delete returns, so output still in a FIFO then is lost, even
        though the client had it open all along. Bounded: `timeout` in all, and `stall`
        once nothing is being read (nobody reads a detached client's FIFOs)."""
        import fcntl
        import struct
        import termios

        def unread() -> int:
            total = 0
            for fd in self._fifo_readers:
                try:
                    total += struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
                except OSError:
                    pass
            return total

        start = changed = time.monotonic()
        last = -1
        while (left := unread()) > 0:
            now = time.monotonic()
            if left != last:
                last, changed = left, now
            if now - changed > stall or now - start > timeout:
                # Usual for a detached client; for a live one, what it had not read is lost.
                log.debug("%s: %d bytes of output still unread after %.2fs (%s): deleting",
                          self.label, left, now - start,
                          "no reads for %.2fs" % stall if now - changed > stall else "timeout")
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 1.0) -> None:
        """Stop the copy loops and the logger, and release everything."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self.begin()  # loops that never ran still own (and close) their fds
        self.started_without_console()
        self.close_stdin()
        os.write(self._stop_w, b"x")
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        _close(self._console)
        self._console = None
        for writer, keepalive, _, _ in self._outputs:  # never handed to a loop
            _close(writer)
            _close(keepalive)
        self._outputs.clear()
        for fd in self._readers:
            _close(fd)
        self._readers.clear()
        self._fifo_readers.clear()
        if self._stdin_src is not None:
            _close(self._stdin_src)
            self._stdin_src = None
        self._stop_logger()
        if any(t.is_alive() for t in self._threads):
            # A loop blocked writing to a full FIFO still uses the stop pipe; it is
            # released with the loop rather than closed under it.
            log.warning("%s: stdio copy still blocked at close", self.label)
            return
        _close(self._stop_r)
        _close(self._stop_w)
        with self._lock:
            _close(self._exited)
            self._exited = None

    def started_without_console(self) -> None:
        """Drop runc's ends and the console socket without waiting for a console."""
        self._drop_child_fds()
        self._close_console_socket()

    def _drop_child_fds(self) -> None:
        with self._lock:
            for fd in self._child:
                _close(fd)
            self._child.clear()

    def _stop_logger(self) -> None:
        child = self._logger
        if child is None:
            return
        self._logger = None
        pid = child.pid  # type: ignore[attr-defined]
        try:
            os.kill(pid, signal.SIGTERM)
            child.wait(LOGGER_STOP_TIMEOUT)  # type: ignore[attr-defined]
        except ProcessLookupError:
            pass
        except TimeoutError:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
