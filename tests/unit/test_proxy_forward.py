"""The proxy's frame forwarding (shim/proxy/forward.py) between socket pairs: what containerd and the
target each receive, and what the trace says, with and without failpoint verdicts."""
import json
import socket
import threading
import time

from google.protobuf.empty_pb2 import Empty

from shim.api import task_pb2 as pb
from shim.probe.trace import Tracer
from shim.proxy.forward import PASS, Pair, Verdict
from shim.ttrpc import Code, TTRPCError, codec

SERVICE = "containerd.task.v2.Task"


def frames(sock, count, timeout=5.0):
    sock.settimeout(timeout)
    decoder, found = codec.Decoder(), []
    while len(found) < count:
        data = sock.recv(65536)
        assert data, f"closed after {found}"
        found += decoder.feed(data)
    return found


class Rig:
    """containerd <-> [down | Pair | up] <-> target, over socket pairs."""

    def __init__(self, tmp_path, judge=None):
        self.containerd, down = socket.socketpair()
        up, self.target = socket.socketpair()
        self.trace_path = tmp_path / "trace.jsonl"
        self.closed = threading.Event()
        self.pair = Pair(down, up, Tracer(str(self.trace_path), src="proxy"), judge,
                         lambda pair: self.closed.set())
        self.pair.start()

    def records(self, count=1, timeout=5.0):
        """The trace's records, once there are `count` (a record is written after the frame goes out)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.trace_path.read_text() if self.trace_path.exists() else ""
            found = [json.loads(line) for line in text.splitlines()]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.01)

    def call(self, sid, method, msg):
        self.containerd.sendall(codec.encode_request(sid, SERVICE, method, msg.SerializeToString()))


def test_a_call_passes_both_ways_and_is_traced(tmp_path):
    rig = Rig(tmp_path)
    rig.call(1, "State", pb.StateRequest(id="c1", exec_id="e1"))
    [request] = frames(rig.target, 1)
    req = codec.decode_request(request.data)
    assert (request.stream_id, req.method, pb.StateRequest.FromString(req.payload).id) == (1, "State", "c1")
    rig.target.sendall(codec.encode_response(1, pb.StateResponse(id="c1", pid=42).SerializeToString()))
    [response] = frames(rig.containerd, 1)
    assert pb.StateResponse.FromString(codec.decode_response(response.data).payload).pid == 42
    [rec] = rig.records()
    assert (rec["kind"], rec["method"], rec["id"], rec["exec_id"], rec["code_name"]) == ("call", "State", "c1", "e1", "OK")
    assert rec["request"] == {"id": "c1", "execId": "e1"} and rec["response"]["pid"] == 42 and rec["stream"] == 1


def test_an_error_verdict_answers_without_reaching_the_target(tmp_path):
    rig = Rig(tmp_path, judge=lambda cid, exec_id, method, msg:
              Verdict(error=TTRPCError(Code.UNKNOWN, "please retry")) if method == "Start" else PASS)
    rig.call(1, "Start", pb.StartRequest(id="c1"))
    [answer] = frames(rig.containerd, 1)
    status = codec.decode_response(answer.data).status
    assert (status.code, status.message) == (Code.UNKNOWN, "please retry")
    rig.call(3, "Kill", pb.KillRequest(id="c1", signal=9))
    [passed] = frames(rig.target, 1)  # the next call still goes through, and Start never did
    assert (passed.stream_id, codec.decode_request(passed.data).method) == (3, "Kill")
    assert [(r["method"], r["code_name"]) for r in rig.records()] == [("Start", "UNKNOWN")]


def test_an_after_verdict_replaces_the_targets_answer_then_runs_its_action(tmp_path):
    ran = threading.Event()
    after = Verdict(error=TTRPCError(Code.UNKNOWN, "lost"), then=ran.set)
    rig = Rig(tmp_path, judge=lambda *_: Verdict(after=lambda: after))
    rig.call(1, "Delete", pb.DeleteRequest(id="c1"))
    frames(rig.target, 1)
    rig.target.sendall(codec.encode_response(1, pb.DeleteResponse(pid=7).SerializeToString()))
    [answer] = frames(rig.containerd, 1)
    assert codec.decode_response(answer.data).status.message == "lost"
    assert ran.wait(5)
    [rec] = rig.records()
    assert rec["code_name"] == "UNKNOWN" and rec["response"]["pid"] == 7  # what the target said, what containerd got


def test_a_target_that_goes_away_closes_containerds_connection(tmp_path):
    rig = Rig(tmp_path)
    rig.call(1, "Wait", pb.WaitRequest(id="c1"))
    frames(rig.target, 1)
    rig.target.close()
    rig.containerd.settimeout(5)
    assert rig.containerd.recv(10) == b""  # containerd sees its shim gone
    assert rig.closed.wait(5)
    [rec] = rig.records()
    assert (rec["method"], rec["code_name"]) == ("Wait", "UNAVAILABLE")


def test_empty_responses_pass_unchanged(tmp_path):
    rig = Rig(tmp_path)
    rig.call(1, "Kill", pb.KillRequest(id="c1"))
    frames(rig.target, 1)
    rig.target.sendall(codec.encode_response(1, Empty().SerializeToString()))
    [answer] = frames(rig.containerd, 1)
    assert answer.data == b"" and rig.records()[0]["response"] == {}
