"""Blocking, thread-safe ttrpc client on a Unix stream socket (unary calls only).

Calls from any number of threads share one connection: each takes the next odd
stream id and waits for its own Response, which one reader thread hands over
by stream id (responses may come out of order).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping

from google.protobuf.message import DecodeError, Message

from . import codec
from .errors import Code, TTRPCError, error_from_status
from .ttrpc_pb2 import KeyValue, Request

__all__ = ["Client", "ConnectionClosedError"]

_RECV_SIZE = 64 * 1024
_MAX_STREAM_ID = 0xFFFFFFFF


class ConnectionClosedError(TTRPCError, ConnectionError):
    """The connection closed before the call was answered (Go's ttrpc.ErrClosed).

    Both a TTRPCError (code Unavailable) and a ConnectionError.
    """

    def __init__(self, message: str = "ttrpc: closed") -> None:
        TTRPCError.__init__(self, Code.UNAVAILABLE, message)

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return (type(self), (self.message,))


class _Call:
    __slots__ = ("done", "data", "error")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()  # released by the reader thread with data or error
        self.data: bytes | None = None
        self.error: TTRPCError | None = None


class Client:
    """Client(path) connects at once; use as a context manager or call close()."""

    def __init__(self, path: str, *, connect_timeout: float | None = None) -> None:
        if path.startswith("unix://"):
            path = path[len("unix://") :]
        if path.startswith("@"):  # abstract socket, as Go's net.Dial spells it
            path = "\0" + path[1:]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(connect_timeout)
            sock.connect(path)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        # Locks: _wlock serializes id allocation + sending (ids must reach the
        # server in increasing order) and the final close; _lock guards the
        # fields below and is never held across I/O. Order: _wlock, then _lock.
        self._wlock = threading.Lock()
        self._lock = threading.Lock()
        self._next_id = 1
        self._pending: dict[int, _Call] = {}
        self._closed = False  # no new calls; set when the reader stops
        self._sock_closed = False
        self._reader = threading.Thread(target=self._read_loop, name="ttrpc-client", daemon=True)
        self._reader.start()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[Message],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Message:
        """Call service/method and return its response_type reply.

        Raises TTRPCError with the status sent by the server, DeadlineExceeded
        after `timeout` seconds, ConnectionClosedError if the connection ends first.
        """
        if timeout is not None and timeout <= 0:
            raise TTRPCError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
        deadline = None if timeout is None else time.monotonic() + timeout
        req = Request(service=service, method=method, payload=request.SerializeToString())
        if timeout is not None:
            req.timeout_nano = int(timeout * 1e9)
        if metadata:
            # Lowercased keys like Go's ttrpc.MD.Set.
            req.metadata.extend(KeyValue(key=k.lower(), value=v) for k, v in metadata.items())
        data = req.SerializeToString()
        if len(data) > codec.MAX_DATA_SIZE:
            raise codec.too_large_error(len(data))

        call = _Call()
        with self._wlock:
            with self._lock:
                if self._closed:
                    raise ConnectionClosedError()
                sid = self._next_id
                if sid > _MAX_STREAM_ID:
                    raise ConnectionClosedError("ttrpc: stream ids exhausted on this connection")
                self._next_id += 2
                self._pending[sid] = call
            try:
                self._sock.sendall(codec.encode_frame(sid, codec.REQUEST, 0, data))
            except OSError as exc:
                # Maybe half a frame went out: nothing more can be sent on this stream.
                self._stop()
                with self._lock:
                    self._pending.pop(sid, None)
                raise ConnectionClosedError(f"ttrpc: closed: {exc}") from exc

        if not call.done.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
            with self._lock:
                abandoned = self._pending.pop(sid, None) is not None
            if abandoned:  # a late response for sid is dropped by the reader
                raise TTRPCError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
            call.done.acquire()  # answered just now: take it

        if call.error is not None:
            raise call.error
        resp = codec.decode_response(call.data or b"")
        error = error_from_status(resp.status) if resp.HasField("status") else None
        if error is not None:
            raise error
        result = response_type()
        try:
            result.ParseFromString(resp.payload)
        except DecodeError as exc:
            raise TTRPCError(Code.INTERNAL, f"ttrpc: error unmarshalling payload: {exc}") from None
        return result

    def close(self) -> None:
        """Close the connection; calls still waiting raise ConnectionClosedError."""
        self._stop()
        if threading.current_thread() is not self._reader:
            self._reader.join()

    @property
    def closed(self) -> bool:
        return self._closed

    def _stop(self) -> None:
        with self._lock:
            if not self._sock_closed:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)  # the reader sees EOF and cleans up
                except OSError:
                    pass

    def _read_loop(self) -> None:
        decoder = codec.Decoder()
        try:
            while True:
                data = self._sock.recv(_RECV_SIZE)
                if not data:
                    break
                for event in decoder.feed(data):
                    if isinstance(event, codec.Frame):
                        if event.type == codec.RESPONSE:
                            self._resolve(event.stream_id, event.data, None)
                        # Data frames belong to streams, which this client never opens.
                    elif isinstance(event, codec.FrameTooLarge):
                        self._resolve(event.stream_id, None, codec.too_large_error(event.length))
                    else:
                        return  # garbage from the server: give up on the connection
        except OSError:
            pass
        finally:
            with self._lock:
                self._closed = True
                pending, self._pending = self._pending, {}
            for call in pending.values():
                call.error = ConnectionClosedError()
                call.done.release()
            self._stop()  # unblocks a sender stuck on a peer that stopped reading
            with self._wlock, self._lock:
                self._sock_closed = True
                self._sock.close()

    def _resolve(self, sid: int, data: bytes | None, error: TTRPCError | None) -> None:
        with self._lock:
            call = self._pending.pop(sid, None)
        if call is None:
            return  # timed out already, or an id we never used
        call.data, call.error = data, error
        call.done.release()
