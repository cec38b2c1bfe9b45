"""The proxy's trace records: ttrpc calls and events decoded to JSON, in the project's trace format.

What a call's request and response are is known from the Task service's descriptor
(shim/api/task_pb2), so the table of methods is never written out by hand; a message that
does not decode is traced as its size rather than lost.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message

from shim.api import cgroups_v1_pb2, cgroups_v2_pb2, events_pb2, task_pb2  # noqa: F401 (register Any types)
from shim.api.envelope_pb2 import ForwardRequest
from shim.ttrpc import Code

log = logging.getLogger("shim.proxy.record")

TASK_SERVICES = ("containerd.task.v2.Task", "containerd.task.v3.Task")
EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
SRC = "proxy"

TRACE_ENV = "PYSHIM_TRACE"


class TraceFile:
    """Appends one JSON object per line; a line is one write(2) on an O_APPEND file, so the
    proxy's processes (and a traced target's) can share one file without interleaving."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._pid = os.getpid()

    def write(self, record: dict) -> None:
        record.setdefault("pid", self._pid)
        line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
        try:
            os.write(self._fd, line.encode())
        except OSError as e:
            log.warning("trace %s: %s", self.path, e)

    def close(self) -> None:
        os.close(self._fd)


def open_trace(environ: dict[str, str]) -> TraceFile | None:
    """The trace file containerd's environment asks for (PYSHIM_TRACE=<file>), else None."""
    path = environ.get(TRACE_ENV, "")
    if not path:
        return None
    try:
        return TraceFile(path)
    except OSError as e:
        log.warning("cannot open trace %s: %s", path, e)
        return None


_TASK_METHODS: dict[str, MethodDescriptor] = dict(
    task_pb2.DESCRIPTOR.services_by_name["Task"].methods_by_name)


def message_types(service: str, method: str) -> tuple[type[Message], type[Message]] | None:
    """(request type, response type) of a call the proxy understands, else None."""
    if service == EVENTS_SERVICE and method == "Forward":
        from google.protobuf.empty_pb2 import Empty
        return ForwardRequest, Empty
    descriptor = _TASK_METHODS.get(method) if service in TASK_SERVICES else None
    if descriptor is None:
        return None
    return (message_factory.GetMessageClass(descriptor.input_type),
            message_factory.GetMessageClass(descriptor.output_type))


def decode(kind: type[Message] | None, payload: bytes) -> Message | None:
    if kind is None:
        return None
    msg = kind()
    try:
        msg.ParseFromString(payload)
    except DecodeError:
        return None
    return msg


def to_dict(msg: Message | None, payload: bytes = b"") -> dict | None:
    if msg is None:
        return None if not payload else {"undecoded_bytes": len(payload)}
    try:
        return json_format.MessageToDict(msg, preserving_proto_field_name=True)
    except (TypeError, ValueError, KeyError) as e:  # an Any of a type we do not know
        return {"undecoded_bytes": len(payload), "error": str(e)}


def ids_of(msg: Message | None) -> tuple[str, str]:
    """(container id, exec id) a Task request names."""
    return (getattr(msg, "id", "") or "", getattr(msg, "exec_id", "") or "") if msg is not None else ("", "")


def call(writer: TraceFile, *, ts: float, wall: float, service: str, method: str, stream: int,
         cid: str, exec_id: str, request: dict | None, response: dict | None, code: int,
         message: str, duration: float) -> None:
    writer.write(dict(
        ts=ts, wall=wall, src=SRC, kind="call", id=cid, **({"exec_id": exec_id} if exec_id else {}),
        service=service, method=method, stream=stream, request=request, response=response,
        code=int(code), code_name=Code(code).name, message=message, duration=duration))


def event(writer: TraceFile, *, ts: float, wall: float, cid: str, topic: str, payload: dict | None,
          attempts: int, ok: bool, duration: float, **extra: Any) -> None:
    writer.write(dict(ts=ts, wall=wall, src=SRC, kind="event", id=cid, topic=topic,
                      payload=payload, attempts=attempts, ok=ok, duration=duration, **extra))


def phase(writer: TraceFile, name: str, cid: str = "", detail: Any = None) -> None:
    record = dict(ts=time.monotonic(), wall=time.time(), src=SRC, kind="phase", id=cid, name=name)
    if detail is not None:
        record["detail"] = detail
    writer.write(record)


def failpoint(writer: TraceFile, point: str, action: str, arg: str, cid: str = "",
              exec_id: str = "") -> None:
    writer.write(dict(ts=time.monotonic(), wall=time.time(), src=SRC, kind="failpoint", id=cid,
                      **({"exec_id": exec_id} if exec_id else {}), point=point, action=action, arg=arg))
