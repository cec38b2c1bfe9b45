"""The events path: the target's TTRPC_ADDRESS is the proxy's events socket, whose Forward
calls the proxy passes on to containerd's real TTRPC_ADDRESS, tracing each event.

The proxy answers Forward with what containerd answered, so the target's own retries
(containerd down, restarting) happen as they would without the proxy; the trace counts
them: `attempts` is how many times the target sent that envelope. A failpoint may drop an
event (answered OK, never forwarded), delay it, send it twice, or fail it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from google.protobuf.empty_pb2 import Empty

from shim.api.envelope_pb2 import ForwardRequest
from shim.proxy import record
from shim.ttrpc import Client, Code, Context, Server, TTRPCError

log = logging.getLogger("shim.proxy.events")

FORWARD_TIMEOUT = 5.0
_REMEMBERED = 256  # envelopes whose attempts are counted


class EventVerdict(NamedTuple):
    drop: bool = False
    delay: float = 0.0
    copies: int = 1
    error: TTRPCError | None = None
    hang: bool = False  # neither forwarded nor answered (the target's deadline ends it)
    then: Callable[[], None] | None = None


EVENT_PASS = EventVerdict()
# (container id, topic) -> what to do with the event
EventJudge = Callable[[str, str], EventVerdict]


def container_of(payload: dict | None) -> str:
    if not payload:
        return ""
    return str(payload.get("containerId") or payload.get("container_id") or payload.get("id") or "")


class EventsRelay:
    def __init__(self, containerd_ttrpc: str, trace: record.TraceFile | None,
                 judge: EventJudge | None = None) -> None:
        self._address = containerd_ttrpc
        self._trace = trace
        self._judge = judge
        self._client: Client | None = None
        self._client_lock = threading.Lock()
        self._seen: OrderedDict[tuple, int] = OrderedDict()
        self._seen_lock = threading.Lock()
        self.server = Server()
        self.server.register(record.EVENTS_SERVICE, {"Forward": (ForwardRequest, self.forward)})

    def forward(self, req: ForwardRequest, ctx: Context) -> Empty:
        ts = time.monotonic()
        env = req.envelope
        payload = None
        if self._trace is not None or self._judge is not None:
            payload = record.to_dict(_unpack(env.event.type_url, env.event.value), env.event.value)
        cid = container_of(payload)
        key = (env.topic, env.timestamp.seconds, env.timestamp.nanos, env.event.value)
        with self._seen_lock:
            attempts = self._seen.pop(key, 0) + 1
            self._seen[key] = attempts
            while len(self._seen) > _REMEMBERED:
                self._seen.popitem(last=False)
        verdict = self._judge(cid, env.topic) if self._judge is not None else EVENT_PASS
        error: TTRPCError | None = verdict.error
        if verdict.hang:
            if verdict.then is not None:
                verdict.then()
            time.sleep(ctx.time_remaining() or FORWARD_TIMEOUT)
            raise TTRPCError(Code.DEADLINE_EXCEEDED, "proxy: failpoint hang")
        try:
            if error is None and not verdict.drop:
                if verdict.delay > 0:
                    time.sleep(verdict.delay)
                remaining = ctx.time_remaining()
                timeout = FORWARD_TIMEOUT if remaining is None else max(0.1, remaining)
                metadata = {k: v[-1] for k, v in ctx.metadata.items() if v}
                for _ in range(max(1, verdict.copies)):
                    self._call(req, timeout, metadata)
        except TTRPCError as e:
            error = e
        finally:
            if self._trace is not None:
                extra = {"dropped": True} if verdict.drop else {}
                if verdict.copies > 1:
                    extra["copies"] = verdict.copies
                if error is not None:
                    extra.update(code=int(error.code), message=error.message)
                record.event(self._trace, ts=ts, cid=cid, topic=env.topic, payload=payload,
                             attempts=attempts, ok=error is None, duration=time.monotonic() - ts,
                             namespace=env.namespace, type_url=env.event.type_url, **extra)
        if verdict.then is not None:
            verdict.then()
        if error is not None:
            raise error
        return Empty()

    def _call(self, req: ForwardRequest, timeout: float, metadata: dict[str, str]) -> None:
        with self._client_lock:
            try:
                if self._client is None or self._client.closed:
                    self._client = Client(self._address, connect_timeout=timeout)
                client = self._client
            except OSError as e:  # containerd is away: the target retries
                raise TTRPCError(Code.UNAVAILABLE, f"proxy: containerd unreachable: {e}") from None
        try:
            client.call(record.EVENTS_SERVICE, "Forward", req, Empty, timeout=timeout, metadata=metadata)
        except OSError as e:
            raise TTRPCError(Code.UNAVAILABLE, f"proxy: forwarding to containerd: {e}") from None
        except TTRPCError as e:
            if isinstance(e, ConnectionError) or e.code == Code.DEADLINE_EXCEEDED:
                with self._client_lock:
                    if self._client is client:
                        client.close()
                        self._client = None
            raise

    def close(self) -> None:
        self.server.shutdown()
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _unpack(type_url: str, value: bytes):
    """The event payload, by its bare type URL (`containerd.events.TaskExit`)."""
    from google.protobuf import message_factory, symbol_database
    name = type_url.rsplit("/", 1)[-1]
    try:
        descriptor = symbol_database.Default().pool.FindMessageTypeByName(name)
    except KeyError:
        return None
    return record.decode(message_factory.GetMessageClass(descriptor), value)
