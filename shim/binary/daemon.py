"""The long-lived shim process: serves the task API, reaps, and holds the containers' stdio.

It is forked, not exec'd: from the zygote (shim/binary/zygote.py), or from `start` when no
zygote runs; either way it inherits the listening socket `start` bound and skips a
second interpreter start-up. The main thread runs the reaper (Python only delivers
signals, SIGCHLD included, to the main thread); the ttrpc server runs in threads.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Callable

from shim.binary import log as shimlog
from shim.linux.reaper import set_child_subreaper

if TYPE_CHECKING:
    import socket

    from shim.task.events import Publisher
    from shim.task.service import TaskService
    from shim.ttrpc import Server

TASK_SERVICES = ("containerd.task.v2.Task", "containerd.task.v3.Task")

# Every module a daemon may import. Some are imported only where first needed, so that
# `start` stays quick when it forks a daemon itself; the zygote imports them all up
# front: an import in a forked daemon would build the module in memory of its own, and
# walk the import machinery's shared pages too (0.4 MiB per daemon when these were
# missing). A daemon warns at exit about any module the zygote did not have.
MODULES = (
    "shim.binary.daemon", "shim.task.events", "shim.task.service", "shim.ttrpc", "shim.linux.placement",
    "shim.probe.hooks", "shim.probe.trace", "shim.probe.points", "shim.probe.failpoints",
    "shim.api.envelope_pb2", "shim.api.runc_options_pb2", "shim.api.runctypes_pb2",
    "shim.api.runtimeoptions_pb2", "google.protobuf.any_pb2", "google.protobuf.empty_pb2",
    "google.protobuf.timestamp_pb2", "ctypes", "fcntl", "json", "struct", "termios", "tomllib",
)

log = logging.getLogger("shim.binary.daemon")


def detach(debug: bool, namespace: str, cid: str) -> None:
    """Leave start's session and its stdout/stderr pipe (containerd reads it to EOF)."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    fd = shimlog.open_log_fifo()
    os.dup2(fd if fd is not None else devnull, 2)  # stray writes and tracebacks go to the log
    os.close(devnull)
    shimlog.setup(debug, namespace=namespace, id=cid)
    if fd is not None:
        os.close(fd)


def run(listener_fd: int, debug: bool, namespace: str, cid: str, bundle: str,
        start_stdin: bytes, containerd_pid: int, preloaded: frozenset[str] = frozenset()) -> None:
    """The daemon's whole life, in a freshly forked process (from `start` or the
    zygote, which passes the modules it had loaded), serving on the listening socket
    `listener_fd`; never returns."""
    import socket
    try:
        detach(debug, namespace, cid)
        serve(socket.socket(fileno=listener_fd), namespace, cid, bundle,
              os.environ.get("TTRPC_ADDRESS", ""),
              start_stdin=start_stdin, containerd_pid=containerd_pid, preloaded=preloaded)
    except BaseException:
        log.exception("shim daemon for %s failed", cid)
    finally:
        os._exit(1)


def build(namespace: str, bundle: str, publisher: Publisher, request_shutdown: Callable[[], None],
          trace_dir: str) -> tuple[TaskService, Server]:
    """The task service and the ttrpc server with its methods registered: no thread
    started, no signal handler set (the zygote's rehearsal builds them too, and drops them)."""
    from shim.probe import hooks as probe
    from shim.task.service import TaskService
    from shim.ttrpc import Server

    service = TaskService(namespace, bundle, publisher, request_shutdown)
    server = Server()

    def serve_table(table: dict, replace: bool = True) -> None:
        for name in TASK_SERVICES:
            server.register(name, table, replace=replace)

    serve_table(probe.install(service.methods(), service.bundle_parent, trace_dir, serve_table),
                replace=False)
    return service, server


def serve(listener: socket.socket, namespace: str, cid: str, bundle: str, ttrpc_address: str, *,
          start_stdin: bytes = b"", containerd_pid: int = 0,
          preloaded: frozenset[str] = frozenset()) -> None:
    """Run the daemon until Shutdown with no containers left (or SIGTERM)."""
    from shim.runtime import options
    from shim.linux import placement
    from shim.probe import hooks as probe
    from shim.probe import points
    from shim.task.events import Publisher

    # Where containerd's runc shim puts itself: ShimCgroup, and an OOM score one above
    # containerd's, so the kernel picks a shim before containerd.
    opts = options.from_start_stdin(start_stdin, namespace, cid)
    shim_cgroup = opts.shim_cgroup
    # Tracing: the runtime option wins over containerd's environment (an annotation, at
    # Create, over both for its container).
    probe.reset()
    trace_file = opts.trace or os.environ.get(points.TRACE_ENV, "")
    if trace_file:
        try:
            probe.enable_trace(trace_file)
        except OSError as e:
            log.error("cannot trace to %s: %s", trace_file, e)
    probe.phase("daemon.begin", cid, detail="zygote" if preloaded else "start")
    trace_dir = opts.trace_dir or os.environ.get(points.TRACE_DIR_ENV) or points.DEFAULT_TRACE_DIR
    if shim_cgroup:
        placement.join_cgroup(os.getpid(), shim_cgroup)
    if containerd_pid:
        placement.adjust_oom_score(os.getpid(), containerd_pid)

    try:
        set_child_subreaper()
    except OSError as e:
        log.error("cannot become a child subreaper: %s", e)
    stopping = threading.Event()
    publisher = Publisher(ttrpc_address, namespace, start=False)
    service: TaskService

    def request_shutdown() -> None:
        stopping.set()
        service.reaper.wake()

    service, server = build(namespace, bundle, publisher, request_shutdown, trace_dir)
    service.reaper.install()
    signal.signal(signal.SIGTERM, lambda *_: request_shutdown())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=server.serve, args=(listener,), name="ttrpc", daemon=True).start()
    # Only now the other threads: each start waits for its thread to run, time that
    # containerd's first request (Create) no longer waits for.
    publisher.start()
    service.start()
    log.debug("serving on %s", listener.getsockname())
    probe.phase("daemon.serving", cid)
    service.reaper.run(stopping.is_set)

    log.debug("shutting down")
    probe.phase("daemon.exit", cid)
    # (Tracing imports json_format late, on purpose: a daemon without it never pays.)
    if preloaded and not probe.ON and (late := sorted(set(sys.modules) - preloaded)):
        log.warning("imported after the fork from the zygote (add to daemon.MODULES): %s",
                    " ".join(late))
    try:
        os.unlink(listener.getsockname())
    except OSError:
        pass
    server.shutdown()
    publisher.close()
    os._exit(0)
