"""Pieces of the shim that make it outlive containerd, tested without containerd:
events published while containerd is away, the dead shim's socket in `delete`, `-info`."""

import os
import socket
import tempfile
import threading
import time

import pytest
from google.protobuf.any_pb2 import Any
from google.protobuf.empty_pb2 import Empty

from shim.binary import cleanup
from shim.task import events
from shim.api.envelope_pb2 import ForwardRequest
from shim.api.events_pb2 import TaskExit
from shim.api.introspection_pb2 import RuntimeInfo
from shim.api.runc_options_pb2 import Options as RuncOptions
from shim.binary.info import FEATURES_TYPE_URL, runtime_info
from shim.ttrpc import Server


@pytest.fixture
def tmp_dir():
    # AF_UNIX paths are short: pytest's tmp_path may be too long
    with tempfile.TemporaryDirectory(prefix="pyshim-") as d:
        yield d


class FakeEvents:
    """containerd's ttrpc Events service: records what is forwarded to it."""

    def __init__(self, path):
        self.received = []
        self.got = threading.Event()
        self.server = Server()
        self.server.register(events.EVENTS_SERVICE, {"Forward": (ForwardRequest, self.forward)})
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen()
        self.thread = threading.Thread(target=self.server.serve, args=(self.listener,), daemon=True)
        self.thread.start()

    def forward(self, req, ctx):
        self.received.append(req.envelope)
        self.got.set()
        return Empty()

    def close(self):
        # Wait for serve() to close its sockets: closed later, they would change the open
        # fds that the next tests (test_oom.py) compare before and after.
        self.server.shutdown()
        self.thread.join(10)


def test_event_published_while_containerd_is_away_arrives_when_it_is_back(tmp_dir):
    path = os.path.join(tmp_dir, "containerd.sock.ttrpc")
    publisher = events.Publisher(path, "ns")
    containerd = None
    try:
        publisher.publish("/tasks/exit", TaskExit(container_id="c1", id="c1", pid=42, exit_status=7))
        time.sleep(4)  # containerd restarting: nothing listens yet (runc-v2 would still retry)
        containerd = FakeEvents(path)
        assert containerd.got.wait(10), "the event was dropped instead of retried"
        envelope = containerd.received[0]
        assert (envelope.namespace, envelope.topic) == ("ns", "/tasks/exit")
        assert TaskExit.FromString(envelope.event.value).exit_status == 7
    finally:
        publisher.close()
        if containerd:
            containerd.close()


def test_events_keep_their_order_across_an_outage(tmp_dir):
    path = os.path.join(tmp_dir, "containerd.sock.ttrpc")
    publisher = events.Publisher(path, "ns")
    containerd = None
    try:
        for n in range(5):
            publisher.publish("/tasks/exit", TaskExit(container_id=f"c{n}"))
        time.sleep(0.5)
        containerd = FakeEvents(path)
        deadline = time.monotonic() + 10
        while len(containerd.received) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [TaskExit.FromString(e.event.value).container_id for e in containerd.received] == \
            [f"c{n}" for n in range(5)]
    finally:
        publisher.close()
        if containerd:
            containerd.close()


def write_address(bundle, path):
    with open(os.path.join(bundle, "address"), "w") as f:
        f.write(f"unix://{path}")


def test_delete_removes_the_socket_of_a_dead_shim(tmp_dir):
    path = os.path.join(tmp_dir, "shim.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)  # bound, then the process died: the file stays, nobody listens
    dead.close()
    write_address(tmp_dir, path)
    warnings = []
    cleanup._remove_stale_socket(tmp_dir, warnings)
    assert not os.path.exists(path) and warnings == []


def test_delete_keeps_the_socket_of_a_live_shim(tmp_dir):
    path = os.path.join(tmp_dir, "shim.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen()  # another container of the group is still served here
    try:
        write_address(tmp_dir, path)
        cleanup._remove_stale_socket(tmp_dir, [])
        assert os.path.exists(path)
    finally:
        live.close()


def test_delete_leaves_what_is_not_a_socket(tmp_dir):
    path = os.path.join(tmp_dir, "not-a-socket")
    open(path, "w").close()
    write_address(tmp_dir, path)
    cleanup._remove_stale_socket(tmp_dir, [])
    assert os.path.exists(path)
    os.unlink(os.path.join(tmp_dir, "address"))
    cleanup._remove_stale_socket(tmp_dir, [])  # no address file: nothing to do


def test_info_reports_the_runtime_and_the_features_of_the_binary_the_options_name(tmp_dir):
    fake = os.path.join(tmp_dir, "fake-runc")
    with open(fake, "w") as f:
        f.write('#!/bin/sh\n[ "$1" = features ] && echo \'{"ociVersionMin":"1.0.0","mountOptions":["rro"]}\'\n')
    os.chmod(fake, 0o755)
    options = Any(type_url="containerd.runc.v1.Options", value=RuncOptions(binary_name=fake).SerializeToString())
    info = RuntimeInfo.FromString(runtime_info(options.SerializeToString(), "io.containerd.pyshim.v1", "9.9"))
    assert (info.name, info.version.version) == ("io.containerd.pyshim.v1", "9.9")
    assert info.options == options
    assert info.features.type_url == FEATURES_TYPE_URL
    assert b'"rro"' in info.features.value


def test_info_without_options_or_features(tmp_dir):
    missing = Any(type_url="containerd.runc.v1.Options",
                  value=RuncOptions(binary_name=os.path.join(tmp_dir, "none")).SerializeToString())
    info = RuntimeInfo.FromString(runtime_info(missing.SerializeToString(), "rt", "1"))
    assert info.name == "rt" and not info.HasField("features")
    with pytest.raises(ValueError):
        runtime_info(b"\xff\xff\xff", "rt", "1")


def test_events_published_before_the_publisher_starts_go_out_in_order(tmp_dir):
    path = os.path.join(tmp_dir, "containerd.sock.ttrpc")
    containerd = FakeEvents(path)
    publisher = events.Publisher(path, "ns", start=False)
    try:
        for n in range(3):
            publisher.publish("/tasks/create", TaskExit(container_id=f"c{n}"))
        time.sleep(0.3)
        assert containerd.received == []  # queued until the thread runs
        publisher.start()
        deadline = time.monotonic() + 10
        while len(containerd.received) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [TaskExit.FromString(e.event.value).container_id for e in containerd.received] == \
            ["c0", "c1", "c2"]
    finally:
        publisher.close()
        containerd.close()


def test_a_publisher_never_started_forwards_what_was_queued_when_closed(tmp_dir):
    path = os.path.join(tmp_dir, "containerd.sock.ttrpc")
    containerd = FakeEvents(path)
    publisher = events.Publisher(path, "ns", start=False)
    try:
        publisher.publish("/tasks/delete", TaskExit(container_id="last"))
        publisher.close(timeout=5)
        assert [TaskExit.FromString(e.event.value).container_id for e in containerd.received] == ["last"]
    finally:
        containerd.close()
