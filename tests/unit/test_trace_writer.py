"""The trace writer: one whole JSON line per record, appended by several processes."""

from __future__ import annotations

import json
import os
import time

import pytest

from shim.probe import trace
from shim.probe.trace import Tracer


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_record_has_the_common_keys(tmp_path):
    path = tmp_path / "t.jsonl"
    t = Tracer(str(path))
    before = time.monotonic()
    t.record("phase", None, name="start.begin")
    t.record("exit", "c1", exec_id="", proc_pid=42, status=3)
    t.close()
    first, second = lines(path)
    assert set(first) == {"ts", "wall", "pid", "src", "kind", "id", "name"}
    assert first["kind"] == "phase" and first["id"] is None and first["src"] == "pyshim"
    assert first["pid"] == os.getpid() and before <= first["ts"] <= time.monotonic()
    assert abs(first["wall"] - time.time()) < 5
    assert second == {**second, "kind": "exit", "id": "c1", "exec_id": "", "proc_pid": 42, "status": 3}
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_ts_is_when_it_began_and_wall_moves_with_it(tmp_path):
    path = tmp_path / "t.jsonl"
    t = Tracer(str(path), src="proxy")
    began = time.monotonic() - 2.0
    t.record("runc", "c1", ts=began, argv=["runc", "start", "c1"], duration=2.0)
    rec, = lines(path)
    assert rec["ts"] == began and rec["src"] == "proxy"
    assert abs((time.time() - rec["wall"]) - 2.0) < 0.5


def test_routes_send_a_container_to_its_own_file(tmp_path):
    default, own = tmp_path / "all.jsonl", tmp_path / "c2.jsonl"
    t = Tracer(str(default))
    t.route("c2", str(own))
    t.record("exit", "c1", proc_pid=1, status=0)
    t.record("exit", "c2", proc_pid=2, status=0)
    t.record("phase", None, name="daemon.serving")
    assert [r["id"] for r in lines(default)] == ["c1", None]
    assert [r["id"] for r in lines(own)] == ["c2"]
    t.unroute("c2")
    t.record("exit", "c2", proc_pid=2, status=0)
    assert [r["id"] for r in lines(default)] == ["c1", None, "c2"]


def test_without_a_default_only_routed_containers_are_written(tmp_path):
    own = tmp_path / "c2.jsonl"
    t = Tracer()
    assert not t.wants("c2")
    t.route("c2", str(own))
    t.record("exit", "c1", proc_pid=1, status=0)
    t.record("phase", None, name="x")
    t.record("exit", "c2", proc_pid=2, status=0)
    assert t.wants("c2") and not t.wants("c1") and not t.wants(None)
    assert [r["id"] for r in lines(own)] == ["c2"]


def test_appends_across_processes_keep_records_whole(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"kind":"phase"}\n')  # an earlier writer's record stays
    big = "x" * 20000
    pids = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            try:
                t = Tracer(str(path))
                for i in range(50):
                    t.record("phase", None, name=f"n{i}", detail=big)
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    recs = lines(path)
    assert len(recs) == 1 + 4 * 50
    assert all(r.get("detail", big) == big for r in recs)


def test_never_follows_a_symlink(tmp_path):
    target = tmp_path / "target"
    target.write_text("")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OSError):
        Tracer(str(tmp_path / "link"))


def test_values_json_cannot_encode_are_kept_as_text(tmp_path):
    path = tmp_path / "t.jsonl"
    Tracer(str(path)).record("phase", None, name="x", detail=b"raw", argv=("runc", "start"))
    rec, = lines(path)
    assert rec["detail"] == "raw" and rec["argv"] == ["runc", "start"]


def test_message_dict_uses_json_format_defaults():
    from shim.api import task_pb2 as pb
    assert trace.message_dict(pb.StartRequest(id="c1", exec_id="")) == {"id": "c1"}
    assert trace.message_dict(pb.WaitResponse(exit_status=3)) == {"exitStatus": 3}
    assert trace.message_dict(None) is None


def test_module_tracer_is_off_until_enabled(tmp_path, monkeypatch):
    monkeypatch.setattr(trace, "TRACER", None)
    assert trace.TRACER is None
    trace.route("c1", str(tmp_path / "c1.jsonl"))
    assert trace.TRACER is not None and not trace.TRACER.wants(None)
    trace.enable(str(tmp_path / "all.jsonl"))
    assert trace.TRACER.wants(None)
    trace.TRACER.close()


def test_message_dict_shows_the_json_inside_an_unknown_any():
    from google.protobuf.any_pb2 import Any
    from shim.api import task_pb2 as pb
    spec = Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process", value=b'{"args":["sh"]}')
    got = trace.message_dict(pb.ExecProcessRequest(id="c1", exec_id="e1", spec=spec))
    assert got == {"id": "c1", "execId": "e1",
                   "spec": {"@type": "types.containerd.io/opencontainers/runtime-spec/1/Process",
                            "value": {"args": ["sh"]}}}
    raw = Any(type_url="x/unknown", value=b"\x00\x01")
    assert trace.message_dict(pb.UpdateTaskRequest(id="c1", resources=raw))["resources"] == {
        "@type": "x/unknown", "valueBase64": "AAE="}
