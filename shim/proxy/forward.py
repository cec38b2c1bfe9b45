"""The task path: each containerd connection is paired with a connection of its own to the
target shim, and ttrpc frames are copied both ways, decoded on the way to be traced.

One connection for one connection keeps everything containerd relies on: stream ids reach
the target as containerd numbered them, a Wait stays pending while State and Kill follow on
the same connection, and when the target dies containerd sees its connection close, which
is how it learns that a shim is gone. Requests are copied in order; a failpoint may answer
one itself instead (`error`), or hold it and the requests behind it (`delay`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from shim.proxy import record
from shim.ttrpc import Code, TTRPCError, codec

log = logging.getLogger("shim.proxy.forward")

_RECV_SIZE = 64 * 1024
CONNECT_TIMEOUT = 5.0


class Verdict(NamedTuple):
    """What a failpoint decided for a request (or, from `after`, for its response): pass it
    on after `delay` seconds, or answer `error` instead, or neither (`hang`); then run
    `then` (e.g. kill the target once a reply went out). `after` is asked when the target's
    response arrives."""

    error: TTRPCError | None = None
    delay: float = 0.0
    hang: bool = False
    then: Callable[[], None] | None = None
    after: Callable[[], Verdict] | None = None


PASS = Verdict()
# (container id, exec id, method, decoded request) -> what to do with the request
Judge = Callable[[str, str | None, str, object], Verdict]


class _Pending(NamedTuple):
    ts: float
    service: str
    method: str
    cid: str
    exec_id: str | None
    request: dict | None
    response_type: type | None
    after: Callable[[], Verdict] | None


class Pair:
    """containerd's connection `down` and ours to the target, `up`."""

    def __init__(self, down: socket.socket, up: socket.socket, trace: record.TraceFile | None,
                 judge: Judge | None, on_close: Callable[[Pair], None]) -> None:
        self.down, self.up = down, up
        self._trace = trace
        self._judge = judge
        self._on_close = on_close
        self._down_lock = threading.Lock()  # the target's responses and our own answers
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._closed = False

    def start(self) -> None:
        threading.Thread(target=self._requests, name="proxy-down", daemon=True).start()
        threading.Thread(target=self._responses, name="proxy-up", daemon=True).start()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending, self._pending = self._pending, {}
        for sock in (self.down, self.up):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        now = time.monotonic()
        for sid, p in sorted(pending.items()):  # e.g. the Wait of a target that died
            self._record(sid, p, None, int(Code.UNAVAILABLE), "connection closed before the response", now)
        self._on_close(self)

    # -- containerd -> target ------------------------------------------------------------

    def _requests(self) -> None:
        decoder = codec.Decoder()
        try:
            while data := self.down.recv(_RECV_SIZE):
                for event in decoder.feed(data):
                    if isinstance(event, codec.FramingError):
                        log.warning("proxy: garbage from containerd: %s", event.reason)
                        return
                    if isinstance(event, codec.FrameTooLarge):  # as the target would answer
                        self._answer(event.stream_id, codec.too_large_error(event.length))
                        continue
                    if event.type == codec.REQUEST:
                        self._request(event)
                    else:
                        self.up.sendall(codec.encode_frame(*event))
        except OSError:
            pass
        finally:
            self.close()

    def _request(self, frame: codec.Frame) -> None:
        ts = time.monotonic()
        try:
            req = codec.decode_request(frame.data)
        except TTRPCError:
            self.up.sendall(codec.encode_frame(*frame))  # let the target say what is wrong
            return
        types = record.message_types(req.service, req.method)
        msg = record.decode(types[0] if types else None, req.payload)
        cid, exec_id = record.ids_of(msg)
        verdict = PASS
        if self._judge is not None and types is not None:
            try:
                verdict = self._judge(cid, exec_id, req.method, msg)
            except Exception:  # a bug in a failpoint must not take containerd's connection down
                log.exception("proxy: failpoints of %s %s", cid, req.method)
        pending = _Pending(ts, req.service, req.method, cid, exec_id,
                           record.to_dict(msg, req.payload) if self._trace and self._trace.wants(cid) else None,
                           types[1] if types else None, verdict.after)
        if verdict.delay > 0:
            time.sleep(verdict.delay)  # in order: the requests behind it wait too
        if verdict.error is not None or verdict.hang:
            if verdict.error is not None:
                self._answer(frame.stream_id, verdict.error)
                self._record(frame.stream_id, pending, None, int(verdict.error.code),
                             verdict.error.message, time.monotonic())
            if verdict.then is not None:
                verdict.then()
            return
        if verdict.then is not None:
            verdict.then()
        with self._lock:
            if self._closed:
                return
            self._pending[frame.stream_id] = pending
        self.up.sendall(codec.encode_frame(*frame))

    def _answer(self, stream_id: int, error: TTRPCError) -> None:
        with self._down_lock:
            self.down.sendall(codec.encode_response(stream_id, error=error))

    # -- target -> containerd ------------------------------------------------------------

    def _responses(self) -> None:
        decoder = codec.Decoder()
        try:
            while data := self.up.recv(_RECV_SIZE):
                for event in decoder.feed(data):
                    if isinstance(event, codec.FramingError):
                        log.warning("proxy: garbage from the target: %s", event.reason)
                        return
                    if isinstance(event, codec.FrameTooLarge):  # as containerd's client fails such a call
                        error = codec.too_large_error(event.length)
                        self._answer(event.stream_id, error)
                        with self._lock:
                            pending = self._pending.pop(event.stream_id, None)
                        if pending is not None:
                            self._record(event.stream_id, pending, None, int(error.code), error.message,
                                         time.monotonic())
                        continue
                    if event.type == codec.RESPONSE:
                        self._response(event)
                    else:
                        with self._down_lock:
                            self.down.sendall(codec.encode_frame(*event))
        except OSError:
            pass
        finally:
            self.close()

    def _response(self, frame: codec.Frame) -> None:
        end = time.monotonic()
        with self._lock:
            pending = self._pending.pop(frame.stream_id, None)
        verdict = pending.after() if pending is not None and pending.after is not None else PASS
        if verdict.delay > 0:
            time.sleep(verdict.delay)
        if verdict.error is not None:
            with self._down_lock:
                self.down.sendall(codec.encode_response(frame.stream_id, error=verdict.error))
        elif not verdict.hang:
            with self._down_lock:
                self.down.sendall(codec.encode_frame(*frame))
        if pending is not None:
            try:
                resp = codec.decode_response(frame.data)
            except TTRPCError as e:
                self._record(frame.stream_id, pending, None, int(e.code), e.message, end)
            else:
                code = resp.status.code if resp.HasField("status") else 0
                body = None
                if self._trace and self._trace.wants(pending.cid) and code == 0:
                    body = record.to_dict(record.decode(pending.response_type, resp.payload), resp.payload)
                if verdict.error is not None:  # what containerd got
                    code, message = int(verdict.error.code), verdict.error.message
                else:
                    message = resp.status.message
                self._record(frame.stream_id, pending, body, code, message, end)
        if verdict.then is not None:
            verdict.then()

    def _record(self, sid: int, p: _Pending, response: dict | None, code: int, message: str,
                end: float) -> None:
        if self._trace is None:
            return
        record.call(self._trace, ts=p.ts, service=p.service, method=p.method, stream=sid,
                    cid=p.cid, exec_id=p.exec_id, request=p.request, response=response, code=code,
                    message=message, duration=end - p.ts)


class Forwarder:
    """Accepts containerd's connections on the proxy's socket and pairs each with the target."""

    def __init__(self, target_path: str, trace: record.TraceFile | None, judge: Judge | None) -> None:
        self.target_path = target_path
        self._trace = trace
        self._judge = judge
        self._pairs: set[Pair] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified as pairs close

    def serve(self, listener: socket.socket, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                down, _ = listener.accept()
            except OSError:
                if stopping.is_set():
                    return
                time.sleep(0.05)
                continue
            self.connect(down)

    def connect(self, down: socket.socket) -> None:
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            up.settimeout(CONNECT_TIMEOUT)
            up.connect(self.target_path)
            up.settimeout(None)
        except OSError as e:
            log.warning("proxy: cannot reach the target at %s: %s", self.target_path, e)
            up.close()
            down.close()  # containerd sees the shim gone
            return
        pair = Pair(down, up, self._trace, self._judge, self._forget)
        with self._lock:
            self._pairs.add(pair)
        pair.start()

    def _forget(self, pair: Pair) -> None:
        with self._lock:
            self._pairs.discard(pair)
            self._idle.notify_all()

    def close_all(self, grace: float = 0.0) -> None:
        """Close every pair, after up to `grace` seconds for them to end by themselves (a
        target that exited closes its side once its last answers went out: they still pass)."""
        with self._lock:
            self._idle.wait_for(lambda: not self._pairs, timeout=grace)
            pairs = list(self._pairs)
        for pair in pairs:
            pair.close()
