"""Failpoints at the proxy's level: on Task calls (before they reach the target, or on their
response) and on the target's events, in containerd's failpoint grammar (shim/probe/failpoints.py).

Annotations of the container's config.json, read when its Create passes through:

    io.containerd.runtime.v2.shim.failpoint.<Method>   containerd's own (off, error, panic, delay)
    io.pyshim.failpoint.<Method>.before|after          pyshim's call points, and
    io.pyshim.failpoint.event.<topic>                  its event points (e.g. event.exit)
    io.pyshimproxy.failpoint.<point>                   any of those points, for the proxy alone

The first two are pyshim's own annotations too: in front of pyshim (which evaluates them
itself) the proxy leaves them to it, so that each fires once; io.pyshimproxy.failpoint.*
is always the proxy's. What the types mean here, the target being "the shim":

    error(msg)  the call is answered Unknown `msg` without reaching the target (`.after`: the
                target's answer is replaced); an event is refused, so the target retries it
    delay(ms)   the call (and the calls behind it on that connection), its response, or the
                event is held ms milliseconds
    panic(msg)  the target is SIGKILLed at once; the call gets no answer
    kill[(ms)]  the target is SIGKILLed, the call or event going on: at once, before it is
                passed on (`Create.after=1*kill`: the target has replied to Create and is dead
                when containerd reads the reply), or ms milliseconds later
    hang        no answer, ever (the caller's deadline ends it)
    drop, dup   (events) the event is answered OK but never forwarded / forwarded twice
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping

from shim.probe import points
from shim.probe.failpoints import CONTAINERD_TYPES, Failpoint, FailpointError, Term, parse
from shim.proxy import record
from shim.proxy.events import EVENT_PASS, EventVerdict
from shim.proxy.forward import PASS, Verdict
from shim.proxy.target import annotations_of
from shim.ttrpc import Code, TTRPCError

log = logging.getLogger("shim.proxy.perturb")

CONTAINERD_PREFIX = "io.containerd.runtime.v2.shim.failpoint."
PYSHIM_PREFIX = "io.pyshim.failpoint."
PROXY_PREFIX = "io.pyshimproxy.failpoint."
PYSHIM_BINARY = "containerd-shim-pyshim-v1"

CALL_TYPES = CONTAINERD_TYPES | {"hang", "kill"}
EVENT_TYPES = CALL_TYPES | {"drop", "dup"}


def point_types(point: str) -> frozenset[str] | None:
    """The types a proxy point accepts; None for a point the proxy does not have."""
    method, _, when = point.partition(".")
    if method == "event":
        return EVENT_TYPES if when else None
    if method in record.TASK_METHOD_NAMES and when in ("", "before", "after"):
        return CALL_TYPES
    return None


def failpoints(annotations: Mapping[str, str], target_evaluates_pyshim_points: bool) -> dict[str, Failpoint]:
    """point -> failpoint (`Start` is the same point as `Start.before`). Raises
    FailpointError naming the annotation for a malformed value or an unknown proxy point."""
    found: dict[str, Failpoint] = {}
    for key, value in annotations.items():
        if key.startswith(PROXY_PREFIX):
            point = key[len(PROXY_PREFIX):]
            types = point_types(point)
            if types is None:
                raise FailpointError(f"annotation {key}: the proxy has no failpoint {point!r}")
        elif target_evaluates_pyshim_points:
            continue
        elif key.startswith(CONTAINERD_PREFIX):
            point = key[len(CONTAINERD_PREFIX):]
            types = CONTAINERD_TYPES if point in record.TASK_METHOD_NAMES else None
            if types is None:
                raise FailpointError(f"annotation {key}: {point!r} is not a Task method")
        elif key.startswith(PYSHIM_PREFIX):
            point = key[len(PYSHIM_PREFIX):]
            types = point_types(point)
            if types is None:
                continue  # runc, exit and stdio points are inside pyshim, out of the proxy's reach
        else:
            continue
        point = point.removesuffix(".before")
        found[point] = parse(key, value, types)
    return found


def listener_pids(path: str) -> list[int]:
    """The processes that hold the listening socket bound at `path` (the shim that serves it)."""
    inodes = set()
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == path and fields[5] == "01":
                    inodes.add(f"socket:[{fields[6]}]")
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    pids.append(int(entry))
                    break
            except OSError:
                pass
    return pids


class Perturbations:
    """The failpoints of every container the proxy has seen created."""

    def __init__(self, trace: record.TraceFile | None, target_path: str, target_binary: str) -> None:
        self._trace = trace
        self._target_path = target_path
        self._leave_to_target = os.path.basename(target_binary) == PYSHIM_BINARY
        self._armed: dict[str, dict[str, Failpoint]] = {}
        self._lock = threading.Lock()

    # -- calls -------------------------------------------------------------------------

    def request(self, cid: str, exec_id: str | None, method: str, msg: object) -> Verdict:
        if method == "Create":
            annotations = annotations_of(getattr(msg, "bundle", ""))
            try:
                armed = failpoints(annotations, self._leave_to_target)
                self._route_trace(cid, annotations)
            except (FailpointError, points.ProbeConfigError) as e:
                return Verdict(error=TTRPCError(Code.INVALID_ARGUMENT, str(e)))
            with self._lock:
                if armed:
                    self._armed[cid] = armed
                    log.info("container %s: proxy failpoints armed: %s", cid,
                             ", ".join(f"{p}={fp}" for p, fp in sorted(armed.items())))
                else:
                    self._armed.pop(cid, None)
        mine = self._armed.get(cid)
        if not mine:
            return PASS
        verdict = self._fire(mine, method, cid, exec_id, Verdict)
        if f"{method}.after" in mine:
            verdict = verdict._replace(after=lambda: self._fire(mine, f"{method}.after", cid, exec_id, Verdict))
        return verdict

    def _route_trace(self, cid: str, annotations: Mapping[str, str]) -> None:
        """io.pyshim.trace, as pyshim reads it: this container's records to a file of the
        trace directory (PYSHIM_TRACE_DIR), beside or instead of PYSHIM_TRACE."""
        if self._trace is None:
            return
        value = annotations.get(points.TRACE_ANNOTATION)
        if value is None:
            self._trace.unroute(cid)
            return
        trace_dir = os.environ.get(points.TRACE_DIR_ENV) or points.DEFAULT_TRACE_DIR
        path = points.trace_path(value, trace_dir)
        try:
            self._trace.route(cid, path)
        except OSError as e:
            raise points.ProbeConfigError(f"annotation {points.TRACE_ANNOTATION}: {path}: {e.strerror}") from None

    # -- events ------------------------------------------------------------------------

    def event(self, cid: str, topic: str) -> EventVerdict:
        mine = self._armed.get(cid)
        if not mine:
            return EVENT_PASS
        return self._fire(mine, "event." + topic.rsplit("/", 1)[-1], cid, None, EventVerdict)

    # -- firing ------------------------------------------------------------------------

    def _fire(self, armed: dict[str, Failpoint], point: str, cid: str, exec_id: str | None, kind):
        fp = armed.get(point)
        term = fp.evaluate() if fp is not None else None
        if term is None:
            return kind()
        log.warning("container %s: failpoint %s fired: %s", cid, point, term)
        if self._trace is not None:
            record.failpoint(self._trace, point, term.type, term.arg, cid, exec_id)
        return self._verdict(term, kind)

    def _verdict(self, term: Term, kind):
        if term.type == "error":
            return kind(error=TTRPCError(Code.UNKNOWN, str(term.arg)))
        if term.type == "delay":
            return kind(delay=int(term.arg or 0) / 1000)
        if term.type == "hang":
            return kind(hang=True)
        if term.type == "panic":
            self.kill_target(listener_pids(self._target_path))
            return kind(hang=True)
        if term.type == "kill":
            pids = listener_pids(self._target_path)
            delay = int(term.arg or 0) / 1000
            if delay:
                return kind(then=lambda: threading.Timer(delay, self.kill_target, (pids,)).start())
            # At once, before the call (or the reply, at `.after`) is passed on: once
            # containerd has the reply, its next call must not find the target still alive.
            self.kill_target(pids)
            return kind()
        if term.type == "drop":
            return kind(drop=True)
        if term.type == "dup":
            return kind(copies=2)
        return kind()  # off

    def kill_target(self, pids: list[int]) -> None:
        log.warning("failpoint: SIGKILL to the target shim %s (pids %s)", self._target_path, pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
