"""The tracing proxy (`io.containerd.pyshimproxy.v1`) in front of containerd's own shim.

A containerd of this module's own runs with PYSHIM_TRACE in its environment (the proxy's
trace switch), and PYSHIM_PROXY_TARGET naming containerd's own runc-v2 by its path. Every test is
leak-checked afterwards, including the proxy's own processes and sockets.
"""
import json
import os
import shutil
import signal
import time

import pytest

from e2e import harness
from e2e.shims import alive, bundle, shim_address, wait_until
from shim.binary.address import is_live

PROXY = "io.containerd.pyshimproxy.v1"
RUNC = "io.containerd.runc.v2"


class TracedContainerd(harness.TestContainerd):
    """The session's kind of containerd, with PYSHIM_TRACE set for its shims."""

    __test__ = False

    @property
    def trace_path(self):
        return self.workdir / "trace.jsonl"

    @property
    def trace_dir(self):
        """Where io.pyshim.trace may write (owner-only, as the annotation's confinement wants)."""
        path = self.workdir / "traces"
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    @property
    def runc_shim(self):
        """containerd's own runc-v2 (the one it would run), named to the proxy by path."""
        return shutil.which("containerd-shim-runc-v2", path=super().environ()["PATH"])

    def environ(self):
        return {**super().environ(), "PYSHIM_TRACE": str(self.trace_path), "PYSHIM_TRACE_DIR": str(self.trace_dir),
                "PYSHIM_PROXY_TARGET": self.runc_shim}


@pytest.fixture(scope="module")
def traced():
    yield from harness.session_containerd(TracedContainerd, "pyshim-proxy-")


@pytest.fixture
def tctr(request, traced):
    """`ctr` on the traced containerd; afterwards the leak check, and no socket of a proxy daemon left."""
    harness.watch_log(request.node, traced)
    yield traced.ctr
    traced.check_leaks()
    sockets = {path for r in records(traced) if r["kind"] == "phase" and r["name"] == "proxy-serving"
               for path in (r["detail"]["proxy"].removeprefix("unix://"), r["detail"]["events"],
                            r["detail"]["target"].removeprefix("unix://"))}
    wait_until(lambda: not any(os.path.exists(p) for p in sockets),
               what=f"the proxy's and its targets' sockets are removed: {[p for p in sockets if os.path.exists(p)]}")


def records(traced, cid=None, kind=None):
    """The trace's records (of container `cid`, of `kind`)."""
    lines = traced.trace_path.read_text().splitlines() if traced.trace_path.exists() else []
    found = [json.loads(line) for line in lines]
    return [r for r in found if (cid is None or r.get("id") == cid) and (kind is None or r["kind"] == kind)]


def test_ctr_run_through_the_proxy_in_front_of_runc_v2(traced, tctr):
    cid = traced.new_id("proxy-echo")
    result = tctr("run", "--rm", "--runtime", PROXY, traced.image, cid, "echo", "hi")
    assert (result.rc, result.stdout) == (0, "hi\n"), result.stderr
    wait_until(lambda: any(r["method"] == "Shutdown" for r in records(traced, cid, "call")),
               what="the Shutdown call is traced")
    # In the order the calls began. ctr asks for Wait and Start at about the same time, and runc-v2
    # may even answer Wait first (records are written as calls end), so those two are not ordered.
    calls = [r["method"] for r in sorted(records(traced, cid, "call"), key=lambda r: r["ts"])]
    first = {m: calls.index(m) for m in ("Create", "Start", "Wait", "Delete", "Shutdown")}
    assert first["Create"] == 0 and max(first["Start"], first["Wait"]) < first["Delete"] < first["Shutdown"], calls
    wait_until(lambda: len(records(traced, cid, "event")) >= 4,
               what=f"four events are traced (so far {[r['topic'] for r in records(traced, cid, 'event')]})")
    topics = [r["topic"] for r in records(traced, cid, "event")]
    assert topics[:4] == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], topics
    [started] = [r for r in records(traced, cid, "phase") if r["name"] == "target-start"]
    assert started["detail"]["binary"] == traced.runc_shim and started["detail"]["exit_status"] == 0
    create = next(r for r in records(traced, cid, "call") if r["method"] == "Create")
    assert create["code"] == 0 and create["response"]["pid"] > 0 and create["duration"] > 0


def proxy_daemons(traced):
    """{pid: cmdline} of the proxy's daemons below the subreaper (each is forked by a `start`)."""
    import psutil
    found = {}
    for proc in psutil.Process(traced.process.pid).children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except psutil.NoSuchProcess:
            continue
        if any(arg.endswith("containerd-shim-pyshimproxy-v1") for arg in cmdline[:2]):
            found[proc.pid] = cmdline
    return found


def proxy_daemon_of(traced, cid):
    pids = [pid for pid, cmdline in proxy_daemons(traced).items() if cid in cmdline]
    assert len(pids) == 1, f"not one proxy daemon for {cid}: {proxy_daemons(traced)}"
    return pids[0]


def target_pid_of(traced, cid):
    """The target shim: the parent of the task's init process."""
    import psutil
    return psutil.Process(traced.tasks()[cid][0]).ppid()


def run_detached(traced, tctr, cid, *command):
    result = tctr("run", "-d", "--runtime", PROXY, traced.image, cid, *command)
    assert result.rc == 0, result.stderr
    traced.wait_task_status(cid, "RUNNING")


def remove(traced, tctr, cid):
    from e2e.shims import remove_ctr_fifos
    tctr("task", "rm", "-f", cid)
    tctr("container", "rm", cid)
    remove_ctr_fifos(cid)


SHIM_SOCKETS = "/run/containerd/s"


def dead_sockets() -> set[str]:
    """The socket files in containerd's shim socket directory that nobody listens on."""
    dead = set()
    for name in os.listdir(SHIM_SOCKETS):
        if not is_live(os.path.join(SHIM_SOCKETS, name)):
            dead.add(name)
    return dead


def test_a_killed_target_is_seen_by_containerd_and_cleaned_up(traced, tctr):
    """...with nothing left: also no socket file of the target's (runc-v2 at containerd's
    debug level listens on a second, debug socket that its own delete leaves)."""
    before = dead_sockets()
    cid = traced.new_id("proxy-target-killed")
    run_detached(traced, tctr, cid, "sleep", "1000")
    try:
        proxy, shim = proxy_daemon_of(traced, cid), target_pid_of(traced, cid)
        assert proxy != shim
        with traced.events() as events:
            os.kill(shim, signal.SIGKILL)
            assert events.wait_for("/tasks/exit", container_id=cid)["exit_status"] == 137
        wait_until(lambda: not alive(proxy), what="the proxy daemon exits after its target")
        wait_until(lambda: cid not in traced.tasks(), what="containerd forgets the task")
    finally:
        remove(traced, tctr, cid)
    assert dead_sockets() - before == set()


def test_a_killed_proxy_is_cleaned_up_by_delete(traced, tctr):
    cid = traced.new_id("proxy-killed")
    run_detached(traced, tctr, cid, "sleep", "1000")
    try:
        proxy, shim = proxy_daemon_of(traced, cid), target_pid_of(traced, cid)
        init = traced.tasks()[cid][0]
        with traced.events() as events:
            os.kill(proxy, signal.SIGKILL)
            events.wait_for("/tasks/exit", container_id=cid)
        # `delete` stopped the container in the target, and the target left with it
        wait_until(lambda: not alive(init) and not alive(shim), what="the orphaned target and its container go")
        steps = [r for r in records(traced, cid, "phase") if r["name"] == "stop-orphaned-target"]
        assert steps and "Kill: ok" in steps[-1]["detail"]["steps"], steps
    finally:
        remove(traced, tctr, cid)


def test_containerd_restart_keeps_a_container_behind_the_proxy_manageable(traced, tctr):
    cid = traced.new_id("proxy-restart")
    run_detached(traced, tctr, cid, "sleep", "1000")
    try:
        before = traced.tasks()[cid]
        proxy, shim = proxy_daemon_of(traced, cid), target_pid_of(traced, cid)
        assert shim_address(bundle(traced, cid)) == json.loads(
            (bundle(traced, cid) / "pyshimproxy.json").read_text())["proxy_address"]
        with traced.killed():
            down_since = time.monotonic()  # the trace's clock
            time.sleep(0.5)
            assert alive(proxy) and alive(shim) and alive(before[0])
        assert traced.tasks()[cid] == before
        result = tctr("task", "exec", "--exec-id", "after-restart", cid, "echo", "still here")
        assert (result.rc, result.stdout) == (0, "still here\n"), result.stderr
        with traced.events() as events:
            assert tctr("task", "kill", "-s", "KILL", cid).rc == 0
            assert events.wait_for("/tasks/exit", container_id=cid)["exit_status"] == 137
        assert tctr("task", "rm", cid).rc == 0
        wait_until(lambda: not alive(proxy) and not alive(shim), what="proxy and target exit after the task")
        reconnects = [r for r in records(traced, cid, "call") if r["method"] == "Connect" and r["ts"] > down_since]
        assert reconnects and reconnects[0]["code"] == 0, "containerd's reload Connect went through the proxy"
    finally:
        remove(traced, tctr, cid)


def test_containerds_start_failpoint_through_the_proxy(traced, tctr):
    """containerd's own failpoint value, unchanged, in front of containerd's own shim."""
    cid = traced.new_id("proxy-fp-start")
    result = tctr("run", "--rm", "--runtime", PROXY, "--annotation",
                  "io.containerd.runtime.v2.shim.failpoint.Start=1*error(please retry)",
                  traced.image, cid, "echo", "hi")
    assert result.rc != 0 and "please retry" in result.stderr, result
    remove(traced, tctr, cid)  # ctr removes its container only on success
    assert traced.tasks() == {}
    fired = records(traced, cid, "failpoint")
    assert [(r["point"], r["action"], r["arg"]) for r in fired] == [("Start", "error", "please retry")]
    again = tctr("run", "--rm", "--runtime", PROXY, traced.image, cid, "echo", "hi")  # the same id again
    assert (again.rc, again.stdout) == (0, "hi\n"), again.stderr


def test_a_malformed_failpoint_is_refused_at_create(traced, tctr):
    cid = traced.new_id("proxy-fp-bad")
    key = "io.pyshimproxy.failpoint.Start"
    result = tctr("run", "--rm", "--runtime", PROXY, "--annotation", f"{key}=1*explode",
                  traced.image, cid, "echo", "hi")
    assert result.rc != 0 and key in result.stderr, result
    remove(traced, tctr, cid)


def test_a_target_killed_right_after_create_through_the_proxy(traced, tctr):
    """`Create.after=1*kill`: the target shim dies as soon as Create's reply went out."""
    cid = traced.new_id("proxy-fp-kill")
    result = tctr("run", "-d", "--runtime", PROXY, "--annotation", "io.pyshimproxy.failpoint.Create.after=1*kill",
                  traced.image, cid, "sleep", "1000")
    try:
        assert result.rc != 0, result
        wait_until(lambda: cid not in traced.tasks(), what="containerd reports the task gone")
        calls = records(traced, cid, "call")
        create = next(r for r in calls if r["method"] == "Create")
        assert create["code"] == 0 and create["response"]["pid"] > 0
        fired = records(traced, cid, "failpoint")
        assert [(r["point"], r["action"]) for r in fired] == [("Create.after", "kill")]
        wait_until(lambda: [r for r in records(traced, cid, "phase") if r["name"] == "target-delete"],
                   what="containerd ran the proxy's delete")
    finally:
        remove(traced, tctr, cid)


def test_the_trace_annotation_routes_a_containers_records_to_a_file_of_its_own(traced, tctr):
    cid = traced.new_id("proxy-own-trace")
    result = tctr("run", "--rm", "--runtime", PROXY, "--annotation", "io.pyshim.trace=own.jsonl",
                  traced.image, cid, "echo", "hi")
    assert (result.rc, result.stdout) == (0, "hi\n"), result.stderr
    own = traced.trace_dir / "own.jsonl"
    wait_until(lambda: own.exists() and '"Shutdown"' in own.read_text(), what="the container's own trace")
    mine = [json.loads(line) for line in own.read_text().splitlines()]
    assert {r["id"] for r in mine if r["kind"] == "call"} == {cid}
    assert [r["method"] for r in mine if r["kind"] == "call"][0] == "Create"
    assert not records(traced, cid, "call"), "its calls went to the default trace too"
    escaping = traced.new_id("proxy-bad-trace")
    bad = tctr("run", "--rm", "--runtime", PROXY, "--annotation", "io.pyshim.trace=../escape",
               traced.image, escaping, "echo", "hi")
    assert bad.rc != 0 and "io.pyshim.trace" in bad.stderr, bad
    remove(traced, tctr, escaping)
