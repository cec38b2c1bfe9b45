"""Task events, forwarded to containerd's ttrpc Events service in the order they happen.

One queue and one forwarding thread: an event is queued by the code path that makes it
true (Create before it replies, the exit handler after the process is gone), so the
order of the queue is the order containerd requires (create < start < exit < delete).
A failed Forward is retried in place, never behind later events. While containerd is
unreachable (down or restarting) an event is retried until it is RETRY_WINDOW old, as
long as runc-v2's publisher keeps trying (1+2+…+5 s), so that an exit that happens
during a containerd restart still reaches its subscribers; an error containerd itself
returns is retried ATTEMPTS times.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time

from google.protobuf.any_pb2 import Any
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from shim.api.envelope_pb2 import Envelope, ForwardRequest
from shim.probe import hooks as probe
from shim.ttrpc import Client, Code, TTRPCError

log = logging.getLogger("shim.task.events")

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
FORWARD_TIMEOUT = 5.0
ATTEMPTS = 5
RETRY_WINDOW = 15.0  # seconds after publication an event is retried while containerd is away
NAMESPACE_KEY = "containerd-namespace-ttrpc"


def timestamp_of(t: float | None) -> Timestamp:
    ts = Timestamp()
    if t is None:
        ts.seconds = -62135596800  # Go's zero time.Time: "not exited yet"
    else:
        ns = int(t * 1e9)
        ts.seconds, ts.nanos = divmod(ns, 1_000_000_000)
    return ts


class Publisher:
    def __init__(self, ttrpc_address: str, namespace: str, *, start: bool = True) -> None:
        """`start=False` leaves the forwarding thread to `start()`; events published
        before it runs wait in the queue."""
        self._address = ttrpc_address
        self._namespace = namespace
        self._queue: queue.Queue[tuple[str, Message, float] | None] = queue.Queue()
        self._client: Client | None = None
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        if start:
            self._thread.start()

    def start(self) -> None:
        self._thread.start()

    def publish(self, topic: str, event: Message) -> None:
        self._queue.put((topic, event, time.time()))

    def close(self, timeout: float = 2.0) -> None:
        """Forward what is queued (bounded by `timeout`), then stop."""
        self._queue.put(None)
        if self._thread.ident is None:
            self._thread.start()  # never started: it forwards what is queued, then stops
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if probe.ON:
                probe.event(getattr(item[1], "container_id", ""), item[0], item[1],
                            functools.partial(self._forward, *item))
            else:
                self._forward(*item)
        if self._client is not None:
            self._client.close()

    def _forward(self, topic: str, event: Message, when: float) -> tuple[int, bool]:
        """Forward one event, retrying; returns the attempts made and whether it went out."""
        request = ForwardRequest(envelope=Envelope(
            timestamp=timestamp_of(when), namespace=self._namespace, topic=topic,
            event=Any(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString()),
        ))
        attempt = 0
        while True:
            attempt += 1
            try:
                if self._client is None:
                    self._client = Client(self._address)
                self._client.call(EVENTS_SERVICE, "Forward", request, Empty,
                                  timeout=FORWARD_TIMEOUT,
                                  metadata={NAMESPACE_KEY: self._namespace})
                return attempt, True
            except (OSError, TTRPCError) as e:
                # OSError (ConnectionClosedError too): containerd is away; a timeout: busy
                away = isinstance(e, OSError) or getattr(e, "code", None) == Code.DEADLINE_EXCEEDED
                log.warning("forwarding %s failed (attempt %d): %s", topic, attempt, e)
                if self._client is not None:
                    self._client.close()
                    self._client = None
            if (time.time() - when >= RETRY_WINDOW) if away else attempt >= ATTEMPTS:
                log.error("dropped event %s after %d attempts", topic, attempt)
                return attempt, False
            time.sleep(min(attempt * 0.25, 1.0))
