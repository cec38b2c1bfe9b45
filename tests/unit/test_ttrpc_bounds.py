"""The ttrpc server's accept path and bounds (shim.ttrpc.server.Limits), over real Unix sockets.

Hostile or broken clients on one side, a well-behaved client (standing for containerd) on the
other: past a bound the new thing is refused cleanly (the connection closed, or the call
answered ResourceExhausted) and the well-behaved client's calls keep being served.
"""

import os
import socket
import struct
import threading
import time

import pytest
from google.protobuf import wrappers_pb2

from e2e.hostile_client import connect_bursts, hostile_prelude
from shim.binary.address import listen
from shim.ttrpc import Client, Code, Server, codec
from shim.ttrpc.codec import REQUEST
from shim.ttrpc.server import Limits
import test_ttrpc_server
from test_ttrpc_server import SERVICE, Handlers, Raw, Running

StringValue = wrappers_pb2.StringValue
sockdir = test_ttrpc_server.sockdir  # the fixtures of the server's tests, shared
running = test_ttrpc_server.running


def served(path, text="ok", timeout=5.0):
    """One call on a fresh connection, as containerd makes them."""
    with Client(path, connect_timeout=timeout) as c:
        return c.call(SERVICE, "Echo", StringValue(value=text), StringValue, timeout=timeout).value == text


def closed_by_server(raw, timeout=5.0):
    """Whether the server closes `raw` (EOF or reset) within `timeout`, ignoring responses."""
    raw.sock.settimeout(timeout)
    try:
        while raw.sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


@pytest.fixture
def bounded(sockdir, request):
    r = Running(os.path.join(sockdir, "s.sock"), limits=request.param)
    yield r
    r.stop()


def test_accept_bursts_after_garbage_never_fill_the_backlog(sockdir):
    """The sequence of issue 13, against the listener `start` creates (shim.binary.address.listen):
    failed with EAGAIN for 71 of 200 connections (4 of 10 bursts) with a backlog of 128."""
    path = os.path.join(sockdir, "s.sock")
    server = Server()
    server.register(SERVICE, Handlers().methods())
    raw_listener = listen(path)
    listener = socket.socket(fileno=raw_listener.detach())  # as the daemon wraps it
    thread = threading.Thread(target=server.serve, args=(listener,), daemon=True)
    thread.start()
    try:
        half = hostile_prelude(path)
        assert connect_bursts(path) == (0, 0)
        assert served(path)
        half.close()
    finally:
        server.shutdown()
        thread.join(5)
    assert not thread.is_alive()


def test_idle_half_open_and_garbage_connections_delay_nobody(running):
    """60 idle connections, 20 stuck in a frame's header, 20 in a frame's data, 20 sending garbage:
    a new connection is still accepted and answered at once, and none of them costs a thread."""
    threads = threading.active_count()
    held = []
    for i in range(120):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(running.path)
        if 60 <= i < 80:
            s.sendall(b"\x00\x00\x01")
        elif 80 <= i < 100:
            s.sendall(struct.pack(">IIBB", 1000, 1, REQUEST, 0) + b"x" * 10)
        elif i >= 100:
            s.sendall(os.urandom(64))
        held.append(s)
    try:
        start = time.monotonic()
        assert served(running.path)
        assert time.monotonic() - start < 1.0
        assert threading.active_count() <= threads + 1  # at most the one handler thread of the Echo
    finally:
        for s in held:
            s.close()


@pytest.mark.parametrize("bounded", [Limits(connections=4)], indirect=True)
def test_connections_past_the_bound_are_closed(bounded):
    first = Client(bounded.path)  # containerd's connection
    held = [Raw(bounded.path) for _ in range(3)]
    try:
        assert first.call(SERVICE, "Echo", StringValue(value="a"), StringValue).value == "a"
        extras = [Raw(bounded.path) for _ in range(20)]  # the fifth and more: all refused
        assert all(closed_by_server(extra) for extra in extras)
        for extra in extras:
            extra.close()
        assert first.call(SERVICE, "Echo", StringValue(value="b"), StringValue).value == "b"
        held.pop().close()  # a slot is free again
        deadline = time.monotonic() + 5
        while len(bounded.server._conns) > 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert served(bounded.path)
    finally:
        first.close()
        for r in held:
            r.close()


@pytest.mark.parametrize("bounded", [Limits(calls=4, reserved_calls=1)], indirect=True)
def test_calls_past_the_total_are_refused_but_each_connection_keeps_its_reserve(bounded):
    hog = Raw(bounded.path)
    try:
        for sid in (1, 3, 5, 7, 9):  # 1 reserved + 4 shared
            hog.request(sid, SERVICE, "Block", StringValue(value="x").SerializeToString())
        hog.request(11, SERVICE, "Block", StringValue(value="x").SerializeToString())
        hog.expect_error(11, Code.RESOURCE_EXHAUSTED, "ttrpc: too many requests in flight")
        with Client(bounded.path) as other:  # containerd: its reserve is untouched
            assert other.call(SERVICE, "Echo", StringValue(value="mine"), StringValue, timeout=5).value == "mine"
        bounded.handlers.release.set()
        assert sorted(hog.response()[0] for _ in range(5)) == [1, 3, 5, 7, 9]
        hog.request(13, SERVICE, "Echo", StringValue(value="again").SerializeToString())
        assert hog.response()[0] == 13
    finally:
        hog.close()


@pytest.mark.parametrize("bounded", [Limits(bytes_per_connection=1 << 20)], indirect=True)
def test_request_bytes_in_flight_are_bounded_per_connection(bounded):
    hog = Raw(bounded.path)
    big = StringValue(value="x" * (300 << 10)).SerializeToString()
    try:
        for sid in (1, 3, 5):
            hog.request(sid, SERVICE, "Block", big)
        hog.request(7, SERVICE, "Block", big)  # 1.2 MiB held
        hog.expect_error(7, Code.RESOURCE_EXHAUSTED)
        hog.request(9, SERVICE, "Echo", StringValue(value="small").SerializeToString())
        assert hog.response()[0] == 9  # small calls still fit
        bounded.handlers.release.set()
        assert sorted(hog.response()[0] for _ in range(3)) == [1, 3, 5]
    finally:
        hog.close()


@pytest.mark.parametrize("bounded", [Limits(bytes=100 << 10, reserved_bytes=16 << 10)], indirect=True)
def test_a_partial_frame_past_the_total_closes_its_connection(bounded):
    hog = Raw(bounded.path)
    try:
        hog.send(struct.pack(">IIBB", 1 << 20, 1, REQUEST, 0))
        with pytest.raises(OSError):  # reset or broken pipe once the server closes
            for _ in range(32):
                hog.send(b"y" * (16 << 10))
                time.sleep(0.005)
        assert closed_by_server(hog)
        assert served(bounded.path)
    finally:
        hog.close()


@pytest.mark.parametrize("bounded", [Limits(bytes=1 << 20, reserved_bytes=64 << 10)], indirect=True)
def test_partial_frames_past_the_total_close_the_newest_hog_only(bounded):
    first, second = Raw(bounded.path), Raw(bounded.path)
    try:
        first.send(struct.pack(">IIBB", 2 << 20, 1, REQUEST, 0) + b"a" * (900 << 10))
        deadline = time.monotonic() + 5
        while bounded.server._shared_bytes < (800 << 10) and time.monotonic() < deadline:
            time.sleep(0.01)
        second.send(struct.pack(">IIBB", 2 << 20, 1, REQUEST, 0))
        with pytest.raises(OSError):
            for _ in range(40):
                second.send(b"b" * (16 << 10))
                time.sleep(0.005)
        assert closed_by_server(second)
        assert not closed_by_server(first, timeout=0.2)  # still waiting for the rest of its frame
        assert served(bounded.path)  # within its reserve
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("bounded", [Limits(frame_timeout=0.3)], indirect=True)
def test_a_frame_begun_and_not_finished_times_out(bounded):
    idle, half = Raw(bounded.path), Raw(bounded.path)
    try:
        half.send(b"\x00\x00\x00\x10\x00")
        start = time.monotonic()
        assert closed_by_server(half)
        assert 0.25 < time.monotonic() - start < 3.0
        assert not closed_by_server(idle, timeout=0.2)  # no frame begun: an idle connection stays
        idle.request(1, SERVICE, "Empty")
        assert idle.response()[0] == 1
    finally:
        idle.close()
        half.close()


@pytest.mark.parametrize("bounded", [Limits(write_timeout=0.5)], indirect=True)
def test_a_peer_that_never_reads_is_cut_and_stalls_nobody(bounded):
    """Requests whose answers fill the socket, never read: the writes give up after the write
    timeout and close that connection; other connections are served throughout."""
    hog = Raw(bounded.path)
    big = StringValue(value="z" * (256 << 10)).SerializeToString()
    try:
        for sid in range(1, 200, 2):
            try:
                hog.request(sid, SERVICE, "Echo", big)
            except OSError:
                break  # the server cut us already
        assert served(bounded.path, timeout=2.0)
        deadline = time.monotonic() + 10
        while bounded.server._conns and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not bounded.server._conns  # the hog's connection is gone, its calls finished
    finally:
        hog.close()


def test_a_flood_of_bad_requests_without_reading_stalls_nobody(running):
    """Error answers are written by the I/O thread only when the socket takes them at once; the
    rest go through handler threads, so a peer that floods and never reads blocks no one."""
    threads = threading.active_count()
    flood = b"".join(codec.encode_request(sid, SERVICE, "Nope", b"x" * 512) for sid in range(1, 20001, 2))
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hog.connect(running.path)
    sender = threading.Thread(target=lambda: _send_quietly(hog, flood), daemon=True)
    sender.start()
    try:
        time.sleep(0.3)
        start = time.monotonic()
        assert served(running.path, timeout=2.0)
        assert time.monotonic() - start < 1.0
        assert threading.active_count() <= threads + 2  # the sender, the Echo: the answers cost none
    finally:
        hog.shutdown(socket.SHUT_RDWR)  # fails the sender's blocked sendall
        hog.close()
        sender.join(5)


def _send_quietly(sock, data):
    try:
        sock.sendall(data)
    except OSError:
        pass


@pytest.mark.parametrize("bounded", [Limits(calls=16, calls_per_connection=16, reserved_calls=0)], indirect=True)
def test_handler_threads_are_bounded_by_the_calls_bound(bounded):
    hog = Raw(bounded.path)
    before = threading.active_count()
    try:
        for sid in range(1, 80, 2):
            hog.request(sid, SERVICE, "Block", StringValue(value="x").SerializeToString())
        refused = 0
        for _ in range(40 - 16):
            sid, resp = hog.response()
            assert resp.status.code == Code.RESOURCE_EXHAUSTED
            refused += 1
        assert refused == 24
        assert threading.active_count() - before <= 16
    finally:
        bounded.handlers.release.set()
        hog.close()


def test_limits_default_to_what_containerd_needs():
    limits = Server().limits
    assert limits.connections >= 100  # a pod of many containers, plus reconnects
    assert limits.calls_per_connection >= 400  # 200 concurrent execs: a Wait and a call each
    assert limits.bytes_per_connection >= codec.MAX_DATA_SIZE  # one frame of the protocol's maximum
