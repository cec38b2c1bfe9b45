"""A warmed interpreter that forks shim daemons, so that a new shim costs a fork.

A shim daemon needs protobuf, the task service and their imports: tens of
milliseconds on every container's critical path, and several MiB of private memory
per shim. The zygote imports all of it once, freezes it for the garbage collector
(`gc.freeze`: collections then never write to those pages), and forks a daemon per
`start`. Forked daemons share its pages copy-on-write.

Nothing depends on the zygote staying alive:
  * `start` hands it the listening socket it has already bound (the address is
    already in the bundle). If no zygote answers, `start` forks the daemon itself, as
    it would without one, and leaves a new zygote behind for the next start.
  * A daemon is an ordinary child of the zygote: when the zygote exits, its daemons
    are re-parented like any orphan and go on serving.
  * The zygote exits on its own once it has had no daemon and no request for
    IDLE_SECONDS, as soon as the installed code changes under it (an inotify watch on
    the package's .py files), and when its containerd no longer listens.
Only a peer with the zygote's own uid is served; the socket is an owner-only file.

The fork itself is not on the critical path either: the zygote keeps one daemon forked
ahead, a spare, that waits for its container's request on a socket pair. A `start`'s
request (and its listening socket) goes to the spare, which becomes that container's
daemon, and the zygote forks the next spare a moment later, once that daemon is up. A
spare serves nobody until then, and exits when the zygote's end of the pair closes (the
zygote exited, or was killed). With no spare ready (two starts at once), the zygote
forks the daemon for the request itself.
"""

from __future__ import annotations

import os
import sys

import _socket  # the raw module: `start` must not pay for the socket module's import

TYPE_CHECKING = False  # as typing's, without importing typing on `start`'s path
if TYPE_CHECKING:
    import socket

ZYGOTE_DIR = "/run/pyshim"
IDLE_SECONDS = 5.0
# After a hand-off, the next spare waits this long: its fork and start-up would compete
# for the CPU with the daemon that just took the request, and containerd's Create.
SPARE_DELAY = 0.05
MAX_REQUEST = 1 << 20
DISABLE_ENV = "PYSHIM_NO_ZYGOTE"


def _source_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def socket_path(containerd_address: str) -> str:
    """One zygote per containerd, interpreter and installation (and mount namespace:
    the socket lives in /run, as containerd's own shim sockets do)."""
    from shim.binary.address import sha256
    key = f"{containerd_address}\0{sys.executable}\0{_source_dir()}\0{os.getuid()}".encode()
    return os.path.join(ZYGOTE_DIR, f"zygote-{sha256(key).hexdigest()[:16]}.sock")


def handoff(containerd_address: str, listener: _socket.socket, request: tuple) -> bool:
    """Ask a running zygote to fork the daemon for `request`; False when none did."""
    import marshal
    if os.environ.get(DISABLE_ENV):
        return False
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        conn.settimeout(1.0)
        try:
            conn.connect(socket_path(containerd_address))
            fd = listener.fileno().to_bytes(4, sys.byteorder, signed=True)  # a C int
            conn.sendmsg([marshal.dumps(request)],
                         [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd)])
        except OSError:
            return False  # no zygote, or one on its way out: nothing was handed over
        # Once handed over, only a refusal means nobody serves: the zygote answers as
        # soon as it has forked, but a loaded machine may keep it waiting.
        conn.settimeout(30.0)
        try:
            reply = conn.recv(64)
        except OSError:
            reply = b""
        return not reply.startswith(b"no") and reply != b""
    finally:
        conn.close()


# The zygote's program: `python -IS -c ZYGOTE_MAIN -address A zygote`, with sys.path set
# to where this `shim` was imported from, whatever launched `start` (the fast launcher,
# pip's console script, `python -m`): nothing may assume an install layout.
ZYGOTE_MAIN = """import sys
sys.path[:0] = {paths!r}
try:
    from shim.binary.zygote import main
except BaseException as e:
    sys.stderr.write('level=error msg="pyshim zygote cannot start: %s" runtime={runtime}\\n'
                     % repr(e).replace('"', "'"))
    raise SystemExit(1)
main()
"""


def failure_path(containerd_address: str) -> str:
    """Why the last zygote for this address could not start, for the next start to log: the
    log of the bundle that spawned it may be gone before the zygote gets that far."""
    return socket_path(containerd_address) + ".failed"


def lock_path(containerd_address: str) -> str:
    """The zygote of an address holds a lock (flock) on this file from before it imports
    anything until it exits: one zygote gets ready at a time, however many starts find
    none serving (a burst of starts on an idle node each spawned one, and all but one
    imported everything only to find the socket taken)."""
    return socket_path(containerd_address) + ".lock"


def _try_lock(path: str, flags: int) -> int:
    """An fd of `path` (opened with `flags`) that holds its lock; -1 if another process
    holds it. OSError if the file cannot be opened."""
    import fcntl
    fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return -1
    return fd


def _claim(containerd_address: str) -> int | None:
    """An fd holding the address's zygote lock; -1 if another process holds it; None if
    there is no lock to take (the zygote then finds out at bind)."""
    try:
        os.makedirs(ZYGOTE_DIR, mode=0o700, exist_ok=True)
        return _try_lock(lock_path(containerd_address), os.O_RDWR | os.O_CREAT)
    except OSError:
        return None


def spawn(containerd_address: str) -> None:
    """Start a zygote in the background (from `start`, after it has done its job), unless
    one is already getting ready or serving."""
    if os.environ.get(DISABLE_ENV):
        return
    _report_failure(containerd_address)
    lock = _claim(containerd_address)
    if lock == -1:
        return
    pid = os.fork()
    if pid != 0:
        if lock is not None:
            os.close(lock)  # the zygote holds it now (a lock belongs to the open file)
        os.waitpid(pid, 0)  # the intermediate child exits at once
        return
    try:
        os.setsid()
        if os.fork() != 0:  # not a child of `start`: containerd waits for start's exit
            os._exit(0)
        from shim import RUNTIME
        from shim.binary import launcher
        from shim.binary.log import open_log_fifo, report
        devnull = os.open(os.devnull, os.O_RDWR)
        # Until it serves, the zygote's stderr is the log of the bundle `start` ran for,
        # so that a zygote that cannot start says why in containerd's log.
        log = open_log_fifo()
        for fd in (0, 1, 2):
            os.dup2(log if fd == 2 and log is not None else devnull, fd)
        os.close(devnull)
        if log is not None:
            os.close(log)
        os.chdir("/")
        try:
            code = ZYGOTE_MAIN.format(paths=launcher.search_path(), runtime=RUNTIME)
            held = []
            if lock is not None:
                os.set_inheritable(lock, True)
                held = ["-lock", str(lock)]
            os.execv(sys.executable, [sys.executable, "-IS", "-c", code,
                                      "-address", containerd_address, *held, "zygote"])
        except (OSError, ImportError) as e:
            report("error", f"pyshim zygote cannot start: {e}", fd=2)
    finally:
        os._exit(0)


def _report_failure(containerd_address: str) -> None:
    """Log (to this start's bundle) why the previous zygote could not start, once."""
    path = failure_path(containerd_address)
    try:
        with open(path) as f:
            reason = f.read()
        os.unlink(path)
    except OSError:
        return  # the usual case: no failure on record
    from shim.binary.log import report
    report("error", reason)


def _record_failure(containerd_address: str, reason: str) -> None:
    try:
        os.makedirs(ZYGOTE_DIR, mode=0o700, exist_ok=True)
        fd = os.open(failure_path(containerd_address), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, reason.encode(errors="replace"))
        finally:
            os.close(fd)
    except OSError:
        pass


def main() -> None:
    """The zygote process (see ZYGOTE_MAIN): its command line says what it is in ps."""
    address = sys.argv[sys.argv.index("-address") + 1]
    lock = int(sys.argv[sys.argv.index("-lock") + 1]) if "-lock" in sys.argv else -1
    from shim.binary.launcher import NAME
    _set_command_line([NAME, "-address", address, "zygote"])
    code = 0
    try:
        serve(address, lock)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    # No interpreter clean-up, as for the shim's binary: it would wait for the threads the
    # rehearsal left parked, and free every frozen object one by one.
    os._exit(code)


def _code_stamp() -> float:
    """The newest modification time of the installed code (the whole `shim` package): a
    zygote must never fork daemons from older code than the binary containerd just ran.
    Only where inotify is not available: otherwise the zygote watches the code instead
    of walking it before every fork."""
    newest = 0.0
    for root, _, files in os.walk(os.path.dirname(_source_dir())):
        for name in files:
            if name.endswith(".py"):
                try:
                    newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
                except OSError:
                    pass
    return newest


def serve(containerd_address: str, lock: int = -1) -> None:
    """Serve starts until idle, outdated or orphaned; `lock` is the fd of the address's
    lock (lock_path) that `spawn` took for this zygote, -1 without one."""
    import select
    import time

    from shim.binary import log as shimlog
    from shim.binary.address import is_live
    from shim.linux import inotify

    if lock >= 0:
        os.set_inheritable(lock, False)
    # Watched before _prepare imports the daemon's modules: a change meanwhile counts too.
    try:
        code_watch = inotify.watch_sources(os.path.dirname(_source_dir()))
    except OSError:
        code_watch = -1  # e.g. out of inotify instances: walk the code instead

    # stderr is the log of the bundle whose start spawned this zygote (see spawn): keep it
    # only to report a failed start, not for the rehearsal's lines, nor once serving.
    report_fd = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    shimlog.setup(False)  # a daemon then only sets its fields and level
    try:
        prepared = _prepare(containerd_address)
    except BaseException:
        import traceback
        reason = (f"pyshim zygote for {containerd_address} cannot start (each start then forks "
                  f"its daemon itself): {traceback.format_exc()}")
        shimlog.report("error", reason, fd=report_fd)
        _record_failure(containerd_address, reason)
        raise SystemExit(1) from None
    finally:
        os.close(report_fd)
    if prepared is None:
        return  # another zygote won the race
    sock, path, preloaded, (wake_r, wake_w) = prepared
    try:
        os.unlink(failure_path(containerd_address))  # an earlier failure no longer applies
    except OSError:
        pass
    stamp = _code_stamp() if code_watch < 0 else 0.0
    # What a forked child must not keep; the lock above all, or a daemon would keep every
    # later zygote of the address from starting.
    own_fds = (wake_r, wake_w) + tuple(fd for fd in (code_watch, lock) if fd >= 0)

    children: set[int] = set()
    last_activity = time.monotonic()
    spare: _Spare | None = None
    refill_at: float | None = last_activity  # when to fork the next spare
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    if code_watch >= 0:
        poller.register(code_watch, select.POLLIN)
    try:
        while True:
            timeout = 1000
            if refill_at is not None:
                timeout = max(0, min(timeout, int((refill_at - time.monotonic()) * 1000) + 1))
            ready = {fd for fd, _ in poller.poll(timeout)}
            if wake_r in ready:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            while children or spare is not None:
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    children.clear()
                    break
                if pid == 0:
                    break
                if spare is not None and pid == spare.pid:  # killed, or its fork failed
                    spare.close()
                    spare, refill_at = None, time.monotonic() + IDLE_SECONDS
                    continue
                children.discard(pid)
                last_activity = time.monotonic()
            # New code installed: let the next start spawn a fresh zygote.
            if code_watch >= 0:
                if code_watch in ready and inotify.sources_changed(code_watch):
                    return
            elif _code_stamp() != stamp:
                return
            if not ready and not is_live(containerd_address):
                return  # its containerd is gone (stopped, or restarting: a start respawns it)
            if sock.fileno() in ready:
                pid, spare_used = _fork_daemon(sock, own_fds, containerd_address, preloaded,
                                               spare)
                if spare_used:
                    assert spare is not None
                    spare.close()
                    spare, refill_at = None, time.monotonic() + SPARE_DELAY
                if pid:
                    children.add(pid)
                    # Only a daemon counts as activity: every new zygote on the machine
                    # probes the others' sockets (_remove_dead_sockets) with an empty
                    # connection, which must not keep an idle zygote alive.
                    last_activity = time.monotonic()
            elif not children and time.monotonic() - last_activity > IDLE_SECONDS:
                return
            elif refill_at is not None and time.monotonic() >= refill_at:
                spare = _fork_spare(sock, own_fds, containerd_address, preloaded)
                # Out of processes or fds: starts fork their daemons meanwhile.
                refill_at = None if spare is not None else time.monotonic() + IDLE_SECONDS
    finally:
        if spare is not None:
            spare.close()  # it sees the end of its pair, and exits
        # Unlink before closing: once the name is gone no start can reach this zygote,
        # and a new zygote's socket cannot be bound under it yet.
        for name in [path] + ([lock_path(containerd_address)] if lock >= 0 else []):
            try:
                os.unlink(name)
            except OSError:
                pass
        sock.close()
        if code_watch >= 0:
            os.close(code_watch)


def _prepare(containerd_address: str) -> tuple[socket.socket, str, frozenset[str], tuple[int, int]] | None:
    """Import, bind and warm up; None if another zygote already serves the address."""
    import gc
    import importlib
    import signal
    import socket

    from shim.binary import daemon
    from shim.binary import prefork
    from shim.binary import warmup
    from shim.binary.address import is_live

    for name in daemon.MODULES:  # everything a daemon imports, imported once here
        importlib.import_module(name)
    # Made here, not in each daemon: building it there would write to the pages of
    # every module's name.
    preloaded = frozenset(sys.modules)

    path = socket_path(containerd_address)
    os.makedirs(ZYGOTE_DIR, mode=0o700, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
    except OSError:
        if is_live(path, socket.SOCK_SEQPACKET):
            sock.close()
            return None
        os.unlink(path)
        sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    _remove_dead_sockets(path)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    warmup.rehearse()
    gc.collect()
    prefork.pack()
    gc.freeze()
    if os.environ.get(prefork.KSM_ENV) == "1":
        prefork.mark_mergeable()
    return sock, path, preloaded, (wake_r, wake_w)


def _remove_dead_sockets(own: str) -> None:
    """Sockets and locks of zygotes that were killed (nothing else could remove them)."""
    import socket

    from shim.binary.address import is_live
    for name in os.listdir(ZYGOTE_DIR):
        path = os.path.join(ZYGOTE_DIR, name)
        if not name.startswith("zygote-") or path in (own, own + ".lock"):
            continue
        if name.endswith(".sock") and not is_live(path, socket.SOCK_SEQPACKET):
            try:
                os.unlink(path)
            except OSError:
                pass
        elif name.endswith(".sock.lock"):
            try:
                fd = _try_lock(path, os.O_RDONLY)
            except OSError:
                continue
            if fd >= 0:  # nobody holds it: stale
                try:
                    os.unlink(path)
                except OSError:
                    pass
                os.close(fd)


class _Spare:
    """A daemon forked ahead of its request: its pid, and the zygote's end of its pair."""

    def __init__(self, pid: int, conn: socket.socket) -> None:
        self.pid = pid
        self.conn = conn

    def give(self, listener_fd: int, message: bytes) -> bool:
        """Hand the spare its request; False if it is gone (it then serves nobody)."""
        import socket
        try:
            return socket.send_fds(self.conn, [message], [listener_fd]) == len(message)
        except OSError:
            return False

    def close(self) -> None:
        self.conn.close()


def _fork_spare(sock: socket.socket, own_fds: tuple[int, ...], containerd_address: str,
                preloaded: frozenset[str]) -> _Spare | None:
    import socket
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        return None
    if pid == 0:
        sock.close()
        ours.close()
        for fd in own_fds:
            os.close(fd)
        _leave_zygote(containerd_address, "spare")
        _wait_as_spare(theirs, containerd_address, preloaded)
    theirs.close()
    return _Spare(pid, ours)


def _wait_as_spare(conn: socket.socket, containerd_address: str,
                   preloaded: frozenset[str]) -> None:
    """Never returns: becomes the daemon of the request the zygote sends, or exits when
    the zygote's end closes first."""
    import marshal
    import socket
    try:
        data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 1)
        conn.close()
        if len(fds) == 1 and data:
            request, cgroups = marshal.loads(data)
            _become_daemon(fds[0], request, cgroups, containerd_address, preloaded)
    except (OSError, ValueError, EOFError, TypeError):
        pass
    os._exit(0)


def _fork_daemon(sock: socket.socket, own_fds: tuple[int, ...], containerd_address: str,
                 preloaded: frozenset[str], spare: _Spare | None = None) -> tuple[int, bool]:
    """Accept one request and give it to the spare, or fork its daemon; returns the
    daemon's pid (0 if none) and whether the spare took it."""
    import marshal
    import socket
    import struct
    conn, _ = sock.accept()
    fds: list[int] = []
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer, uid, _ = struct.unpack("3i", creds)
        data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 1)
        if uid != os.geteuid() or len(fds) != 1 or not _same_namespaces(peer):
            conn.send(b"no")  # start then forks the daemon itself
            return 0, False
        request = marshal.loads(data)
        cgroups = _cgroup_dirs(peer)
        if spare is not None and spare.give(fds[0], marshal.dumps((request, cgroups))):
            conn.send(b"ok %d" % spare.pid)
            return spare.pid, True
        pid = os.fork()
        if pid == 0:
            sock.close()
            conn.close()
            for fd in own_fds:
                os.close(fd)
            if spare is not None:
                spare.close()
            _leave_zygote(containerd_address, "")
            _become_daemon(fds[0], request, cgroups, containerd_address, preloaded)
        conn.send(b"ok %d" % pid)
        return pid, spare is not None
    except (OSError, ValueError, EOFError, TypeError):
        return 0, False
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()


def _same_namespaces(peer: int) -> bool:
    """A daemon forked here lives in the zygote's pid and mount namespaces: serve only
    a `start` that runs in the same ones (a containerd in its own namespaces gets its
    own zygote, or none)."""
    try:
        return all(os.readlink(f"/proc/{peer}/ns/{ns}") == os.readlink(f"/proc/self/ns/{ns}")
                   for ns in ("pid", "mnt"))
    except OSError:
        return False


def _cgroup_dirs(peer: int) -> list[str]:
    """The cgroup directories of `start` (so containerd's), where its daemon belongs,
    as runc-v2's shim would be; empty when they are the zygote's own."""
    from shim.linux.cgroups import Cgroup
    try:
        with open(f"/proc/{peer}/cgroup") as f, open("/proc/self/cgroup") as g:
            if f.read() == g.read():
                return []  # the usual case, without parsing the cgroup mounts
        theirs, ours = Cgroup.for_pid(peer), Cgroup.for_pid(os.getpid())
    except (OSError, ValueError):
        return []
    if (theirs.v2_path, theirs.v1_paths) == (ours.v2_path, ours.v1_paths):
        return []
    return sorted({theirs.v2_path} if theirs.v2_path else set(theirs.v1_paths.values()))


def _leave_zygote(containerd_address: str, role: str) -> None:
    """What every process forked here does first, before it knows its container."""
    import signal
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # SIGTERM is already SIG_DFL: serve() set it
    if role:
        from shim.binary.launcher import NAME
        _set_command_line([NAME, "-address", containerd_address, role])


def _become_daemon(listener_fd: int, request: tuple, cgroups: list[str],
                   containerd_address: str, preloaded: frozenset[str]) -> None:
    """Never returns."""
    from shim.binary import daemon

    cwd, environ, debug, namespace, cid, start_stdin, containerd_pid = request
    _set_command_line(["containerd-shim-pyshim-v1", "-namespace", namespace,
                       "-address", containerd_address, "-id", cid])
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)
    for directory in cgroups:
        try:
            with open(os.path.join(directory, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError:
            pass  # stays in the zygote's cgroup
    daemon.run(listener_fd, debug, namespace, cid, cwd, start_stdin, containerd_pid,
               preloaded=preloaded)


def _set_command_line(argv: list[str]) -> None:
    """Show `argv` as this process's command line (`ps`, /proc/PID/cmdline), so that a
    daemon names its container like a runc-v2 shim does, not the zygote it was forked
    from. It is written over the zygote's original argv (Python keeps its own copy), so
    it is cut to that length."""
    import ctypes
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2:].split()  # fields from the 3rd on
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end
    except (OSError, ValueError, IndexError):
        return
    size = end - start
    data = b"\0".join(a.encode() for a in argv)[:size - 1]
    ctypes.memmove(start, data + b"\0" * (size - len(data)), size)
