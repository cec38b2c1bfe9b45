"""Threaded ttrpc server on a Unix stream socket; unary calls only (ttrpc.md §7).

Threads: serve() accepts in the caller's thread; each connection has one
reader thread, and every request runs in a thread of its own, because
containerd keeps Wait pending while it sends State/Kill on the same
connection. A handler's thread waits a while for the next request when it is
done (`_Workers`): starting a thread per call would add its start to every
call. Responses go out as handlers finish, so possibly out of order; one lock
per connection keeps frames whole. All threads are daemon threads.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping

from google.protobuf.message import DecodeError, Message

from . import codec
from .errors import Code, TTRPCError

__all__ = ["Context", "Handler", "Server", "MAX_INFLIGHT"]

log = logging.getLogger("shim.ttrpc")

# Requests running at once on one connection. containerd needs a handful
# (Wait per process plus the call at hand); the cap stops a peer that never
# reads its responses from growing threads without bound.
MAX_INFLIGHT = 1024

_RECV_SIZE = 64 * 1024
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Context:
    """What a handler knows about its call besides the request message."""

    __slots__ = ("service", "method", "metadata", "deadline", "stream_id", "after_reply")

    def __init__(
        self, service: str, method: str, metadata: dict[str, list[str]], deadline: float | None,
        stream_id: int = 0,
    ) -> None:
        self.service = service
        self.method = method
        self.metadata = metadata  # lowercased keys; a key may carry several values
        self.deadline = deadline  # time.monotonic() value, None without a timeout
        self.stream_id = stream_id
        # Called once the response has been written (or could not be), in the handler's
        # thread: for what must happen only after the caller has its answer.
        self.after_reply: list[Callable[[], None]] | None = None

    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline (may be negative), None without one."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def __repr__(self) -> str:
        return f"Context({self.service}/{self.method}, deadline={self.deadline})"


Handler = Callable[[Message, Context], Message]
_Method = tuple[type[Message], Handler]


class _Workers:
    """Threads that run one call each, then wait up to `idle` seconds for another.

    A waiting thread takes the next call instead of a new thread being started
    (about 0.15 ms each time, on the caller's critical path). `run` never waits for
    a thread to be free: with none waiting it starts one, so a call that blocks
    (Wait) never holds up another.
    """

    def __init__(self, idle: float = 10.0) -> None:
        self._idle = idle
        self._lock = threading.Lock()
        self._waiting = 0  # threads in _loop's get(); each put() is taken by exactly one
        self._calls: queue.SimpleQueue[tuple[Callable[..., None], tuple]] = queue.SimpleQueue()

    def run(self, fn: Callable[..., None], *args: object) -> None:
        """Run fn(*args) in a thread; raises RuntimeError if no thread can be started."""
        with self._lock:
            if self._waiting:
                self._waiting -= 1
                self._calls.put((fn, args))  # under the lock: see _loop's time-out
                return
        threading.Thread(target=self._loop, args=(fn, args), name="ttrpc-call", daemon=True).start()

    def _loop(self, fn: Callable[..., None], args: tuple) -> None:
        while True:
            fn(*args)
            with self._lock:
                self._waiting += 1
            try:
                fn, args = self._calls.get(timeout=self._idle)
            except queue.Empty:
                with self._lock:
                    # run() may have counted on this thread just before the time-out;
                    # its call is queued by now (both happen under the lock).
                    try:
                        fn, args = self._calls.get_nowait()
                    except queue.Empty:
                        self._waiting -= 1
                        return


class Server:
    def __init__(self, *, require_same_user: bool = True) -> None:
        self._require_same_user = require_same_user
        self._services: dict[str, dict[str, _Method]] = {}
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)  # notified as connections close
        self._conns: set[_Connection] = set()
        self._listener: socket.socket | None = None
        self._closing = False
        self._workers = _Workers()

    def register(self, service: str, methods: Mapping[str, _Method], *, replace: bool = False) -> None:
        """Serve `methods` (name -> (request type, handler)) under `service`.

        The same handlers may be registered under several service names (task v2 and v3).
        `replace` swaps the table of a registered service, also while serving: calls
        already running finish with the old handlers, the next ones get the new.
        """
        if service in self._services and not replace:
            raise ValueError(f"duplicate service {service} registered")
        self._services[service] = dict(methods)

    def serve(self, listener: socket.socket, *, grace: float = 1.0) -> None:
        """Accept connections until shutdown(); then close `listener` and the connections.

        Connections with calls in flight get up to `grace` seconds to answer them
        (so a Shutdown call's own response can go out) before they are cut.
        """
        with self._lock:
            if self._listener is not None:
                raise RuntimeError("ttrpc server is already serving")
            self._listener = listener
            closing = self._closing
        try:
            while not closing:
                try:
                    sock, _ = listener.accept()
                except (InterruptedError, ConnectionAbortedError, TimeoutError):
                    pass
                except OSError as exc:
                    if self._closing:  # shutdown() woke accept() with EINVAL
                        break
                    if exc.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                        raise  # the listener itself is gone
                    # EMFILE and friends: back off rather than spin.
                    log.warning("ttrpc: accept failed: %s", exc)
                    time.sleep(0.1)
                else:
                    self._accept(sock)
                closing = self._closing
        finally:
            listener.close()
            self._drain(grace)

    def shutdown(self) -> None:
        """Stop accepting and stop reading requests; serve() then closes everything.

        Never blocks, so it may be called from a handler (e.g. the Task
        Shutdown method) or a signal handler.
        """
        self._closing = True
        listener = self._listener
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
            except OSError:
                pass
        for conn in list(self._conns):
            conn.stop_reading()

    # -- internals ----------------------------------------------------------

    def _accept(self, sock: socket.socket) -> None:
        if self._require_same_user:
            ids = _peer_ids(sock)
            if ids != (os.geteuid(), os.getegid()):
                log.warning("ttrpc: rejected a connection from uid/gid %s", ids)
                sock.close()
                return
        conn = _Connection(self, sock)
        with self._lock:
            self._conns.add(conn)
        if self._closing:  # shutdown() ran after the loop's check but missed this one
            conn.stop_reading()
        threading.Thread(target=conn.run, name="ttrpc-conn", daemon=True).start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)
            self._drained.notify_all()

    def _drain(self, grace: float) -> None:
        for conn in list(self._conns):
            conn.stop_reading()
        with self._lock:
            self._drained.wait_for(lambda: not self._conns, timeout=grace)
            left = list(self._conns)
        for conn in left:
            conn.abort()

    def _lookup(self, service: str, method: str) -> _Method:
        methods = self._services.get(service)
        if methods is None:
            raise TTRPCError(Code.UNIMPLEMENTED, f"service {service}")
        entry = methods.get(method)
        if entry is None:
            raise TTRPCError(Code.UNIMPLEMENTED, f"method {method}")
        return entry


def _peer_ids(sock: socket.socket) -> tuple[int, int] | None:
    """The peer's (uid, gid) from SO_PEERCRED.

    The same-user check (Go's UnixSocketRequireSameUser) wants both equal to
    our euid/egid (ttrpc.md §1).
    """
    try:
        _, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError:
        return None
    return uid, gid


class _Connection:
    """One client connection.

    Locks: `_wlock` serializes writes and the final close, so a frame is never
    interleaved and the fd is never closed under a writer. `_state` guards the
    bookkeeping below and is never held across I/O; order is _wlock, then _state.
    The socket is closed once reading has stopped and no call is in flight,
    or at once if the stream is unusable (garbage, write error, abort).
    """

    __slots__ = ("_server", "_sock", "_wlock", "_state", "_inflight", "_reading", "_closed", "_last_id")

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self._server = server
        self._sock = sock
        self._wlock = threading.Lock()
        self._state = threading.Lock()
        self._inflight: set[int] = set()  # stream ids whose handler runs
        self._reading = True
        self._closed = False
        self._last_id = 0

    def run(self) -> None:
        decoder = codec.Decoder()
        clean_eof = False  # else the stream is unusable: close without waiting for handlers
        try:
            while True:
                data = self._sock.recv(_RECV_SIZE)
                if not data:
                    clean_eof = True
                    break
                for event in decoder.feed(data):
                    if not self._dispatch(event):
                        return  # garbage: closed below
        except OSError:
            pass  # reset by peer, or aborted
        finally:
            with self._state:
                self._reading = False
                idle = not self._inflight
            if idle or not clean_eof:
                self._close()

    def stop_reading(self) -> None:
        with self._state:
            if not self._closed:
                try:
                    self._sock.shutdown(socket.SHUT_RD)  # the reader sees EOF
                except OSError:
                    pass

    def abort(self) -> None:
        with self._state:
            if not self._closed:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)  # fails a blocked write too
                except OSError:
                    pass
        self._close()

    def _close(self) -> None:
        with self._wlock, self._state:
            if self._closed:
                return
            self._closed = True
            self._sock.close()
        self._server._forget(self)

    def _write(self, data: bytes) -> None:
        with self._wlock:
            if self._closed:
                return  # the peer left; the answer has nobody to go to
            try:
                self._sock.sendall(data)
            except OSError:
                # Peer gone, or a partial frame went out: the stream is dead either way.
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _reply_error(self, stream_id: int, error: TTRPCError) -> None:
        self._write(codec.encode_response(stream_id, error=error))

    def _dispatch(self, event: codec.Event) -> bool:
        """Handle one event from the reader thread; False if the connection must close."""
        if isinstance(event, codec.FramingError):
            log.warning("ttrpc: closing connection: %s", event.reason)
            return False
        if isinstance(event, codec.FrameTooLarge):
            self._reply_error(event.stream_id, codec.too_large_error(event.length))
            return True
        sid = event.stream_id
        if sid % 2 != 1:
            self._reply_error(
                sid, TTRPCError(Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams")
            )
        elif event.type == codec.REQUEST:
            self._request(event)
        elif event.type == codec.DATA:
            with self._state:
                active = sid in self._inflight
            if active:
                error = TTRPCError(
                    Code.UNIMPLEMENTED, "ttrpc: data frames are not supported on unary streams"
                )
            else:
                error = TTRPCError(Code.INVALID_ARGUMENT, "StreamID is no longer active")
            self._reply_error(sid, error)
        # A Response from a client means nothing; Go ignores unknown kinds as well.
        return True

    def _request(self, frame: codec.Frame) -> None:
        sid = frame.stream_id
        if sid <= self._last_id:
            self._reply_error(
                sid, TTRPCError(Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment")
            )
            return
        self._last_id = sid
        try:
            req = codec.decode_request(frame.data)
            req_type, handler = self._server._lookup(req.service, req.method)
            if frame.flags:
                raise TTRPCError(
                    Code.UNIMPLEMENTED, f"ttrpc: streaming is not supported by {req.service}/{req.method}"
                )
            with self._state:
                if len(self._inflight) >= MAX_INFLIGHT:
                    raise TTRPCError(
                        Code.RESOURCE_EXHAUSTED, "ttrpc: too many requests in flight on this connection"
                    )
                self._inflight.add(sid)
        except TTRPCError as exc:
            self._reply_error(sid, exc)
            return
        deadline = time.monotonic() + req.timeout_nano / 1e9 if req.timeout_nano > 0 else None
        metadata: dict[str, list[str]] = {}
        for kv in req.metadata:
            metadata.setdefault(kv.key.lower(), []).append(kv.value)
        ctx = Context(req.service, req.method, metadata, deadline, sid)
        try:
            self._server._workers.run(self._call, sid, req.payload, req_type, handler, ctx)
        except RuntimeError as exc:  # can't start new thread
            self._finish(sid, codec.encode_response(sid, error=TTRPCError(Code.RESOURCE_EXHAUSTED, str(exc))))

    def _call(
        self, sid: int, payload: bytes, req_type: type[Message], handler: Handler, ctx: Context
    ) -> None:
        frame = None
        try:
            frame = codec.encode_response(sid, _invoke(payload, req_type, handler, ctx))
        except TTRPCError as exc:
            frame = codec.encode_response(sid, error=exc)
        except codec.DataTooLarge as exc:
            frame = codec.encode_response(sid, error=TTRPCError(Code.RESOURCE_EXHAUSTED, str(exc)))
        except Exception as exc:
            log.exception("ttrpc: %s/%s failed", ctx.service, ctx.method)
            frame = codec.encode_response(sid, error=TTRPCError(Code.UNKNOWN, str(exc)))
        finally:
            if frame is None:  # BaseException: still answer, and let it propagate
                frame = codec.encode_response(sid, error=TTRPCError(Code.UNKNOWN, "ttrpc: handler aborted"))
            self._finish(sid, frame)
            if ctx.after_reply:
                for fn in ctx.after_reply:
                    fn()

    def _finish(self, sid: int, frame: bytes) -> None:
        self._write(frame)
        with self._state:
            self._inflight.discard(sid)
            last = not self._reading and not self._inflight
        if last:
            self._close()


def _invoke(payload: bytes, req_type: type[Message], handler: Handler, ctx: Context) -> bytes:
    request = req_type()
    try:
        request.ParseFromString(payload)
    except DecodeError as exc:
        raise TTRPCError(Code.INTERNAL, f"ttrpc: error unmarshalling payload: {exc}") from None
    response = handler(request, ctx)
    if response is None:
        raise TTRPCError(Code.UNKNOWN, "ttrpc: marshal called with nil")
    return response.SerializeToString()
