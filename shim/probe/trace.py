"""The trace: one JSON object per line, one line per happening, appended by every process.

Format (fixed; the trace tools and the tracing proxy read and write exactly this). Every
record has these keys:

    ts       time.monotonic() seconds (float) when the happening began: the system-wide
             CLOCK_MONOTONIC, so records of different processes compare
    wall     time.time() at that same moment
    pid      the writing process
    src      "pyshim" or "proxy"
    kind     "call", "runc", "event", "exit", "stdio", "phase" or "failpoint"
    id       the container id, null when not known (e.g. a phase before Create)
    exec_id  the exec id, on records about a process ("" for a container's init);
             absent where it does not apply

and, per kind:

    call       service, method, stream (int, the ttrpc stream id), request and response
               (protobuf json_format.MessageToDict with its defaults: lowerCamelCase
               names, zero values left out; or null; an Any of a type protobuf does not
               know, e.g. Exec's spec, as {"@type": url, "value": its JSON}), code (int, 0 = OK),
               code_name ("OK", "NOT_FOUND", ...), message, duration (s)
    runc       argv (list), duration, exit_status (int; -1 when runc could not be run, or
               a failpoint stood in for it), error (log.json's error or stderr, or null)
    event      topic, payload (dict), attempts (int), ok (bool), duration
    exit       proc_pid, status
    stdio      stream ("stdin", "stdout", "stderr"), phase ("start" or "end"), bytes (at end)
    phase      name (e.g. "start.begin", "start.address", "daemon.serving", "delete.begin"),
               detail (optional)
    failpoint  point (the annotation's point, e.g. "Start" or "runc.create.before"),
               action (the type, e.g. "error"), arg (its argument, or null)

Keys are only ever added, never renamed. Each record is written with one write() to a
file opened O_APPEND, so the records of `start`, the daemon and `delete` (and a proxy)
interleave whole in one file. Nothing here runs, nor is json imported, unless tracing
is on: TRACER stays None and every hook tests only that (via shim/probe/hooks.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

__all__ = ["Tracer", "TRACER", "enable", "route", "unroute", "open_trace_file", "message_dict",
           "KINDS"]

log = logging.getLogger("shim.probe.trace")

KINDS = ("call", "runc", "event", "exit", "stdio", "phase", "failpoint")

TRACER: Tracer | None = None  # the process's tracer; None: tracing is off


def open_trace_file(path: str) -> int:
    """An fd appending to `path` (created owner-only). Never follows a symlink at the
    last component, so a trace cannot be pointed at another file through one."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


class Tracer:
    """Writes records; those of a container routed elsewhere (`route`) go to that
    container's file, the rest to the default file (if any, else nowhere)."""

    def __init__(self, path: str | None = None, *, src: str = "pyshim") -> None:
        import json  # here, not at the top: a shim without tracing never imports it
        self._dumps = json.JSONEncoder(separators=(",", ":"), default=_fallback).encode
        self.src = src
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}  # path -> fd, shared by the routes to one file
        self._default: int | None = None
        self._routes: dict[str, int] = {}  # container id -> fd
        if path:
            self.set_default(path)

    def set_default(self, path: str) -> None:
        with self._lock:
            self._default = self._fd(path)

    def route(self, cid: str, path: str) -> None:
        """From now on, records of container `cid` go to `path` (only)."""
        with self._lock:
            self._routes[cid] = self._fd(path)

    def unroute(self, cid: str) -> None:
        with self._lock:
            self._routes.pop(cid, None)

    def routed(self, cid: str) -> bool:
        """Whether container `cid` has a trace of its own."""
        return cid in self._routes

    def wants(self, cid: str | None) -> bool:
        """Whether a record about `cid` would be written (lets callers skip building it)."""
        return self._default is not None or (cid is not None and cid in self._routes)

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = open_trace_file(path)
        return fd

    def record(self, kind: str, id: str | None = None, *, ts: float | None = None,
               **fields: Any) -> None:
        """Write one record; `ts` (a time.monotonic() value) defaults to now."""
        fd = self._routes.get(id, self._default) if id is not None else self._default
        if fd is None:
            return
        now = time.monotonic()
        wall = time.time()
        if ts is None:
            ts = now
        else:
            wall -= now - ts
        rec = {"ts": ts, "wall": wall, "pid": os.getpid(), "src": self.src, "kind": kind, "id": id}
        rec.update(fields)
        data = (self._dumps(rec) + "\n").encode()
        try:
            os.write(fd, data)  # one write: O_APPEND keeps it whole beside other writers
        except OSError as e:
            log.warning("trace: cannot write a %s record: %s", kind, e)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._routes.clear()
            self._default = None


def enable(path: str, *, src: str = "pyshim") -> Tracer:
    """Trace this process to `path` (records of routed containers excepted)."""
    global TRACER
    if TRACER is None:
        TRACER = Tracer(path, src=src)
    else:
        TRACER.set_default(path)
    return TRACER


def route(cid: str, path: str) -> Tracer:
    """Trace container `cid` to `path`, turning tracing on if it was off."""
    global TRACER
    if TRACER is None:
        TRACER = Tracer()
    TRACER.route(cid, path)
    return TRACER


def unroute(cid: str) -> None:
    if TRACER is not None:
        TRACER.unroute(cid)


def message_dict(msg: Any) -> dict | None:
    """A protobuf message as JSON-ready data: json_format.MessageToDict with its defaults
    (lowerCamelCase JSON names, fields at their zero value left out).

    containerd puts JSON of types protobuf does not know into some Any fields (Exec's
    OCI process spec, Update's resources): json_format refuses those, so such a field
    becomes {"@type": its type URL, "value": the JSON it holds} (or "valueBase64")."""
    if msg is None:
        return None
    from google.protobuf import json_format
    try:
        return json_format.MessageToDict(msg)
    except Exception:
        pass
    try:
        rest = type(msg)()
        rest.CopyFrom(msg)
        opaque = {}
        for field, value in msg.ListFields():
            if field.message_type is not None and field.message_type.full_name == "google.protobuf.Any":
                rest.ClearField(field.name)
                opaque[field.json_name] = [_any_dict(v) for v in value] \
                    if field.is_repeated else _any_dict(value)
        return {**json_format.MessageToDict(rest), **opaque}
    except Exception as e:  # deeper Any fields of unknown type: keep the trace going
        return {"@unprintable": f"{type(msg).__name__}: {e}"}


def _any_dict(a: Any) -> dict:
    from google.protobuf import json_format
    try:
        return json_format.MessageToDict(a)
    except Exception:
        pass
    import json
    try:
        return {"@type": a.type_url, "value": json.loads(a.value)}
    except ValueError:
        import base64
        return {"@type": a.type_url, "valueBase64": base64.b64encode(a.value).decode()}


def _fallback(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray)):
        return obj.decode(errors="replace")
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)
