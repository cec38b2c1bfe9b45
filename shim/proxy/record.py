"""The proxy's trace records: ttrpc calls and events decoded to JSON, in the project's trace format.

What a call's request and response are is known from the Task service's descriptor
(shim/api/task_pb2), so the table of methods is never written out by hand; a message that
does not decode is traced as its size rather than lost.
"""

from __future__ import annotations

import logging
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message

from shim.api import cgroups_v1_pb2, cgroups_v2_pb2, events_pb2, task_pb2  # noqa: F401 (register Any types)
from shim.api.envelope_pb2 import ForwardRequest
from shim.probe import trace
from shim.ttrpc import Code

log = logging.getLogger("shim.proxy.record")

TASK_SERVICES = ("containerd.task.v2.Task", "containerd.task.v3.Task")
EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
SRC = "proxy"

TRACE_ENV = "PYSHIM_TRACE"
TraceFile = trace.Tracer


def open_trace(environ: dict[str, str]) -> trace.Tracer | None:
    """The trace containerd's environment asks for (PYSHIM_TRACE=<file>), else None."""
    path = environ.get(TRACE_ENV, "")
    if not path:
        return None
    try:
        return trace.Tracer(path, src=SRC)
    except OSError as e:
        log.warning("cannot open trace %s: %s", path, e)
        return None


_TASK_METHODS: dict[str, MethodDescriptor] = dict(
    task_pb2.DESCRIPTOR.services_by_name["Task"].methods_by_name)
TASK_METHOD_NAMES = frozenset(_TASK_METHODS)


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
    """As pyshim traces a message (trace.message_dict); an undecodable one as its size."""
    if msg is None:
        return None if not payload else {"@undecoded_bytes": len(payload)}
    return trace.message_dict(msg)


def ids_of(msg: Message | None) -> tuple[str, str | None]:
    """(container id, exec id) a Task request names; the exec id is None for a request
    without one ("" names a container's init)."""
    if msg is None:
        return "", None
    fields = msg.DESCRIPTOR.fields_by_name
    return (getattr(msg, "id", "") if "id" in fields else "",
            getattr(msg, "exec_id") if "exec_id" in fields else None)


def _ids(cid: str, exec_id: str | None) -> dict:
    return {} if exec_id is None else {"exec_id": exec_id}


def call(tracer: TraceFile, *, ts: float, service: str, method: str, stream: int, cid: str,
         exec_id: str | None, request: dict | None, response: dict | None, code: int, message: str,
         duration: float) -> None:
    tracer.record("call", cid or None, ts=ts, **_ids(cid, exec_id), service=service, method=method,
                  stream=stream, request=request, response=response, code=int(code),
                  code_name=Code(code).name, message=message, duration=duration)


def event(tracer: TraceFile, *, ts: float, cid: str, topic: str, payload: dict | None, attempts: int,
          ok: bool, duration: float, **extra: Any) -> None:
    tracer.record("event", cid or None, ts=ts, topic=topic, payload=payload, attempts=attempts, ok=ok,
                  duration=duration, **extra)


def phase(tracer: TraceFile, name: str, cid: str = "", detail: Any = None, ts: float | None = None) -> None:
    tracer.record("phase", cid or None, ts=ts, name=name, **({} if detail is None else {"detail": detail}))


def failpoint(tracer: TraceFile, point: str, action: str, arg: Any, cid: str = "",
              exec_id: str | None = None) -> None:
    tracer.record("failpoint", cid or None, **_ids(cid, exec_id), point=point, action=action, arg=arg)
