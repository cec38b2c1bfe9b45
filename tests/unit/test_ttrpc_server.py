"""Server and client over real Unix sockets in a temporary directory."""

import json
import os
import queue
import shutil
import socket
import struct
import tempfile
import threading
import time

import pytest
from google.protobuf import empty_pb2, wrappers_pb2

from shim.ttrpc import (
    Client,
    Code,
    ConnectionClosedError,
    Context,
    Server,
    TTRPCError,
    codec,
)
from shim.ttrpc.codec import REQUEST, RESPONSE, Decoder, Frame, encode_frame
from shim.ttrpc.server import Limits, _Workers
from shim.ttrpc.ttrpc_pb2 import Request, Response

SERVICE = "test.v1.Echo"
StringValue = wrappers_pb2.StringValue
Empty = empty_pb2.Empty


class Handlers:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.blocked = threading.Event()
        self.finished = threading.Event()

    def echo(self, req: StringValue, ctx: Context) -> StringValue:
        return StringValue(value=req.value)

    def empty(self, req: Empty, ctx: Context) -> Empty:
        return Empty()

    def block(self, req: StringValue, ctx: Context) -> StringValue:
        self.blocked.set()
        self.release.wait(10)
        self.finished.set()
        return StringValue(value="released " + req.value)

    def sleep(self, req: StringValue, ctx: Context) -> StringValue:
        time.sleep(float(req.value))
        return StringValue(value="slept")

    def big(self, req: Empty, ctx: Context) -> StringValue:
        return StringValue(value="x" * (codec.MAX_DATA_SIZE + 1))

    def fail(self, req: Empty, ctx: Context) -> Empty:
        raise ValueError("boom")

    def not_found(self, req: Empty, ctx: Context) -> Empty:
        raise TTRPCError(Code.NOT_FOUND, "container abc: not found")

    def context(self, req: Empty, ctx: Context) -> StringValue:
        remaining = ctx.time_remaining()
        return StringValue(
            value=json.dumps(
                {
                    "service": ctx.service,
                    "method": ctx.method,
                    "metadata": ctx.metadata,
                    "remaining": remaining,
                    "stream": ctx.stream_id,
                }
            )
        )

    def methods(self):
        return {
            "Echo": (StringValue, self.echo),
            "Empty": (Empty, self.empty),
            "Block": (StringValue, self.block),
            "Sleep": (StringValue, self.sleep),
            "Big": (Empty, self.big),
            "Fail": (Empty, self.fail),
            "NotFound": (Empty, self.not_found),
            "Context": (Empty, self.context),
        }


class Running:
    """A Server serving in a background thread."""

    def __init__(self, path: str, **kwargs) -> None:
        self.path = path
        self.handlers = Handlers()
        self.server = Server(**kwargs)
        self.server.register(SERVICE, self.handlers.methods())
        self.server.register("test.v2.Echo", self.handlers.methods())
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4096)  # as deep as the shim's (somaxconn): bursts of connections fit
        self.thread = threading.Thread(target=self.server.serve, args=(self.listener,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.handlers.release.set()
        self.server.shutdown()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.fixture
def sockdir():
    # Short path: AF_UNIX paths are limited to 108 bytes.
    d = tempfile.mkdtemp(prefix="ttrpc-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def running(sockdir):
    r = Running(os.path.join(sockdir, "s.sock"))
    yield r
    r.stop()


@pytest.fixture
def client(running):
    c = Client(running.path)
    yield c
    c.close()


class Raw:
    """A hand-driven connection for protocol violations."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.decoder = Decoder()
        self.events: list = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, sid: int, service: str, method: str, payload: bytes = b"", flags: int = 0) -> None:
        req = Request(service=service, method=method, payload=payload)
        self.send(encode_frame(sid, REQUEST, flags, req.SerializeToString()))

    def next_event(self):
        while not self.events:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.events += self.decoder.feed(data)
        return self.events.pop(0)

    def response(self) -> tuple[int, Response]:
        ev = self.next_event()
        assert isinstance(ev, Frame) and ev.type == RESPONSE and ev.flags == 0
        return ev.stream_id, codec.decode_response(ev.data)

    def expect_error(self, sid: int, code: Code, message: str | None = None) -> str:
        got_sid, resp = self.response()
        assert got_sid == sid
        assert resp.status.code == code, resp
        assert resp.payload == b""
        if message is not None:
            assert resp.status.message == message
        return resp.status.message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(running):
    r = Raw(running.path)
    yield r
    r.close()


# -- happy path ----------------------------------------------------------------


def test_unary_call(client):
    assert client.call(SERVICE, "Echo", StringValue(value="hi"), StringValue).value == "hi"


def test_same_handlers_under_two_service_names(client):
    assert client.call("test.v2.Echo", "Echo", StringValue(value="v2"), StringValue).value == "v2"


def test_client_accepts_unix_scheme(running):
    with Client("unix://" + running.path) as c:
        assert c.call(SERVICE, "Echo", StringValue(value="x"), StringValue).value == "x"


def test_empty_response_is_a_zero_length_frame(raw):
    raw.request(1, SERVICE, "Empty")
    ev = raw.next_event()
    assert ev == Frame(1, RESPONSE, 0, b"")


def test_success_response_has_no_status(raw):
    raw.request(1, SERVICE, "Echo", StringValue(value="x").SerializeToString())
    sid, resp = raw.response()
    assert sid == 1 and not resp.HasField("status")
    assert StringValue.FromString(resp.payload).value == "x"


def test_context_carries_metadata_and_deadline(client):
    out = client.call(
        SERVICE,
        "Context",
        Empty(),
        StringValue,
        timeout=30,
        metadata={"Containerd-Namespace-TTRPC": "k8s.io"},
    )
    got = json.loads(out.value)
    assert got["service"] == SERVICE and got["method"] == "Context"
    assert got["metadata"] == {"containerd-namespace-ttrpc": ["k8s.io"]}
    assert 25 < got["remaining"] <= 30


def test_context_without_timeout_has_no_deadline(client):
    assert json.loads(client.call(SERVICE, "Context", Empty(), StringValue).value)["remaining"] is None


def test_repeated_metadata_keys_are_kept_in_order(raw):
    req = Request(service=SERVICE, method="Context")
    req.metadata.add(key="K", value="1")
    req.metadata.add(key="k", value="2")
    raw.send(encode_frame(1, REQUEST, 0, req.SerializeToString()))
    _, resp = raw.response()
    assert json.loads(StringValue.FromString(resp.payload).value)["metadata"] == {"k": ["1", "2"]}


def test_concurrent_calls_answered_out_of_order(running, client):
    result = {}

    def blocked_call():
        result["block"] = client.call(SERVICE, "Block", StringValue(value="w"), StringValue, timeout=10).value

    t = threading.Thread(target=blocked_call)
    t.start()
    assert running.handlers.blocked.wait(5)
    # Wait is pending on this connection; other calls must still be answered.
    for i in range(5):
        assert client.call(SERVICE, "Echo", StringValue(value=str(i)), StringValue, timeout=5).value == str(i)
    assert "block" not in result
    running.handlers.release.set()
    t.join(5)
    assert result["block"] == "released w"


def test_out_of_order_on_the_wire(running, raw):
    raw.request(1, SERVICE, "Block", StringValue(value="a").SerializeToString())
    assert running.handlers.blocked.wait(5)
    raw.request(3, SERVICE, "Echo", StringValue(value="b").SerializeToString())
    assert raw.response()[0] == 3
    running.handlers.release.set()
    assert raw.response()[0] == 1


def test_many_threads_share_one_client(client):
    errors = []

    def worker(n):
        try:
            for i in range(20):
                v = f"{n}-{i}"
                assert client.call(SERVICE, "Echo", StringValue(value=v), StringValue, timeout=10).value == v
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []


def test_client_payload_close_to_the_limit(client):
    big = "x" * (codec.MAX_DATA_SIZE - 100)
    assert len(client.call(SERVICE, "Echo", StringValue(value=big), StringValue, timeout=30).value) == len(
        big
    )


def test_client_refuses_oversize_request(client):
    with pytest.raises(TTRPCError) as info:
        client.call(SERVICE, "Echo", StringValue(value="x" * codec.MAX_DATA_SIZE), StringValue)
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    assert client.call(SERVICE, "Echo", StringValue(value="ok"), StringValue).value == "ok"


# -- error statuses ---------------------------------------------------------------


def test_unknown_service(client):
    with pytest.raises(TTRPCError) as info:
        client.call("nope.v1.Nope", "Echo", Empty(), Empty)
    assert (info.value.code, info.value.message) == (Code.UNIMPLEMENTED, "service nope.v1.Nope")


def test_unknown_method(client):
    with pytest.raises(TTRPCError) as info:
        client.call(SERVICE, "Nope", Empty(), Empty)
    assert (info.value.code, info.value.message) == (Code.UNIMPLEMENTED, "method Nope")


def test_handler_ttrpc_error_is_sent_as_is(client):
    with pytest.raises(TTRPCError) as info:
        client.call(SERVICE, "NotFound", Empty(), Empty)
    assert (info.value.code, info.value.message) == (Code.NOT_FOUND, "container abc: not found")


def test_handler_exception_is_unknown(client, caplog):
    with caplog.at_level("ERROR", logger="shim.ttrpc"), pytest.raises(TTRPCError) as info:
        client.call(SERVICE, "Fail", Empty(), Empty)
    assert (info.value.code, info.value.message) == (Code.UNKNOWN, "boom")
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)
    assert client.call(SERVICE, "Echo", StringValue(value="still"), StringValue).value == "still"


def test_oversize_response_becomes_resource_exhausted(client):
    with pytest.raises(TTRPCError) as info:
        client.call(SERVICE, "Big", Empty(), StringValue, timeout=10)
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    assert client.call(SERVICE, "Echo", StringValue(value="ok"), StringValue).value == "ok"


def test_requests_in_flight_are_capped(sockdir):
    running = Running(os.path.join(sockdir, "s.sock"), limits=Limits(calls_per_connection=2))
    raw = Raw(running.path)
    try:
        _capped(running, raw)
    finally:
        raw.close()
        running.stop()


def _capped(running, raw):
    raw.request(1, SERVICE, "Block", StringValue(value="a").SerializeToString())
    raw.request(3, SERVICE, "Block", StringValue(value="b").SerializeToString())
    raw.request(5, SERVICE, "Block", StringValue(value="c").SerializeToString())
    raw.expect_error(5, Code.RESOURCE_EXHAUSTED)
    running.handlers.release.set()
    assert sorted(raw.response()[0] for _ in range(2)) == [1, 3]
    raw.request(7, SERVICE, "Empty")
    assert raw.response()[0] == 7


def test_garbage_request_protobuf(raw):
    raw.send(encode_frame(1, REQUEST, 0, b"\xff\xff\xff\xff"))
    assert raw.expect_error(1, Code.INVALID_ARGUMENT).startswith("unmarshal request error: ")
    raw.request(3, SERVICE, "Empty")
    assert raw.response()[0] == 3


def test_garbage_payload(raw):
    raw.request(1, SERVICE, "Echo", b"\xff\xff\xff\xff")
    assert raw.expect_error(1, Code.INTERNAL).startswith("ttrpc: error unmarshalling payload: ")


def test_even_stream_id(raw):
    raw.request(2, SERVICE, "Empty")
    raw.expect_error(2, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams")
    raw.request(3, SERVICE, "Empty")
    assert raw.response() == (3, Response())


def test_stream_id_must_increase(raw):
    raw.request(5, SERVICE, "Empty")
    assert raw.response()[0] == 5
    for sid in (5, 3):
        raw.request(sid, SERVICE, "Empty")
        raw.expect_error(sid, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment")
    raw.request(7, SERVICE, "Empty")
    assert raw.response()[0] == 7


def test_oversize_frame_then_next_call(raw):
    length = codec.MAX_DATA_SIZE + 1
    raw.send(struct.pack(">IIBB", length, 1, REQUEST, 0))
    raw.expect_error(
        1, Code.RESOURCE_EXHAUSTED, f"message length {length} exceed maximum message size of 4194304"
    )
    chunk = b"\0" * 65536
    left = length
    while left:
        n = min(left, len(chunk))
        raw.send(chunk[:n])
        left -= n
    raw.request(3, SERVICE, "Echo", StringValue(value="after").SerializeToString())
    sid, resp = raw.response()
    assert sid == 3 and StringValue.FromString(resp.payload).value == "after"


def test_streaming_request_flags_are_refused(raw):
    raw.request(1, SERVICE, "Echo", flags=codec.FLAG_REMOTE_OPEN)
    raw.expect_error(1, Code.UNIMPLEMENTED)
    # The client's Data frames for that stream find nothing open.
    raw.send(encode_frame(1, codec.DATA, codec.FLAG_REMOTE_CLOSED | codec.FLAG_NO_DATA))
    raw.expect_error(1, Code.INVALID_ARGUMENT, "StreamID is no longer active")
    raw.request(3, SERVICE, "Empty")
    assert raw.response()[0] == 3


def test_data_frame_on_a_running_unary_call(running, raw):
    raw.request(1, SERVICE, "Block", StringValue(value="a").SerializeToString())
    assert running.handlers.blocked.wait(5)
    raw.send(encode_frame(1, codec.DATA, 0, b"junk"))
    raw.expect_error(1, Code.UNIMPLEMENTED)
    running.handlers.release.set()
    assert raw.response()[0] == 1  # the call itself still completes


def test_response_frames_from_a_client_are_ignored(raw):
    raw.send(encode_frame(1, RESPONSE, 0, b""))
    raw.request(3, SERVICE, "Empty")
    assert raw.response()[0] == 3


def test_unframeable_garbage_closes_only_that_connection(running, raw):
    raw.send(b"\x00\x00\x00\x00\x00\x00\x00\x01\x99\x00" + os.urandom(200))
    with pytest.raises((EOFError, ConnectionResetError)):
        while True:
            raw.next_event()
    with Client(running.path) as c:
        assert c.call(SERVICE, "Echo", StringValue(value="ok"), StringValue, timeout=5).value == "ok"


def test_random_garbage_never_hurts_the_server(running):
    rnd = __import__("random").Random(1234)
    for _ in range(30):
        r = Raw(running.path)
        r.sock.settimeout(0.5)
        try:
            r.send(rnd.randbytes(rnd.randrange(1, 3000)))
            while True:
                ev = r.next_event()
                assert isinstance(ev, Frame) and ev.type == RESPONSE
                assert codec.decode_response(ev.data).status.code != 0
        except (EOFError, TimeoutError, OSError):
            pass  # closed by the server, or still waiting for a frame's data: both fine
        finally:
            r.close()
    with Client(running.path) as c:
        assert c.call(SERVICE, "Echo", StringValue(value="alive"), StringValue, timeout=5).value == "alive"


# -- connection life ----------------------------------------------------------------


def test_peer_disconnects_while_request_in_flight(running, raw):
    raw.request(1, SERVICE, "Block", StringValue(value="a").SerializeToString())
    assert running.handlers.blocked.wait(5)
    raw.close()
    time.sleep(0.1)
    running.handlers.release.set()
    assert running.handlers.finished.wait(5)
    with Client(running.path) as c:
        assert c.call(SERVICE, "Echo", StringValue(value="ok"), StringValue, timeout=5).value == "ok"
    deadline = time.monotonic() + 5
    while len(running.server._conns) > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not running.server._conns  # the abandoned connection was cleaned up


def test_client_timeout(client):
    start = time.monotonic()
    with pytest.raises(TTRPCError) as info:
        client.call(SERVICE, "Sleep", StringValue(value="1"), StringValue, timeout=0.2)
    assert info.value.code == Code.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 0.9
    # The late answer is dropped and the connection keeps working.
    time.sleep(1)
    assert client.call(SERVICE, "Echo", StringValue(value="next"), StringValue, timeout=5).value == "next"


def test_client_call_fails_when_server_shuts_down(running, client):
    errors = []

    def waiting():
        try:
            client.call(SERVICE, "Block", StringValue(value="w"), StringValue)
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=waiting)
    t.start()
    assert running.handlers.blocked.wait(5)
    running.server.shutdown()
    # Block never returns in time: after the grace period the server hangs up.
    t.join(5)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ConnectionClosedError)
    assert isinstance(errors[0], ConnectionError) and errors[0].code == Code.UNAVAILABLE
    with pytest.raises(ConnectionClosedError):
        client.call(SERVICE, "Echo", StringValue(value="x"), StringValue)
    running.thread.join(5)
    assert not running.thread.is_alive()


def test_shutdown_from_a_handler_still_answers(sockdir):
    server = Server()
    server.register(SERVICE, {"Shutdown": (Empty, lambda req, ctx: (server.shutdown(), Empty())[1])})
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = os.path.join(sockdir, "s.sock")
    listener.bind(path)
    listener.listen()
    t = threading.Thread(target=server.serve, args=(listener,), daemon=True)
    t.start()
    with Client(path) as c:
        assert c.call(SERVICE, "Shutdown", Empty(), Empty, timeout=5) == Empty()
    t.join(5)
    assert not t.is_alive()
    assert listener.fileno() == -1
    with pytest.raises(OSError):
        Client(path)


def test_shutdown_before_serve(sockdir):
    server = Server()
    server.shutdown()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(sockdir, "s.sock"))
    listener.listen()
    server.serve(listener)  # returns at once
    assert listener.fileno() == -1


def test_client_close_fails_pending_calls(running):
    c = Client(running.path)
    errors = []

    def waiting():
        try:
            c.call(SERVICE, "Block", StringValue(value="w"), StringValue)
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=waiting)
    t.start()
    assert running.handlers.blocked.wait(5)
    c.close()
    t.join(5)
    assert [type(e) for e in errors] == [ConnectionClosedError]
    assert c.closed


def test_same_user_handshake_rejects_other_users(sockdir):
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")
    r = Running(os.path.join(sockdir, "s.sock"))
    os.chmod(sockdir, 0o777)
    os.chmod(r.path, 0o777)
    frame = encode_frame(1, REQUEST, 0, Request(service=SERVICE, method="Empty").SerializeToString())
    try:
        pid = os.fork()
        if pid == 0:  # child: become nobody and try a call; only plain syscalls after fork
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(5)
                s.connect(r.path)
                try:
                    s.sendall(frame)
                    code = 0 if s.recv(100) == b"" else 3
                except (BrokenPipeError, ConnectionResetError):
                    code = 0
            except BaseException:
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        with Client(r.path) as c:  # same user is accepted
            assert c.call(SERVICE, "Echo", StringValue(value="me"), StringValue, timeout=5).value == "me"
    finally:
        r.stop()


# -- the handler threads ----------------------------------------------------------------------

def test_a_finished_handler_thread_takes_the_next_call():
    workers = _Workers(idle=5.0)
    seen: queue.Queue[int] = queue.Queue()
    workers.run(lambda: seen.put(threading.get_ident()))
    first = seen.get(timeout=5)
    deadline = time.monotonic() + 5
    while workers._waiting != 1 and time.monotonic() < deadline:  # back to waiting
        time.sleep(0.001)
    workers.run(lambda: seen.put(threading.get_ident()))
    assert seen.get(timeout=5) == first


def test_a_blocked_handler_does_not_hold_up_the_next():
    workers = _Workers(idle=5.0)
    release = threading.Event()
    done: queue.Queue[str] = queue.Queue()
    workers.run(lambda: (release.wait(10), done.put("blocked")))
    workers.run(lambda: done.put("quick"))
    assert done.get(timeout=5) == "quick"
    release.set()
    assert done.get(timeout=5) == "blocked"


def test_idle_handler_threads_end():
    workers = _Workers(idle=0.05)
    before = set(threading.enumerate())  # other tests' idle workers may end meanwhile: count ours
    for _ in range(3):
        workers.run(time.sleep, 0.2)  # three at once: three threads
    ours = set(threading.enumerate()) - before
    assert len(ours) == 3
    deadline = time.monotonic() + 5
    while any(t.is_alive() for t in ours) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.is_alive() for t in ours)
    assert workers._waiting == 0


def test_context_names_the_stream(raw):
    for sid in (1, 7):
        raw.request(sid, SERVICE, "Context")
        got_sid, resp = raw.response()
        assert got_sid == sid
        assert json.loads(StringValue.FromString(resp.payload).value)["stream"] == sid


def test_after_reply_runs_once_the_answer_is_out(sockdir):
    seen: list[str] = []
    answered = threading.Event()
    client_got = threading.Event()

    def handler(req: Empty, ctx: Context) -> Empty:
        def after() -> None:
            # The client has the response before this runs.
            seen.append("after:" + ("answered" if client_got.wait(5) else "not answered"))
            answered.set()
        ctx.after_reply = [after]
        return Empty()

    server = Server()
    server.register(SERVICE, {"After": (Empty, handler)})
    path = os.path.join(sockdir, "a.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    t = threading.Thread(target=server.serve, args=(listener,), daemon=True)
    t.start()
    c = Client(path)
    try:
        c.call(SERVICE, "After", Empty(), Empty)
        client_got.set()
        assert answered.wait(5) and seen == ["after:answered"]
    finally:
        c.close()
        server.shutdown()
        t.join(5)


def test_register_replace_swaps_the_table_while_serving(running, client):
    with pytest.raises(ValueError):
        running.server.register(SERVICE, {})
    running.server.register(SERVICE, {"Echo": (StringValue, lambda req, ctx: StringValue(value="new"))},
                            replace=True)
    assert client.call(SERVICE, "Echo", StringValue(value="x"), StringValue).value == "new"
