"""Traces of real containers: env variable, annotation, runtime option; and none when off."""
import os

import psutil
import pytest

from e2e import harness
from e2e.probing import ProbingContainerd, is_subsequence, read_trace


@pytest.fixture(scope="module")
def probing():
    yield from harness.session_containerd(ProbingContainerd, "pyshim-trace-")


@pytest.fixture
def pctr(request, probing):
    harness.watch_log(request.node, probing)
    yield probing.ctr
    probing.check_leaks()


def run_rm(probing, pctr, cid, *options):
    return pctr("run", "--rm", *options, "--runtime", probing.runtime, probing.image, cid,
                "echo", "hi")


def test_env_trace_of_ctr_run_rm(probing, pctr):
    cid = probing.new_id("traced")
    assert run_rm(probing, pctr, cid) == (0, "hi\n", "")
    recs = read_trace(probing.env_trace, cid)
    calls = [r for r in recs if r["kind"] == "call"]
    methods = [r["method"] for r in sorted(calls, key=lambda r: r["ts"])]
    assert is_subsequence(["Create", "Start", "Delete"], methods), methods
    # Wait is sent before Start (2.x) or after it (1.6), and returns once the process has
    # exited: in causal order, Create ends before Start begins, Start begins before Wait
    # returns, Wait returns before Delete begins.
    one = {m: next(r for r in calls if r["method"] == m) for m in ("Create", "Start", "Wait", "Delete")}
    end = {m: r["ts"] + r["duration"] for m, r in one.items()}
    assert end["Create"] <= one["Start"]["ts"] < end["Wait"] <= one["Delete"]["ts"], one
    for r in calls:
        assert r["duration"] >= 0 and r["service"].startswith("containerd.task.v")
        assert r["stream"] % 2 == 1 and r["code_name"] in ("OK", "NOT_FOUND", "FAILED_PRECONDITION")
    create = next(r for r in calls if r["method"] == "Create")
    assert create["request"]["id"] == cid and create["code"] == 0
    assert create["response"]["pid"] > 0
    wait = next(r for r in calls if r["method"] == "Wait")
    assert wait["duration"] > 0 and wait["response"].get("exitStatus", 0) == 0

    runc = sorted((r for r in recs if r["kind"] == "runc"), key=lambda r: r["ts"])
    verbs = [r["argv"][r["argv"].index("json") + 1] for r in runc]
    assert is_subsequence(["create", "start", "delete"], verbs), verbs
    assert all(r["exit_status"] == 0 and r["error"] is None and r["duration"] > 0 for r in runc)

    topics = [r["topic"] for r in sorted(recs, key=lambda r: r["ts"]) if r["kind"] == "event"]
    assert is_subsequence(["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], topics), topics
    assert all(r["ok"] and r["attempts"] == 1 for r in recs if r["kind"] == "event")

    exits = [r for r in recs if r["kind"] == "exit"]
    assert [(e["exec_id"], e["status"]) for e in exits] == [("", 0)]
    assert exits[0]["proc_pid"] == create["response"]["pid"]
    stdout_end = [r for r in recs if r["kind"] == "stdio" and r["stream"] == "stdout" and r["phase"] == "end"]
    assert [r["bytes"] for r in stdout_end] == [3]  # "hi\n"

    phases = [r["name"] for r in sorted(recs, key=lambda r: r["ts"]) if r["kind"] == "phase"]
    assert is_subsequence(["start.begin", "start.address", "start.end", "delete.begin", "delete.end"], phases), phases
    assert "daemon.serving" in phases
    # start, the daemon and delete are three processes writing one file
    assert len({r["pid"] for r in recs}) >= 3
    assert all(r["wall"] > 1.7e9 and r["src"] == "pyshim" for r in recs)


def test_annotation_traces_its_container_to_its_own_file(probing, pctr):
    cid = probing.new_id("annotated")
    assert run_rm(probing, pctr, cid, "--annotation", "io.pyshim.trace=mine.jsonl") == (0, "hi\n", "")
    own = read_trace(probing.trace_dir / "mine.jsonl")
    assert {r["id"] for r in own} == {cid}
    assert {"Create", "Start", "Wait", "Delete"} <= {r["method"] for r in own if r["kind"] == "call"}
    assert oct((probing.trace_dir / "mine.jsonl").stat().st_mode & 0o777) == "0o600"
    # The annotation wins: the daemon writes nothing of this container to the env trace
    # (start and delete, which read no annotations, still do).
    env = read_trace(probing.env_trace, cid)
    assert env and {r["kind"] for r in env} == {"phase"}


@pytest.mark.parametrize("value", ["/tmp/pyshim-escape.jsonl", "../escape.jsonl", "sub/x.jsonl"])
def test_annotation_cannot_write_outside_the_trace_dir(probing, pctr, value):
    cid = probing.new_id("escape")
    result = run_rm(probing, pctr, cid, "--annotation", f"io.pyshim.trace={value}")
    assert result.rc != 0 and "io.pyshim.trace" in result.stderr, result
    assert "invalid argument" in result.stderr.lower()
    assert not os.path.exists("/tmp/pyshim-escape.jsonl")
    assert not (probing.trace_dir.parent / "escape.jsonl").exists()
    pctr("container", "rm", cid)


def test_runtime_option_names_the_shims_trace(probing, pctr, tmp_path):
    option_trace = tmp_path / "option.jsonl"
    config = tmp_path / "pyshim.toml"
    config.write_text(f'PyshimTrace = "{option_trace}"\n')
    cid = probing.new_id("option")
    assert run_rm(probing, pctr, cid, "--runtime-config-path", str(config)) == (0, "hi\n", "")
    recs = read_trace(option_trace, cid)
    assert {"Create", "Start", "Wait", "Delete"} <= {r["method"] for r in recs if r["kind"] == "call"}
    # The option wins over the environment for the daemon's records.
    assert {r["kind"] for r in read_trace(probing.env_trace, cid)} == {"phase"}


def test_no_trace_without_asking(probing, pctr, containerd, ctr, cid):
    """Without the variable, option or annotation (the session's containerd), a shim opens
    no trace; and in the probing containerd, no annotation means no file in the trace dir."""
    before = set(os.listdir(probing.trace_dir))
    assert ctr("run", "-d", "--runtime", containerd.runtime, containerd.image, cid, "sleep", "30").rc == 0
    try:
        containerd.wait_task_status(cid, "RUNNING")
        shims = [p for p in psutil.Process(containerd.process.pid).children(recursive=True)
                 if "containerd-shim-pyshim-v1" in " ".join(p.cmdline()) and cid in " ".join(p.cmdline())]
        assert shims
        for shim in shims:
            assert not [f.path for f in shim.open_files() if f.path.endswith(".jsonl")]
    finally:
        ctr("task", "kill", "-s", "KILL", cid)
        containerd.wait_task_status(cid, "STOPPED")
        ctr("task", "rm", cid)
        ctr("container", "rm", cid)
    other = probing.new_id("plain")
    assert run_rm(probing, pctr, other) == (0, "hi\n", "")
    assert set(os.listdir(probing.trace_dir)) == before


def test_exec_is_traced_with_its_exec_id(probing, pctr):
    cid = probing.new_id("exec")
    own = probing.trace_dir / f"{cid}.jsonl"
    assert pctr("run", "-d", "--annotation", f"io.pyshim.trace={own.name}", "--runtime", probing.runtime,
                probing.image, cid, "sleep", "30").rc == 0
    try:
        probing.wait_task_status(cid, "RUNNING")
        result = pctr("task", "exec", "--exec-id", "e1", cid, "sh", "-c", "echo out; exit 3")
        assert (result.rc, result.stdout) == (3, "out\n"), result
    finally:
        pctr("task", "kill", "-s", "KILL", cid)
        probing.wait_task_status(cid, "STOPPED")
        pctr("task", "rm", cid)
        pctr("container", "rm", cid)
    recs = read_trace(own)
    exec_calls = [r["method"] for r in sorted(recs, key=lambda r: r["ts"])
                  if r["kind"] == "call" and r.get("exec_id") == "e1"]
    assert is_subsequence(["Exec", "Start", "Delete"], exec_calls) and "Wait" in exec_calls, exec_calls
    assert any(r["kind"] == "call" and r["method"] == "Exec" and r["request"]["execId"] == "e1" for r in recs)
    assert any(r["kind"] == "runc" and "exec" in r["argv"] for r in recs)
    assert [(r["exec_id"], r["status"]) for r in recs if r["kind"] == "exit"] == [("e1", 3), ("", 137)]
    assert [r["bytes"] for r in recs if r["kind"] == "stdio" and r.get("exec_id") == "e1"
            and r["stream"] == "stdout" and r["phase"] == "end"] == [4]
    topics = [r["topic"] for r in recs if r["kind"] == "event"]
    assert is_subsequence(["/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"], topics), topics
