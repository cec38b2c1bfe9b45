"""The probe's annotations, the Create gate, the call wrapper and the other hooks, with fakes."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from shim.api import task_pb2 as pb
from shim.probe import hooks, points
from shim.ttrpc import Code, TTRPCError

CD = points.CONTAINERD_PREFIX
PY = points.PYSHIM_PREFIX


@pytest.fixture(autouse=True)
def clean_probe():
    hooks.reset()
    yield
    hooks.reset()


class Ctx:
    service = "containerd.task.v2.Task"
    stream_id = 5
    after_reply = None


def bundle(tmp_path, cid: str, annotations: dict[str, str] | None) -> None:
    d = tmp_path / cid
    d.mkdir()
    spec = {"ociVersion": "1.0.2", "process": {"args": ["true"]}}
    if annotations is not None:
        spec["annotations"] = annotations
    (d / "config.json").write_text(json.dumps(spec))


def table(calls: list[str]):
    def handler(name, response):
        def h(req, ctx):
            calls.append(name)
            return response
        return h
    return {"Create": (pb.CreateTaskRequest, handler("Create", pb.CreateTaskResponse(pid=7))),
            "Start": (pb.StartRequest, handler("Start", pb.StartResponse(pid=7))),
            "Kill": (pb.KillRequest, handler("Kill", None))}


def served_by_gate(tmp_path, trace_dir=""):
    calls: list[str] = []
    served: dict = {}
    raw = table(calls)
    served.update(hooks.install(raw, str(tmp_path), trace_dir or str(tmp_path / "traces"), served.update))
    return raw, served, calls


# -- annotations --------------------------------------------------------------------------


def test_containerd_keys_are_methods_and_pyshim_keys_are_points():
    fps = points.failpoints({CD + "Start": "1*error(x)", PY + "runc.create.before": "1*hang",
                             "other": "ignored"})
    assert sorted(fps) == ["Start", "runc.create.before"]


@pytest.mark.parametrize("annotations,named", [
    ({CD + "Bogus": "1*off"}, CD + "Bogus"),
    ({CD + "Start": "1*kill"}, CD + "Start"),
    ({PY + "Start.during": "1*off"}, PY + "Start.during"),
    ({PY + "event.exit": "1*error(x)"}, PY + "event.exit"),
    ({PY + "stdio.stdout": "1*stop(x)"}, PY + "stdio.stdout"),
])
def test_bad_annotations_name_themselves(annotations, named):
    with pytest.raises(points.ProbeConfigError, match=named.replace(".", r"\.")):
        points.failpoints(annotations)


def test_unknown_pyshim_annotation_is_refused():
    with pytest.raises(points.ProbeConfigError, match="io.pyshim.tarce"):
        points.check_annotations({"io.pyshim.tarce": "x"})


def test_trace_path_is_confined_to_a_private_directory(tmp_path):
    d = tmp_path / "traces"
    d.mkdir(mode=0o700)
    assert points.trace_path("a.jsonl", str(d)) == str(d / "a.jsonl")
    assert points.trace_path(str(d / "a.jsonl"), str(d)) == str(d / "a.jsonl")
    for bad in ("../a.jsonl", "/tmp/a.jsonl", "sub/a", ".hidden", ""):
        with pytest.raises(points.ProbeConfigError, match="io.pyshim.trace"):
            points.trace_path(bad, str(d))
    os.chmod(d, 0o777)
    with pytest.raises(points.ProbeConfigError, match="writable by it alone"):
        points.trace_path("a.jsonl", str(d))
    with pytest.raises(points.ProbeConfigError, match="No such file"):
        points.trace_path("a.jsonl", str(tmp_path / "missing"))
    link = tmp_path / "link"
    link.symlink_to(d)
    os.chmod(d, 0o700)
    with pytest.raises(points.ProbeConfigError, match="must be a directory"):
        points.trace_path("a.jsonl", str(link))


def test_read_annotations_skips_configs_without_markers(tmp_path):
    bundle(tmp_path, "plain", {"org.example": "x"})
    bundle(tmp_path, "fp", {CD + "Start": "1*off", "org.example": "x"})
    assert points.read_annotations(str(tmp_path / "plain" / "config.json")) is None
    assert points.read_annotations(str(tmp_path / "fp" / "config.json")) == {CD + "Start": "1*off"}
    assert points.read_annotations(str(tmp_path / "missing" / "config.json")) is None


# -- the gate and the wrapper -------------------------------------------------------------


def test_off_serves_the_handlers_themselves_except_create(tmp_path):
    raw, served, calls = served_by_gate(tmp_path)
    assert served["Start"] is raw["Start"] and served["Kill"] is raw["Kill"]
    assert served["Create"] is not raw["Create"]
    bundle(tmp_path, "c1", None)
    assert served["Create"][1](pb.CreateTaskRequest(id="c1"), Ctx()).pid == 7
    assert not hooks.ON and served["Start"] is raw["Start"] and calls == ["Create"]


def test_containerd_failpoint_on_start_fails_once_with_unknown(tmp_path):
    raw, served, calls = served_by_gate(tmp_path)
    bundle(tmp_path, "c1", {CD + "Start": "1*error(please retry)"})
    served["Create"][1](pb.CreateTaskRequest(id="c1"), Ctx())
    assert hooks.ON and served["Start"] is not raw["Start"]  # swapped in by the gate
    with pytest.raises(TTRPCError) as e:
        served["Start"][1](pb.StartRequest(id="c1"), Ctx())
    assert (e.value.code, e.value.message) == (Code.UNKNOWN, "please retry")
    assert served["Start"][1](pb.StartRequest(id="c1"), Ctx()).pid == 7
    # another container's calls are not affected
    assert served["Start"][1](pb.StartRequest(id="c2"), Ctx()).pid == 7
    assert calls == ["Create", "Start", "Start"]


def test_create_failpoint_fires_on_the_create_that_armed_it(tmp_path):
    raw, served, calls = served_by_gate(tmp_path)
    bundle(tmp_path, "c1", {CD + "Create": "1*error(no)"})
    with pytest.raises(TTRPCError, match="no"):
        served["Create"][1](pb.CreateTaskRequest(id="c1"), Ctx())
    assert calls == []


def test_malformed_failpoint_is_invalid_argument_at_create(tmp_path):
    raw, served, calls = served_by_gate(tmp_path)
    bundle(tmp_path, "c1", {CD + "Start": "1*error"})
    with pytest.raises(TTRPCError) as e:
        served["Create"][1](pb.CreateTaskRequest(id="c1"), Ctx())
    assert e.value.code == Code.INVALID_ARGUMENT and CD + "Start" in e.value.message
    assert calls == [] and not hooks.ON


def test_delay_sleeps_then_runs(tmp_path):
    raw, served, calls = served_by_gate(tmp_path)
    bundle(tmp_path, "c1", {PY + "Kill.before": "1*delay(200)"})
    served["Create"][1](pb.CreateTaskRequest(id="c1"), Ctx())
    began = time.monotonic()
    served["Kill"][1](pb.KillRequest(id="c1"), Ctx())
    assert time.monotonic() - began >= 0.2 and calls == ["Create", "Kill"]


def test_after_kill_waits_for_the_reply(tmp_path, monkeypatch):
    killed: list[object] = []
    monkeypatch.setattr(hooks, "kill_self", lambda arg=None: killed.append(arg))
    raw, served, calls = served_by_gate(tmp_path)
    bundle(tmp_path, "c1", {PY + "Create.after": "1*kill"})
    ctx = Ctx()
    assert served["Create"][1](pb.CreateTaskRequest(id="c1"), ctx).pid == 7
    assert killed == [] and len(ctx.after_reply) == 1
    ctx.after_reply[0]()
    assert killed == [None]


def test_panic_exits_like_a_go_panic(tmp_path, monkeypatch):
    exits: list[int] = []

    def fake_exit(status: int) -> None:
        exits.append(status)
        raise SystemExit(status)
    monkeypatch.setattr(os, "_exit", fake_exit)
    raw, served, calls = served_by_gate(tmp_path)
    bundle(tmp_path, "c1", {CD + "Start": "1*panic(boom)"})
    served["Create"][1](pb.CreateTaskRequest(id="c1"), Ctx())
    with pytest.raises(SystemExit):
        served["Start"][1](pb.StartRequest(id="c1"), Ctx())
    assert exits == [2] and calls == ["Create"]


def test_a_reused_id_without_annotations_is_disarmed(tmp_path):
    raw, served, calls = served_by_gate(tmp_path)
    bundle(tmp_path, "c1", {CD + "Start": "5*error(x)"})
    served["Create"][1](pb.CreateTaskRequest(id="c1"), Ctx())
    (tmp_path / "c1" / "config.json").write_text("{}")
    served["Create"][1](pb.CreateTaskRequest(id="c1"), Ctx())
    assert served["Start"][1](pb.StartRequest(id="c1"), Ctx()).pid == 7


def test_traced_calls_record_request_response_and_status(tmp_path):
    path = tmp_path / "t.jsonl"
    hooks.enable_trace(str(path))
    raw, served, calls = served_by_gate(tmp_path)
    bundle(tmp_path, "c1", None)
    served["Create"][1](pb.CreateTaskRequest(id="c1", bundle="/b"), Ctx())
    served["Kill"][1](pb.KillRequest(id="c1", exec_id="e1", signal=9), Ctx())  # returns None
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    create, kill = recs
    assert create["kind"] == "call" and create["method"] == "Create" and create["stream"] == 5
    assert create["request"] == {"id": "c1", "bundle": "/b"} and create["response"] == {"pid": 7}
    assert (create["code"], create["code_name"], create["message"]) == (0, "OK", "")
    assert "exec_id" not in create and kill["exec_id"] == "e1"
    assert create["duration"] >= 0 and create["service"] == "containerd.task.v2.Task"


def test_failed_call_is_traced_with_its_code(tmp_path):
    path = tmp_path / "t.jsonl"
    hooks.enable_trace(str(path))

    def not_found(req, ctx):
        raise TTRPCError(Code.NOT_FOUND, "container c9: not found")
    wrapped = hooks.wrap_methods({"State": (pb.StateRequest, not_found)})
    with pytest.raises(TTRPCError):
        wrapped["State"][1](pb.StateRequest(id="c9"), Ctx())
    rec = json.loads(path.read_text())
    assert (rec["code"], rec["code_name"], rec["response"]) == (5, "NOT_FOUND", None)


def test_failpoints_are_traced(tmp_path):
    path = tmp_path / "t.jsonl"
    hooks.enable_trace(str(path))
    hooks.configure("c1", {CD + "Start": "1*off"}, str(tmp_path))
    hooks.fire("c1", "Start")
    rec = json.loads(path.read_text())
    assert rec == {**rec, "kind": "failpoint", "id": "c1", "point": "Start", "action": "off", "arg": None}


# -- runc, events, exits, stdio -----------------------------------------------------------


class RuncError(Exception):
    def __init__(self, message: str, status: int = -1) -> None:
        super().__init__(message)
        self.status = status


def test_runc_hook_traces_and_fails(tmp_path):
    path = tmp_path / "t.jsonl"
    hooks.enable_trace(str(path))
    hooks.configure("c1", {PY + "runc.start.after": "1*error(after start)"}, str(tmp_path))
    assert hooks.runc("c1", "create", ["runc", "create", "c1"], lambda: b"ok", RuncError) == b"ok"
    with pytest.raises(RuncError, match="after start"):
        hooks.runc("c1", "start", ["runc", "start", "c1"], lambda: b"", RuncError)

    def failing() -> bytes:
        raise RuncError("container not running", 1)
    with pytest.raises(RuncError):
        hooks.runc("c1", "kill", ["runc", "kill", "c1", "9"], failing, RuncError)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    runs = [r for r in recs if r["kind"] == "runc"]
    assert [(r["argv"][1], r["exit_status"], r["error"]) for r in runs] == [
        ("create", 0, None), ("start", -1, "after start"), ("kill", 1, "container not running")]


def test_event_hook_drops_and_duplicates(tmp_path):
    path = tmp_path / "t.jsonl"
    hooks.enable_trace(str(path))
    hooks.configure("c1", {PY + "event.exit": "1*drop->1*dup"}, str(tmp_path))
    sent: list[int] = []

    def forward() -> tuple[int, bool]:
        sent.append(1)
        return 1, True
    ev = pb.StartRequest(id="c1")  # any message stands in for the payload
    for _ in range(3):
        hooks.event("c1", "/tasks/exit", ev, forward)
    assert len(sent) == 3  # dropped once, twice, once
    recs = [json.loads(line) for line in path.read_text().splitlines() if '"event"' in line]
    assert [(r["attempts"], r["ok"]) for r in recs] == [(0, False), (1, True), (1, True), (1, True)]
    assert recs[0]["payload"] == {"id": "c1"} and recs[0]["topic"] == "/tasks/exit"


def test_exit_and_stdio_hooks(tmp_path):
    path = tmp_path / "t.jsonl"
    hooks.enable_trace(str(path))
    hooks.configure("c1", {PY + "stdio.stdout": "1*close(3)"}, str(tmp_path))
    hooks.reaped_exit("c1", "e1", 42, 137)
    term = hooks.stdio_start("c1", "", "stdout")
    assert term is not None and (term.type, term.arg) == ("close", 3)
    assert hooks.stdio_start("c1", "", "stdout") is None
    hooks.stdio_end("c1", "", "stdout", 3)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    kinds = [(r["kind"], r.get("phase")) for r in recs]
    assert kinds == [("exit", None), ("stdio", "start"), ("failpoint", None), ("stdio", "start"),
                     ("stdio", "end")]
    assert recs[0]["proc_pid"] == 42 and recs[0]["status"] == 137 and recs[-1]["bytes"] == 3


def test_hang_blocks(tmp_path):
    hooks.configure("c1", {PY + "exit": "1*hang"}, str(tmp_path))
    t = threading.Thread(target=hooks.reaped_exit, args=("c1", "", 1, 0), daemon=True)
    t.start()
    t.join(0.3)
    assert t.is_alive()


def test_off_means_no_tracer_and_no_json_format_import():
    import subprocess
    import sys
    code = ("import sys; from shim.probe import hooks; from shim.runtime import runc, stdio; "
            "from shim.task import events; "
            "assert not hooks.ON and hooks.trace.TRACER is None; "
            "assert 'google.protobuf.json_format' not in sys.modules, 'json_format'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_refused_create_is_traced_as_invalid_argument(tmp_path):
    path = tmp_path / "t.jsonl"
    hooks.enable_trace(str(path))
    raw, served, calls = served_by_gate(tmp_path)
    bundle(tmp_path, "c1", {CD + "Start": "1*bogus"})
    with pytest.raises(TTRPCError):
        served["Create"][1](pb.CreateTaskRequest(id="c1"), Ctx())
    rec = json.loads(path.read_text())
    assert (rec["method"], rec["code_name"]) == ("Create", "INVALID_ARGUMENT")
    assert CD + "Start" in rec["message"] and rec["message"].endswith(": invalid argument")
    assert calls == []
