"""The proxy's long-lived process: one per target shim socket, for as long as that target lives.

It serves containerd on the proxy's socket (shim/proxy/forward.py) and the target on the
events socket (shim/proxy/events.py), and watches the target through a connection of its
own: when that connection ends and nothing listens on the target's socket any more, the
target is gone, so the proxy closes containerd's connections (containerd then runs
`delete`) and exits. It never depends on containerd: while containerd restarts it keeps
forwarding, and containerd reconnects to the address in the bundle, which is the proxy's.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

from shim.binary import log as shimlog
from shim.binary.address import is_live
from shim.proxy import PROXY_BINARY, PROXY_RUNTIME, record
from shim.proxy.events import EventsRelay
from shim.proxy.forward import Forwarder
from shim.proxy.perturb import Perturbations
from shim.proxy.target import State

log = logging.getLogger("shim.proxy.daemon")

WATCH_RETRY = 0.1
PAIRS_GRACE = 2.0  # for the target's last answers (Shutdown's) to reach containerd
EVENTS_GRACE = 5.0  # for Forward calls in flight when the target is gone (containerd may be slow)


def run(listener, events_listener, state: State,
        containerd_ttrpc: str, namespace: str, cid: str, debug: bool) -> None:
    """The daemon's whole life, in a freshly forked process; never returns."""
    code = 1
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        fd = shimlog.open_log_fifo()
        os.dup2(fd if fd is not None else devnull, 2)
        os.close(devnull)
        if fd is not None:
            os.close(fd)
        shimlog.setup(debug, runtime=PROXY_RUNTIME, namespace=namespace, id=cid)
        # In `ps`, not the `start` it was forked from (the same helper the zygote's daemons use).
        from shim.binary.zygote import _set_command_line
        _set_command_line([PROXY_BINARY, "-namespace", namespace, "-id", cid, "proxy"])
        # address.listen makes raw _socket sockets (cheap for `start`); the daemon wants the full kind
        serve(socket.socket(fileno=listener.detach()),
              socket.socket(fileno=events_listener.detach()) if events_listener is not None else None,
              state, containerd_ttrpc, namespace)
        code = 0
    except BaseException:
        log.exception("proxy daemon for %s failed", cid)
    finally:
        os._exit(code)


def serve(listener: socket.socket, events_listener: socket.socket | None, state: State,
          containerd_ttrpc: str, namespace: str) -> None:
    # Without PYSHIM_TRACE a tracer with no default file: a container's io.pyshim.trace
    # annotation may still route its records to a file of its own (see perturb.py).
    trace = record.open_trace(dict(os.environ)) or record.TraceFile(None, src=record.SRC)
    target_path = state.target_address.removeprefix("unix://")
    perturb = Perturbations(trace, target_path, state.target_binary)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    relay = relay_thread = None
    if events_listener is not None:
        relay = EventsRelay(containerd_ttrpc, trace, perturb.event)
        relay_thread = threading.Thread(target=relay.server.serve, args=(events_listener,),
                                        kwargs={"grace": EVENTS_GRACE}, name="proxy-events", daemon=True)
        relay_thread.start()
    forwarder = Forwarder(target_path, trace, perturb.request)
    threading.Thread(target=forwarder.serve, args=(listener, stopping), name="proxy-accept",
                     daemon=True).start()
    if trace is not None:
        record.phase(trace, "proxy-serving", detail={
            "target": state.target_address, "proxy": state.proxy_address,
            "events": events_listener.getsockname() if events_listener is not None else None})
    log.debug("proxy for %s serving on %s", state.target_address, state.proxy_address)
    watch(target_path, stopping)
    log.debug("target %s gone: proxy exits", state.target_address)
    if trace is not None:
        record.phase(trace, "proxy-exit", detail={"target": state.target_address})
    # runc-v2 removes the socket named in the bundle's `address` when it exits, which is the
    # proxy's: the target's own socket is left for the proxy to remove.
    if os.path.exists(target_path) and not is_live(target_path):
        try:
            os.unlink(target_path)
        except OSError:
            pass
    for path in (listener.getsockname(), events_listener.getsockname() if events_listener else ""):
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass
    try:
        listener.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    listener.close()
    forwarder.close_all(grace=PAIRS_GRACE)
    if relay is not None:
        # An event the target sent just before it left is still on its way to containerd.
        relay.server.shutdown()
        relay_thread.join(EVENTS_GRACE + 1)
        relay.close()


def watch(target_path: str, stopping: threading.Event) -> None:
    """Return once the target is gone (or on SIGTERM): a connection of ours to it ends and
    nothing listens on its socket any more."""
    while not stopping.is_set():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(target_path)
            sock.settimeout(0.5)  # to notice SIGTERM
            while not stopping.is_set():
                try:
                    if not sock.recv(1):
                        break
                except TimeoutError:
                    continue
        except OSError:
            pass
        finally:
            sock.close()
        if not is_live(target_path):
            return
        time.sleep(WATCH_RETRY)  # the target closed an idle connection: watch again
