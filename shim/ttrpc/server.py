"""Threaded ttrpc server on a Unix stream socket; unary calls only (ttrpc.md §7).

Threads: serve() runs the one I/O thread: an epoll loop that accepts
connections and reads every connection's frames, never blocking on any of
them (non-blocking accept, recv with MSG_DONTWAIT, no write that can wait).
A connection costs no thread of its own, so a slow, idle, half-open or
garbage connection cannot hold up accepting or reading the others. Every
request runs in a thread of its own, because containerd keeps Wait pending
while it sends State/Kill on the same connection. A handler's thread waits a
while for the next request when it is done (`_Workers`): starting a thread per
call would add its start to every call. Responses go out as handlers finish,
so possibly out of order; one lock per connection keeps frames whole. All
threads are daemon threads.

Bounds (`Limits`), chosen from what containerd does with a shim: it keeps one
connection per task it runs through the shim (one, or one per container of a
pod), plus a new one after each restart of its own; on a connection it keeps
one Wait pending per process (the init and every exec) and sends the other
calls beside it, each a few KiB at most (an exec's process spec is the
largest). So:

- connections at once: 128 (a pod of a hundred containers, and reconnects).
  One more is closed as soon as it is accepted.
- calls in flight: 512 per connection (200 concurrent execs on one container
  need about 400), 1024 on all connections together. A call past a bound is
  answered ResourceExhausted. The handler threads are these calls, so they are
  bounded by the same numbers (plus the I/O thread).
- bytes held: a frame being read is at most the protocol's 4 MiB; the
  requests of a connection's calls in flight and its answers not yet sent at
  most 16 MiB; all of it on all connections together at most 64 MiB. A
  request past a bound is answered ResourceExhausted; a partial frame past
  the total closes its connection, and so does an answer that cannot be
  queued. While answers wait to be sent, the connection is not read (as a Go
  server stops reading while its sender is blocked).
- time: a frame once begun must be complete within 30 s (containerd writes a
  frame whole) or its connection is closed; an answer that cannot be written
  within 30 s (the peer does not read) closes its connection.
- fairness: each connection has a reserve of 8 calls and 256 KiB that the
  totals do not count, so a client that exhausts the totals cannot starve
  containerd's connection of its next State, Kill or Exec. With the reserves
  the hard bounds are 2048 calls and 96 MiB.

Go's ttrpc server has none of these bounds; in the normal case they cost a
counter per call.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple

from google.protobuf.message import DecodeError, Message

from . import codec
from .errors import Code, TTRPCError

__all__ = ["Context", "Handler", "Limits", "Server", "DEFAULT_LIMITS"]

log = logging.getLogger("shim.ttrpc")

_RECV_SIZE = 64 * 1024
_ACCEPT_BATCH = 256  # accepts per wake-up before the connections get their turn
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_TIMEVAL = struct.Struct("ll")
_LOG_EVERY = 10.0  # seconds between two warnings of one kind
_NAME_QUOTED = 128  # characters of a service or method name quoted back in an error


class Limits(NamedTuple):
    """What the server holds at most; see the module docstring for the reasons."""

    connections: int = 128
    calls_per_connection: int = 512
    calls: int = 1024
    bytes_per_connection: int = 16 << 20
    bytes: int = 64 << 20
    reserved_calls: int = 8  # per connection, not counted in `calls`
    reserved_bytes: int = 256 << 10  # per connection, not counted in `bytes`
    frame_timeout: float = 30.0
    write_timeout: float = 30.0


DEFAULT_LIMITS = Limits()


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
    (Wait) never holds up another. The server bounds the calls, hence the threads.
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


class _Quiet:
    """A warning logged once, then at most once per _LOG_EVERY seconds with a count:
    a flood of bad connections must not flood containerd's log."""

    __slots__ = ("_text", "_next", "_skipped")

    def __init__(self, text: str) -> None:
        self._text = text
        self._next = 0.0
        self._skipped = 0

    def warn(self, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        more = f" (and {self._skipped} more)" if self._skipped else ""
        log.warning(self._text + more, *args)
        self._next, self._skipped = now + _LOG_EVERY, 0


class Server:
    def __init__(self, *, require_same_user: bool = True, limits: Limits = DEFAULT_LIMITS) -> None:
        self._require_same_user = require_same_user
        self.limits = limits
        self._services: dict[str, dict[str, _Method]] = {}
        self._lock = threading.Lock()  # guards the sets and the counters below
        self._drained = threading.Condition(self._lock)  # notified as connections close
        self._conns: set[_Connection] = set()  # open (fd not yet closed)
        self._shared_calls = 0  # calls and bytes beyond the connections' reserves
        self._shared_bytes = 0
        self._listener: socket.socket | None = None
        self._poller: select.epoll | None = None  # serve()'s; only its thread uses it
        self._reading: dict[int, _Connection] = {}  # fd -> connection, while in the poller
        self._closing = False
        self._workers = _Workers()
        self._warn_refused = _Quiet("ttrpc: refused a connection: %d connections open")
        self._warn_user = _Quiet("ttrpc: rejected a connection from uid/gid %s")
        self._warn_closed = _Quiet("ttrpc: closing connection: %s")

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
        """Accept and read connections until shutdown(); then close `listener` and the connections.

        Connections with calls in flight get up to `grace` seconds to answer them
        (so a Shutdown call's own response can go out) before they are cut.
        """
        with self._lock:
            if self._listener is not None:
                raise RuntimeError("ttrpc server is already serving")
            self._listener = listener
        poller = self._poller = select.epoll()
        reading = self._reading
        try:
            listener.setblocking(False)
            lfd = listener.fileno()
            poller.register(lfd, select.EPOLLIN)
            while not self._closing:
                for fd, mask in poller.poll(self._next_expiry()):
                    if fd == lfd:
                        self._accept(listener)
                    elif (conn := reading.get(fd)) is not None:
                        conn.ready(mask)
                if self._closing:
                    break
                now = time.monotonic()
                for conn in [c for c in reading.values() if c.expired(now)]:
                    conn.abort()
        finally:
            for conn in list(reading.values()):
                conn.stop()
            poller.close()
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
                listener.shutdown(socket.SHUT_RDWR)  # wakes the epoll loop on Linux
            except OSError:
                pass

    # -- internals (the I/O thread) -----------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        """Accept what is queued, up to a batch.

        At the connection bound, the connections whose peers have left (as after a burst
        of short connections) are reaped first; if that frees no slot, the queued
        connections are accepted and closed at once, so that the listener neither spins
        the loop nor lets its queue fill up.
        """
        reaped = False
        for _ in range(_ACCEPT_BATCH):
            with self._lock:
                full = len(self._conns) >= self.limits.connections
            if full and not reaped:
                self._reap()
                reaped = True
                with self._lock:
                    full = len(self._conns) >= self.limits.connections
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if self._closing:  # shutdown() woke the loop; accept() fails with EINVAL
                    return
                if exc.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                    raise  # the listener itself is gone
                # EMFILE and friends: back off rather than spin (level-triggered).
                log.warning("ttrpc: accept failed: %s", exc)
                time.sleep(0.1)
                return
            if full:
                self._warn_refused.warn(len(self._conns))
                sock.close()
                continue
            if self._require_same_user:
                ids = _peer_ids(sock)
                if ids != (os.geteuid(), os.getegid()):
                    self._warn_user.warn(ids)
                    sock.close()
                    continue
            conn = _Connection(self, sock)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(
                    int(self.limits.write_timeout), int(self.limits.write_timeout % 1 * 1e6)))
                self._poller.register(conn.fileno, select.EPOLLIN)  # type: ignore[union-attr]
            except OSError:
                sock.close()
                continue
            with self._lock:
                self._conns.add(conn)
            self._reading[conn.fileno] = conn

    def _reap(self) -> None:
        """Handle what the connections have pending now (EOFs first of all), without waiting."""
        lfd = self._listener.fileno()  # type: ignore[union-attr]
        for fd, mask in self._poller.poll(0):  # type: ignore[union-attr]
            if fd != lfd and (conn := self._reading.get(fd)) is not None:
                conn.ready(mask)

    def _next_expiry(self) -> float:
        """epoll's timeout: until the first partial frame or unsent answer times out, else none."""
        first = min((t for c in self._reading.values() if (t := c.deadline()) is not None),
                    default=None)
        if first is None:
            return -1
        return max(0.0, first - time.monotonic()) + 0.01

    def _charge(self, conn: _Connection, calls: int, nbytes: int, partial: int = 0) -> bool:
        """Count `calls`, `nbytes` (requests in flight, answers queued) and `partial` (a
        frame being read) more, or fewer if negative, for `conn`; False, counting nothing,
        if that would pass a bound. Giving back always succeeds. A partial frame is bounded
        per connection by the protocol's frame size (the decoder), here only in the total."""
        lim = self.limits
        with self._lock:
            c, b, p = conn.calls + calls, conn.held + nbytes, conn.partial + partial
            dc = max(0, c - lim.reserved_calls) - max(0, conn.calls - lim.reserved_calls)
            db = max(0, b + p - lim.reserved_bytes) - max(0, conn.held + conn.partial - lim.reserved_bytes)
            if (calls > 0 or nbytes > 0 or partial > 0) and (
                c > lim.calls_per_connection or b > lim.bytes_per_connection
                or self._shared_calls + dc > lim.calls or self._shared_bytes + db > lim.bytes
            ):
                return False
            conn.calls, conn.held, conn.partial = c, b, p
            self._shared_calls += dc
            self._shared_bytes += db
            return True

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)
            self._drained.notify_all()

    def _drain(self, grace: float) -> None:
        with self._lock:
            self._drained.wait_for(lambda: not self._conns, timeout=grace)
            left = list(self._conns)
        for conn in left:
            conn.abort()

    def _lookup(self, service: str, method: str) -> _Method:
        methods = self._services.get(service)
        if methods is None:
            raise TTRPCError(Code.UNIMPLEMENTED, f"service {_cut(service)}")
        entry = methods.get(method)
        if entry is None:
            raise TTRPCError(Code.UNIMPLEMENTED, f"method {_cut(method)}")
        return entry


def _cut(name: str) -> str:
    """A client's name as quoted back in an error: short, so an answer stays small."""
    return name if len(name) <= _NAME_QUOTED else name[:_NAME_QUOTED] + "..."


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

    Reading happens only in the server's I/O thread (ready()), and so do the
    answers that thread gives itself (protocol errors, refusals): those are
    small, so a non-blocking send takes one whole or none; what the socket does
    not take waits in `_queued`, and the connection is not read meanwhile (the
    peer gets back-pressure, as from Go's server). Handler threads write their
    answers with a blocking send bounded by SO_SNDTIMEO.

    Locks: `_wlock` serializes writes and the final close, so a frame is never
    interleaved and the fd is never closed under a writer; the I/O thread only
    ever tries it without waiting. `_state` guards the bookkeeping below and is
    never held across I/O; order is _wlock, then _state. The socket is closed
    once reading has stopped and no call is in flight; an unusable stream
    (garbage, write error, abort) is shut down at once, which also fails a
    blocked write, and closed when its last call is done.
    """

    __slots__ = ("_server", "_sock", "fileno", "_wlock", "_state", "_inflight", "_jobs",
                 "reading", "_closed", "_last_id", "_decoder", "_partial_since", "calls", "held",
                 "partial", "_queued", "_queued_since")

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self._server = server
        self._sock = sock
        self.fileno = sock.fileno()
        self._wlock = threading.Lock()
        self._state = threading.Lock()
        self._inflight: set[int] = set()  # stream ids whose handler runs
        self._jobs = 0  # calls in flight (handler threads working for this connection)
        self.reading = True
        self._closed = False
        self._last_id = 0
        self._decoder = codec.Decoder()
        self._partial_since: float | None = None  # when the frame being read was begun
        self._queued: collections.deque[bytes] = collections.deque()  # answers not yet sent
        self._queued_since: float | None = None
        # What the server's bounds count for this connection (under Server._lock):
        self.calls = 0
        self.held = 0  # bytes of requests in flight and of queued answers
        self.partial = 0  # bytes of the frame being read

    # -- the I/O thread ------------------------------------------------------

    def ready(self, mask: int) -> None:
        if self._queued:
            if mask & (select.EPOLLHUP | select.EPOLLERR):
                self.abort()  # the peer is gone; so are its answers
            else:
                self._flush()
            return
        try:
            data = self._sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return  # a stale readiness report
        except OSError:
            data = None  # reset by peer, or shut down by abort()
        if not data:
            self._stop_reading(clean=data is not None)
            return
        decoder = self._decoder
        server = self._server
        server._charge(self, 0, 0, -self.partial)  # the partial frame becomes frames
        for event in decoder.feed(data):
            if not self._dispatch(event):
                self._stop_reading(clean=False)
                return
        if decoder.between_frames:
            self._partial_since = None
        else:
            if self._partial_since is None:
                self._partial_since = time.monotonic()
            if not server._charge(self, 0, 0, decoder.buffered):
                server._warn_closed.warn(f"a partial frame of {decoder.buffered} bytes is past the bounds")
                self._stop_reading(clean=False)
                return
        if self._queued:
            self._watch(select.EPOLLOUT)  # read no more until the answers are out

    def deadline(self) -> float | None:
        """When waiting for the peer ends this connection: for the rest of a frame begun
        (frame_timeout), or for it to read its answers (write_timeout); None if not waiting."""
        limits = self._server.limits
        if self._queued:
            return self._queued_since + limits.write_timeout  # type: ignore[operator]
        if self._partial_since is not None:
            return self._partial_since + limits.frame_timeout
        return None

    def expired(self, now: float) -> bool:
        deadline = self.deadline()
        if deadline is None or now <= deadline:
            return False
        limits = self._server.limits
        self._server._warn_closed.warn(
            f"answers not read within {limits.write_timeout:g}s" if self._queued
            else f"no complete frame within {limits.frame_timeout:g}s")
        return True

    def stop(self) -> None:
        """The server is closing: read no more; close once the calls in flight are answered."""
        self._stop_reading(clean=True)

    def abort(self) -> None:
        """Cut the connection now: a blocked write fails, and the fd is closed."""
        self._stop_reading(clean=False)
        self._close()

    def _watch(self, events: int) -> None:
        try:
            self._server._poller.modify(self.fileno, events)  # type: ignore[union-attr]
        except OSError:
            self.abort()

    def _stop_reading(self, *, clean: bool) -> None:
        """No more reading. The fd must leave epoll before anyone may close it (so that a
        reused fd number is never unregistered by mistake): hence first unregister, then
        publish `reading = False`, which lets the last handler close."""
        if not self.reading:
            return
        server = self._server
        server._reading.pop(self.fileno, None)
        try:
            server._poller.unregister(self.fileno)  # type: ignore[union-attr]
        except (OSError, ValueError):  # poller closed: the fd leaves it when closed
            pass
        queued = sum(map(len, self._queued))
        self._queued.clear()
        server._charge(self, 0, -queued, -self.partial)
        self._partial_since = None
        if not clean:
            with self._state:
                if not self._closed:
                    try:
                        self._sock.shutdown(socket.SHUT_RDWR)  # fails a blocked write too
                    except OSError:
                        pass
        with self._state:
            self.reading = False
            idle = not self._jobs
        if idle:
            self._close()

    def _reply_error(self, stream_id: int, error: TTRPCError) -> bool:
        """Answer from the I/O thread; False if the connection must close."""
        frame = codec.encode_response(stream_id, error=error)
        if not self._queued and self._try_send(frame):
            return True
        if not self._server._charge(self, 0, len(frame)):
            self._server._warn_closed.warn("too many answers not read")
            return False
        if not self._queued:
            self._queued_since = time.monotonic()
        self._queued.append(frame)
        return True

    def _try_send(self, frame: bytes) -> bool:
        """Send one small frame whole without waiting; False if it has to wait."""
        if not self._wlock.acquire(blocking=False):
            return False  # a handler thread is writing
        try:
            if self._closed:
                return True
            sent = self._sock.send(frame, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # the peer is gone: nobody to answer; reading sees it next
        finally:
            self._wlock.release()
        if sent != len(frame):  # cannot happen for a frame this small; the stream is broken
            self._shut()
        return True

    def _flush(self) -> None:
        while self._queued:
            frame = self._queued[0]
            if not self._try_send(frame):
                return  # EPOLLOUT again later
            self._queued.popleft()
            self._server._charge(self, 0, -len(frame))
        self._queued_since = None
        self._watch(select.EPOLLIN)

    def _shut(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- handler threads -----------------------------------------------------

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
                self._sock.sendall(data)  # SO_SNDTIMEO bounds the wait for a peer that does not read
            except OSError:
                # Peer gone, too slow, or a partial frame went out: the stream is dead either way.
                self._shut()

    def _job_done(self, size: int, sid: int) -> None:
        self._server._charge(self, -1, -size)
        with self._state:
            self._jobs -= 1
            self._inflight.discard(sid)
            last = not self.reading and not self._jobs
        if last:
            self._close()

    # -- requests (I/O thread) -------------------------------------------------

    def _dispatch(self, event: codec.Event) -> bool:
        """Handle one event from the reader; False if the connection must close."""
        if isinstance(event, codec.FramingError):
            self._server._warn_closed.warn(event.reason)
            return False
        if isinstance(event, codec.FrameTooLarge):
            return self._reply_error(event.stream_id, codec.too_large_error(event.length))
        sid = event.stream_id
        if sid % 2 != 1:
            return self._reply_error(
                sid, TTRPCError(Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams")
            )
        if event.type == codec.REQUEST:
            return self._request(event)
        if event.type == codec.DATA:
            with self._state:
                active = sid in self._inflight
            if active:
                error = TTRPCError(
                    Code.UNIMPLEMENTED, "ttrpc: data frames are not supported on unary streams"
                )
            else:
                error = TTRPCError(Code.INVALID_ARGUMENT, "StreamID is no longer active")
            return self._reply_error(sid, error)
        # A Response from a client means nothing; Go ignores unknown kinds as well.
        return True

    def _request(self, frame: codec.Frame) -> bool:
        sid = frame.stream_id
        if sid <= self._last_id:
            return self._reply_error(
                sid, TTRPCError(Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment")
            )
        self._last_id = sid
        size = len(frame.data)
        try:
            req = codec.decode_request(frame.data)
            req_type, handler = self._server._lookup(req.service, req.method)
            if frame.flags:
                raise TTRPCError(
                    Code.UNIMPLEMENTED,
                    f"ttrpc: streaming is not supported by {_cut(req.service)}/{_cut(req.method)}",
                )
            if not self._server._charge(self, 1, size):
                raise TTRPCError(Code.RESOURCE_EXHAUSTED, "ttrpc: too many requests in flight")
        except TTRPCError as exc:
            return self._reply_error(sid, exc)
        with self._state:
            self._inflight.add(sid)
            self._jobs += 1
        deadline = time.monotonic() + req.timeout_nano / 1e9 if req.timeout_nano > 0 else None
        metadata: dict[str, list[str]] = {}
        for kv in req.metadata:
            metadata.setdefault(kv.key.lower(), []).append(kv.value)
        ctx = Context(req.service, req.method, metadata, deadline, sid)
        try:
            self._server._workers.run(self._call, sid, size, req.payload, req_type, handler, ctx)
        except RuntimeError as exc:  # can't start new thread
            self._job_done(size, sid)
            return self._reply_error(sid, TTRPCError(Code.RESOURCE_EXHAUSTED, str(exc)))
        return True

    def _call(
        self, sid: int, size: int, payload: bytes, req_type: type[Message], handler: Handler, ctx: Context
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
            try:
                self._write(frame)
            finally:
                self._job_done(size, sid)
            if ctx.after_reply:
                for fn in ctx.after_reply:
                    fn()


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
