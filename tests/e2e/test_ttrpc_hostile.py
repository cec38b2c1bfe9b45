"""A hostile local client on a running shim's socket, with a real container behind it.

The shim's address is in the bundle's `address` file (a same-user client can connect, as root
can). These tests throw at it what a broken or hostile client might, then check that containerd
still reaches the shim, that the container is still served and its exit delivered, and that the
shim holds no more than before. They run against any v2 shim: with
PYSHIM_TEST_RUNTIME=io.containerd.runc.v2 they measure containerd's own (the figures are printed;
where it keeps fds or memory the fuzz made it take, the test is an expected failure that says so).

    PYSHIM_FUZZ_LIVE_ROUNDS=20 .venv/bin/python -m pytest tests/e2e/test_ttrpc_hostile.py -s   # longer
"""
import os
import random
import struct
import subprocess
import threading
import time

import psutil
import pytest
from google.protobuf.message import DecodeError

from e2e import shims
from e2e.hostile_client import connect, connect_bursts, hostile_prelude, send_quietly
from e2e.shimapi import PYSHIM, ShimClient
from e2e.tasks import remove, run_detached
from shim.api import task_pb2
from shim.ttrpc import codec
from shim.ttrpc.codec import DATA, REQUEST, RESPONSE

ROUNDS = int(os.environ.get("PYSHIM_FUZZ_LIVE_ROUNDS", "1"))
# File descriptors must be back exactly. RSS may stay a little higher: measured on the 2-core test
# machine, pyshim's was 1.3 MiB above the (warmed-up) baseline after 1 round and 1.5 MiB after 5,
# i.e. a high-water mark from the first round (what the allocator keeps after the round's 30-50
# concurrent handler threads) rather than growth per round; hence 2 MiB.
RSS_TOLERANCE = 2 << 20
# The container exits by itself, with this status, once the test creates /go in its rootfs.
EXIT_STATUS = 3
WAITER = f"while [ ! -e /go ]; do sleep 0.05; done; exit {EXIT_STATUS}"

TASK_METHODS = ("Create", "Start", "Delete", "Exec", "State", "Kill", "Pids", "CloseIO", "Pause",
                "Resume", "Update", "ResizePty", "Wait", "Connect", "Shutdown", "Checkpoint", "Stats")
UNDECODABLE = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length past the end: no message parses this


def address(containerd, cid):
    return shims.shim_address(shims.bundle(containerd, cid)).removeprefix("unix://")


def listen_backlog(path):
    """The backlog of the Unix socket listening at `path`: `ss` shows it as a listener's Send-Q."""
    out = subprocess.run(["ss", "-xlH", f"src = {path}"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[3])


def test_connection_bursts_after_garbage_are_all_accepted(containerd, ctr, cid):
    """Issue 13's sequence: with a listen backlog of 128, pyshim refused 71 of the 200 connections
    (4 of 10 bursts) with EAGAIN when its accept loop fell behind (it depends on timing, hence the
    backlog is checked too); runc-v2 (Go: backlog = somaxconn) refused none."""
    run_detached(containerd, ctr, cid, "sleep", "600")
    try:
        path = address(containerd, cid)
        with open("/proc/sys/net/core/somaxconn") as f:
            somaxconn = int(f.read())
        backlog = listen_backlog(path)
        half = hostile_prelude(path)
        refused = connect_bursts(path)
        print(f"\n{containerd.runtime}: backlog {backlog} (somaxconn {somaxconn}); "
              f"EAGAIN for {refused[0]} of 200 connections, in {refused[1]} of 10 bursts")
        assert refused == (0, 0)
        assert backlog == min(somaxconn, 65535)  # as Go's listeners
        assert containerd.task_pids(cid)  # containerd still reaches the shim
        half.close()
    finally:
        remove(containerd, ctr, cid)


# -- the live-socket fuzz ---------------------------------------------------------------------------

def request_frame(sid, service, method, payload, flags=0, mtype=REQUEST):
    from shim.ttrpc.ttrpc_pb2 import Request
    data = Request(service=service, method=method, payload=payload).SerializeToString()
    return codec.encode_frame(sid, mtype, flags, data) if len(data) <= codec.MAX_DATA_SIZE else b""


def random_request(rnd, method, cid):
    """A request of `method`'s type that decodes: random bytes that happen to parse, or a message
    with fields set to random values. Never the test's container (ids are `fuzz-…`), and never
    Create with something decodable (that would make runc create a container)."""
    req_type = getattr(task_pb2, {
        "Create": "CreateTaskRequest", "Exec": "ExecProcessRequest", "Update": "UpdateTaskRequest",
        "Checkpoint": "CheckpointTaskRequest", "Wait": "WaitRequest",
    }.get(method, f"{method}Request"))
    if method == "Create":
        return UNDECODABLE
    data = rnd.randbytes(rnd.randrange(0, 64))
    try:
        msg = req_type.FromString(data)
    except DecodeError:
        msg = req_type()
    if msg.DESCRIPTOR.fields_by_name.get("id") is not None:
        msg.id = f"fuzz-{rnd.randrange(1 << 30)}"
    if "exec_id" in msg.DESCRIPTOR.fields_by_name and rnd.random() < 0.5:
        msg.exec_id = f"fuzz-{rnd.randrange(1 << 30)}"
    assert not msg.id.startswith(cid) or msg.id == ""
    return msg.SerializeToString()


def fuzz_round(path, service, cid, rnd):
    """One round of everything, each on connections of its own; returns the sockets left open."""
    left_open = []
    services = [service, "containerd.task.v9.Task", "", "x" * 5000, "containerd.task.v2.Task\x00"]
    # garbage bytes, and garbage that starts like a frame
    for _ in range(20):
        s = connect(path)
        send_quietly(s, rnd.randbytes(rnd.randrange(1, 4096)))
        s.close()
    for _ in range(10):
        s = connect(path)
        header = struct.pack(">IIBB", rnd.randrange(0, 64), rnd.randrange(1 << 32), rnd.choice((0, 4, 0x7F, 0xFF)), 0)
        send_quietly(s, header + rnd.randbytes(64))
        s.close()
    # malformed frames on one connection: even ids, reused ids, Data and Response frames, flags
    s = connect(path)
    frames = [request_frame(2, service, "State", b""), request_frame(1, service, "State", UNDECODABLE),
              request_frame(1, service, "State", b""), codec.encode_frame(3, DATA, 0, b"junk"),
              codec.encode_frame(5, RESPONSE, 0, b"\x12\x00"), request_frame(7, service, "Pids", b"", flags=2),
              codec.encode_frame(9, REQUEST, 0, rnd.randbytes(100))]
    send_quietly(s, b"".join(frames))
    left_open.append(s)
    # oversized lengths: declared and dropped, declared and sent, 4 GiB declared then closed
    s = connect(path)
    send_quietly(s, struct.pack(">IIBB", codec.MAX_DATA_SIZE + 1, 1, REQUEST, 0) + b"\0" * (codec.MAX_DATA_SIZE + 1)
                 + request_frame(3, service, "Connect", b""))
    left_open.append(s)
    s = connect(path)
    send_quietly(s, struct.pack(">IIBB", 0xFFFFFFFF, 1, REQUEST, 0) + b"\0" * 100000)
    s.close()
    # unknown services and methods, garbage protobuf, every method with garbage and random requests
    s = connect(path)
    sid, batch = 1, []
    for name in services:
        batch.append(request_frame(sid, name, "State", b""))
        sid += 2
    for method in TASK_METHODS + ("Nope", "", "state", "State\x00", "y" * 3000):
        batch.append(request_frame(sid, service, method, UNDECODABLE))
        sid += 2
        if method in TASK_METHODS:
            for _ in range(3):
                batch.append(request_frame(sid, service, method, random_request(rnd, method, cid)))
                sid += 2
    send_quietly(s, b"".join(batch))
    left_open.append(s)
    # half frames, left hanging and then closed by us
    for cut in (1, 5, 9, 10, 11, 50):
        s = connect(path)
        send_quietly(s, request_frame(1, service, "State", random_request(rnd, "State", cid))[:cut])
        left_open.append(s)
    # floods: requests never read, in parallel; a burst of connections; a flood of bad frames
    flood = b"".join(request_frame(sid, service, "Nope", b"x" * 200) for sid in range(1, 4001, 2))
    floods = [connect(path) for _ in range(8)]
    senders = [threading.Thread(target=send_quietly, args=(f, flood), daemon=True) for f in floods]
    for t in senders:
        t.start()
    left_open += floods
    bursts = [connect(path) for _ in range(60)]
    for b in bursts:
        b.close()
    s = connect(path)
    send_quietly(s, b"".join(codec.encode_frame(i * 2, REQUEST, 0, b"") for i in range(5000)))
    left_open.append(s)
    return left_open, senders


def concurrent_calls(path, service, cid, count):
    """`count` State calls sent in one write (so that they run at once), half of them for a
    process that does not exist; waits for every answer."""
    state = task_pb2.StateRequest(id=cid).SerializeToString()
    missing = task_pb2.StateRequest(id=cid, exec_id="none").SerializeToString()
    s = connect(path, timeout=10)
    s.sendall(b"".join(request_frame(2 * i + 1, service, "State", state if i % 2 else missing)
                       for i in range(count)))
    decoder, answers = codec.Decoder(), 0
    while answers < count:
        data = s.recv(65536)
        assert data, "the shim closed the connection"
        answers += len(decoder.feed(data))
    s.close()


def shim_figures(pid):
    proc = psutil.Process(pid)
    return len(shims.open_fds(pid)), proc.memory_info().rss, proc.num_threads()


def settle(pid, base, timeout=20.0):
    """Figures once the fd and thread counts are back to `base` (or after `timeout`): pyshim's idle
    handler threads end 10 s after their last call."""
    deadline = time.monotonic() + timeout
    while True:
        figures = shim_figures(pid)
        if (figures[0] <= base[0] and figures[2] <= base[2]) or time.monotonic() > deadline:
            return figures
        time.sleep(0.2)


def test_live_socket_fuzz_leaves_the_shim_serving_and_holding_nothing(containerd, ctr, cid):
    run_detached(containerd, ctr, cid, "sh", "-c", WAITER)
    try:
        pid = shims.shim_pid(containerd, cid)
        path = address(containerd, cid)
        with ShimClient(containerd, cid) as shim:
            service = shim.service
        # Warm up what the checks afterwards use (an exec, ctr task ps) and a burst of concurrent
        # calls (as a fuzz round makes), then take the baseline once the idle threads have ended.
        # The figures from before the warm-up are reported too.
        cold = shim_figures(pid)
        assert ctr("task", "exec", "--exec-id", "warm", cid, "echo", "warm") == (0, "warm\n", "")
        assert containerd.task_pids(cid)
        concurrent_calls(path, service, cid, 100)
        base = settle(pid, cold)

        seed = random.randrange(1 << 32)
        rnd = random.Random(seed)
        peak = base
        for _ in range(ROUNDS):
            try:
                left_open, senders = fuzz_round(path, service, cid, rnd)
            except ConnectionRefusedError:
                if containerd.runtime != PYSHIM and not shims.alive(pid):
                    # containerd 2.1's runc-v2 (ttrpc 1.2.7) panics on a Data frame for a stream
                    # that was never opened: "interface conversion: interface {} is nil, not
                    # *ttrpc.streamHandler"; containerd then cleans the task up as a dead shim.
                    pytest.xfail(f"{containerd.runtime}'s shim died during the fuzz (seed {seed})")
                raise
            time.sleep(0.3)
            peak = max(peak, shim_figures(pid))
            assert containerd.task_pids(cid), f"seed {seed}: containerd lost the shim during the fuzz"
            for s in left_open:
                s.close()
            for t in senders:
                t.join(10)

        after = settle(pid, base)
        print(f"\n{containerd.runtime} (seed {seed}, {ROUNDS} rounds): fds {base[0]} -> peak {peak[0]} -> {after[0]}; "
              f"RSS {base[1] / 2**20:.2f} -> {after[1] / 2**20:.2f} MiB ({(after[1] - base[1]) / 2**20:+.2f}; "
              f"before the warm-up {cold[1] / 2**20:.2f}); threads {base[2]} -> peak {peak[2]} -> {after[2]}")
        assert shims.alive(pid), f"seed {seed}: the shim died"
        # The shim still serves the container, through containerd ...
        assert containerd.task_pids(cid)
        assert ctr("task", "exec", "--exec-id", "after", cid, "echo", "still") == (0, "still\n", "")
        # ... and its exit is still delivered, with the right status.
        with containerd.events() as events:
            (shims.bundle(containerd, cid) / "rootfs" / "go").touch()
            exit_event = events.wait_for("/tasks/exit", container_id=cid)
        assert exit_event.get("exit_status", 0) == EXIT_STATUS

        held = []
        if after[0] != base[0]:
            held.append(f"fds {base[0]} before, {after[0]} after")
        if after[1] - base[1] > RSS_TOLERANCE:
            held.append(f"RSS grew by {(after[1] - base[1]) / 2**20:.2f} MiB")
        if held and containerd.runtime != PYSHIM:
            pytest.xfail(f"{containerd.runtime} keeps what the fuzz made it take: {', '.join(held)}")
        assert not held, f"seed {seed}: {', '.join(held)}"
    finally:
        remove(containerd, ctr, cid)
