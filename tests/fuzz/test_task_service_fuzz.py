"""Every Task method (TaskService.methods()) called with fuzzed requests, in fuzzed sequences, over a
fake runc: a call returns its response type or raises TTRPCError with a code, never another
exception; after every call each container still answers State; and at the end every process's
exit is delivered (pending Waits return) and every container can be deleted, leaving nothing.

Unit level: runc is a Python fake (FakeRunc below) that records calls, fails when told to, and
writes pid files with pids above the kernel's pid_max, so that no real process is ever signalled.
Requests never carry stdio paths, a terminal or rootfs mounts: those touch the host, and are the
confinement tests' subject. The inputs that once crashed a method are pinned by tests at the end.
"""
import itertools
import json
import os
import subprocess
import tempfile
import threading
import time

import pytest
from google.protobuf.empty_pb2 import Empty
from hypothesis import given
from hypothesis import strategies as st

from shim.api import task_pb2
from shim.runtime.runc import RuncError
from shim.task import service as service_module
from shim.task.service import TaskService
from shim.ttrpc import Code, Context, TTRPCError

from strategies import messages

RESPONSES = {"State": task_pb2.StateResponse, "Create": task_pb2.CreateTaskResponse,
             "Start": task_pb2.StartResponse, "Delete": task_pb2.DeleteResponse,
             "Pids": task_pb2.PidsResponse, "Wait": task_pb2.WaitResponse,
             "Stats": task_pb2.StatsResponse, "Connect": task_pb2.ConnectResponse}
CTX = Context("containerd.task.v2.Task", "fuzz", {}, None)
with open("/proc/sys/kernel/pid_max") as f:
    PID_MAX = int(f.read())
_pids = itertools.count(PID_MAX + 1000)  # never a real process


class FakeRunc:
    """Stands in for shim.runtime.runc.Runc (same constructor and commands)."""

    fail_next = False  # set by the test: the next command fails like runc would
    real_pid = 0  # set by a test: the next exec gets this (real, the test's child) pid
    by_container: dict[str, list[int]] = {}  # pids handed out, per container id

    def __init__(self, reaper, config, namespace, bundle):
        self.config, self.bundle = config, bundle

    def _run(self, what):
        if FakeRunc.fail_next:
            FakeRunc.fail_next = False
            raise RuncError(f"fake runc: {what} failed")

    def _new_pid(self, cid, pid_file):
        self._run("create")
        pid = next(_pids)
        FakeRunc.by_container.setdefault(cid, []).append(pid)
        with open(pid_file, "w") as f:
            f.write(str(pid))

    def create(self, cid, pid_file, stdio, console_socket=None, running=None):
        if running:
            running()  # as Runc does once runc runs: the copy loops start
        self._new_pid(cid, pid_file)

    def exec(self, cid, process_json, pid_file, stdio, console_socket=None, running=None):
        if running:
            running()
        if FakeRunc.real_pid:
            with open(pid_file, "w") as f:
                f.write(str(FakeRunc.real_pid))
            FakeRunc.by_container.setdefault(cid, []).append(FakeRunc.real_pid)
            FakeRunc.real_pid = 0
            return
        self._new_pid(cid, pid_file)

    def restore(self, cid, image_path, work_path, pid_file, stdio, parent_path="", console_socket=None):
        self._new_pid(cid, pid_file)

    def checkpoint(self, cid, image_path, work_path, **kwargs):
        raise RuncError("fake runc: criu is not here")  # never writes anywhere

    def ps(self, cid):
        self._run("ps")
        return list(FakeRunc.by_container.get(cid, []))

    def start(self, cid): self._run("start")
    def kill(self, cid, sig, all=False): self._run("kill")
    def delete(self, cid): self._run("delete")
    def pause(self, cid): self._run("pause")
    def resume(self, cid): self._run("resume")
    def update(self, cid, resources_json): self._run("update")


class FakePublisher:
    def __init__(self):
        self.events = []

    def publish(self, topic, event):
        self.events.append((topic, event))


@pytest.fixture(scope="module")
def world():
    """One TaskService for the whole module (its exit and OOM threads run for good); examples use
    container ids of their own, in bundles under one namespace directory."""
    patch = pytest.MonkeyPatch()
    patch.setattr(service_module, "Runc", FakeRunc)
    with tempfile.TemporaryDirectory(prefix="pyshim-fuzz-") as ns:
        service = TaskService("fuzz", os.path.join(ns, "shim"), FakePublisher(), lambda: None)
        service.start()
        yield ns, service, itertools.count()
    patch.undo()


def make_bundle(ns, cid):
    path = os.path.join(ns, cid)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"ociVersion": "1.0.2", "linux": {"namespaces": [{"type": "pid"}]}}, f)
    return path


def call(service, method, request):
    """(result, thread): a call that blocks (Wait on a live process) is left in its thread;
    others get 5 s (they never take that long unless they hang)."""
    handler = dict(service.methods())[method][1]
    result = {}

    def run():
        try:
            result["response"] = handler(request, CTX)
        except BaseException as exc:  # noqa: BLE001 (what escapes is what the test looks at)
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(0.05 if method == "Wait" else 5.0)
    return result, thread


def check_outcome(method, request, result):
    if "error" in result:
        exc = result["error"]
        assert isinstance(exc, TTRPCError), f"{method}({request!r}) raised {exc!r}"
        assert exc.code != Code.OK and exc.message
    else:
        want = RESPONSES.get(method, Empty)
        assert isinstance(result["response"], want), f"{method} returned {result['response']!r}"


def request_for(draw, method, req_type, ids, bundles):
    """A fuzzed request for `method`: ids mostly from the example's own, bundles mostly real."""
    some_id = st.one_of(st.sampled_from(ids), st.text(max_size=6))
    overrides = {
        "id": some_id,
        "exec_id": st.one_of(st.sampled_from(["", "", "e1", "e2"]), st.text(max_size=4)),
        "bundle": st.one_of(st.sampled_from(bundles), st.text(max_size=20)),
        # host-touching fields: left unset (see the module docstring)
        "stdin": st.none(), "stdout": st.none(), "stderr": st.none(), "terminal": st.none(),
        "rootfs": st.none(), "checkpoint": st.none(), "parent_checkpoint": st.none(),
        "path": st.none(), "work_path": st.none(),
    }
    if method == "Checkpoint":
        overrides["options"] = st.none()  # its option paths go to criu: see the tests at the end
    return draw(messages(req_type, overrides=overrides))


@given(data=st.data())
def test_task_methods_on_fuzzed_requests_fail_only_with_ttrpc_errors(world, data):
    ns, service, counter = world
    n = next(counter)
    ids = [f"c{n}", f"d{n}", ""]
    bundles = [make_bundle(ns, ids[0]), make_bundle(ns, ids[1])]
    table = {name: req_type for name, (req_type, _) in service.methods().items()}
    waits = []
    if data.draw(st.booleans(), label="start with a running container"):
        for method, req in (("Create", task_pb2.CreateTaskRequest(id=ids[0], bundle=bundles[0])),
                            ("Start", task_pb2.StartRequest(id=ids[0]))):
            result, _ = call(service, method, req)
            check_outcome(method, req, result)
    for _ in range(data.draw(st.integers(1, 12), label="calls")):
        method = data.draw(st.sampled_from(sorted(table)), label="method")
        request = request_for(data.draw, method, table[method], ids, bundles)
        FakeRunc.fail_next = data.draw(st.integers(0, 9), label="runc fails") == 0
        result, thread = call(service, method, request)
        FakeRunc.fail_next = False
        if thread.is_alive():
            assert method == "Wait", f"{method}({request!r}) did not return"
            waits.append(thread)
        else:
            check_outcome(method, request, result)
        # no corruption: every container the service holds still answers State
        for cid in list(service.containers):
            result, _ = call(service, "State", task_pb2.StateRequest(id=cid))
            check_outcome("State", cid, result)

    # The end of the example: every process exits, every Wait returns, everything is deleted.
    for cid in ids[:2]:
        for pid in FakeRunc.by_container.pop(cid, []):
            service._exit_queued(pid, 137, time.time())  # as the reaper reports an exit
    for thread in waits:
        thread.join(5)
        assert not thread.is_alive(), "a Wait was not released by the exit"
    for cid in ids[:2]:
        container = service.containers.get(cid)
        if container is None:
            continue
        deadline = time.monotonic() + 5
        for exec_id in [*container.execs, ""]:  # the execs, then the init
            while True:
                result, _ = call(service, "Delete", task_pb2.DeleteRequest(id=cid, exec_id=exec_id))
                if "response" in result or time.monotonic() > deadline:
                    break
                time.sleep(0.02)  # exits are processed on the service's exit thread
            assert "response" in result, f"delete {cid} exec {exec_id!r}: {result}"
        result, _ = call(service, "State", task_pb2.StateRequest(id=cid))
        assert isinstance(result.get("error"), TTRPCError) and result["error"].code == Code.NOT_FOUND


# -- crash bugs the fuzzer found (in shim/task/service.py) --------------------------------------


def _running_exec(world):
    ns, service, counter = world
    n = next(counter)
    cid = f"x{n}"
    bundle = make_bundle(ns, cid)
    for method, req in (("Create", task_pb2.CreateTaskRequest(id=cid, bundle=bundle)),
                        ("Start", task_pb2.StartRequest(id=cid)),
                        ("Exec", task_pb2.ExecProcessRequest(id=cid, exec_id="e1")),
                        ("Start", task_pb2.StartRequest(id=cid, exec_id="e1"))):
        result, _ = call(service, method, req)
        assert "response" in result, (method, result)
    return service, cid


def _clean_up(service, cid):
    for pid in FakeRunc.by_container.pop(cid, []):
        service._exit_queued(pid, 137, time.time())
    deadline = time.monotonic() + 5
    for exec_id in ("e1", ""):
        while time.monotonic() < deadline:
            result, _ = call(service, "Delete", task_pb2.DeleteRequest(id=cid, exec_id=exec_id))
            if "response" in result:
                break
            time.sleep(0.02)


@pytest.mark.parametrize("signal", [100, 4294967295])
def test_kill_of_an_exec_with_an_invalid_signal(world, signal):
    child = subprocess.Popen(["sleep", "30"])  # the exec's process: os.kill needs a real one
    FakeRunc.real_pid = child.pid
    try:
        service, cid = _running_exec(world)
        try:
            req = task_pb2.KillRequest(id=cid, exec_id="e1", signal=signal)
            result, _ = call(service, "Kill", req)
            check_outcome("Kill", req, result)
        finally:
            _clean_up(service, cid)
    finally:
        FakeRunc.real_pid = 0
        child.kill()
        child.wait()


def test_exec_with_a_deeply_nested_spec(world):
    service, cid = _running_exec(world)
    try:
        from google.protobuf.any_pb2 import Any
        req = task_pb2.ExecProcessRequest(id=cid, exec_id="deep", spec=Any(value=b"[" * 100000))
        result, _ = call(service, "Exec", req)
        check_outcome("Exec", req, result)
    finally:
        _clean_up(service, cid)


def test_checkpoint_with_undecodable_options(world):
    service, cid = _running_exec(world)
    try:
        from google.protobuf.any_pb2 import Any
        req = task_pb2.CheckpointTaskRequest(
            id=cid, path="/nonexistent",
            options=Any(type_url="containerd.runc.v1.CheckpointOptions", value=b"\x0a\xff\xff\xff\xff\x0f"))
        result, _ = call(service, "Checkpoint", req)
        check_outcome("Checkpoint", req, result)
    finally:
        _clean_up(service, cid)
