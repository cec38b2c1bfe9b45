"""The process lifecycle: pause and resume, and every request a state does not allow.

Illegal requests go to the shim directly (shimapi.py) so that the test sees the status code
itself; containerd passes it on, and `ctr` shows the message, which the tests check too.
"""
import json

import pytest
from google.protobuf.any_pb2 import Any

from e2e.shimapi import PYSHIM, ShimClient, state_error_code
from e2e.tasks import cgroup_dir, fifo_dir, remove, run_detached
from shim.api import task_pb2
from shim.api.task_types_pb2 import Status
from shim.ttrpc import Code

PROCESS_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"


def process_spec(*args):
    spec = {"args": list(args), "cwd": "/", "env": ["PATH=/bin:/sbin:/usr/bin"], "user": {"uid": 0, "gid": 0}}
    return Any(type_url=PROCESS_URL, value=json.dumps(spec).encode())


def freezer_state(pid):
    """The container's freezer state from its cgroup: FROZEN or THAWED (v1), or the same from v2's
    cgroup.freeze."""
    cgroup = cgroup_dir(pid, "freezer")
    if (cgroup / "freezer.state").exists():
        return (cgroup / "freezer.state").read_text().strip()
    return {"1": "FROZEN", "0": "THAWED"}[(cgroup / "cgroup.freeze").read_text().strip()]


def check_refusals(shim, cases):
    """Each case: (what, method, request, code, words the message must contain). All failures at once."""
    wrong = {}
    for what, method, request, code, words in cases:
        try:
            error = shim.error(method, request)
        except AssertionError as e:
            wrong[what] = str(e)
            continue
        if error.code != code or not all(w in error.message for w in words):
            wrong[what] = f"{error.code.name} {error.message!r}, expected {code.name} naming {words}"
    assert not wrong, wrong


@pytest.fixture
def sleeper(containerd, ctr, cid):
    pid = run_detached(containerd, ctr, cid, "sleep", "1000")
    yield cid, pid
    remove(containerd, ctr, cid)


def test_pause_and_resume(containerd, ctr, sleeper):
    cid, pid = sleeper
    assert ctr("task", "exec", "--detach", "--fifo-dir", fifo_dir(containerd), "--exec-id", "side", cid,
               "sleep", "1000").rc == 0
    with containerd.events() as events:
        assert ctr("task", "pause", cid) == (0, "", "")
        events.wait_for("/tasks/paused", container_id=cid)
        assert containerd.tasks()[cid] == (pid, "PAUSED")
        assert freezer_state(pid) == "FROZEN"
        with ShimClient(containerd, cid) as shim:
            assert shim.call("State", task_pb2.StateRequest(id=cid)).status == Status.PAUSED
            # an exec is frozen with its container, and says so
            assert shim.call("State", task_pb2.StateRequest(id=cid, exec_id="side")).status == Status.PAUSED
        result = ctr("task", "exec", "--exec-id", "while-paused", cid, "true")
        assert result.rc != 0 and "paused" in result.stderr, result

        assert ctr("task", "resume", cid) == (0, "", "")
        events.wait_for("/tasks/resumed", container_id=cid)
    assert containerd.tasks()[cid] == (pid, "RUNNING")
    assert freezer_state(pid) == "THAWED"
    with ShimClient(containerd, cid) as shim:
        assert shim.call("State", task_pb2.StateRequest(id=cid, exec_id="side")).status == Status.RUNNING
    assert ctr("task", "exec", "--exec-id", "after-resume", cid, "echo", "awake") == (0, "awake\n", "")


def test_refusals_of_a_running_task(containerd, sleeper):
    cid, _ = sleeper
    refused = state_error_code(containerd)
    with ShimClient(containerd, cid) as shim:
        shim.call("Exec", task_pb2.ExecProcessRequest(id=cid, exec_id="created", spec=process_spec("true")))
        cases = [
            ("start twice", "Start", task_pb2.StartRequest(id=cid), refused, ["running"]),
            ("resume a running task", "Resume", task_pb2.ResumeRequest(id=cid), refused, ["running"]),
            ("delete a running task", "Delete", task_pb2.DeleteRequest(id=cid), refused, ["running"]),
            ("exec id taken", "Exec", task_pb2.ExecProcessRequest(id=cid, exec_id="created", spec=process_spec("true")),
             Code.ALREADY_EXISTS, ["created"]),
            ("signal an exec not started", "Kill", task_pb2.KillRequest(id=cid, exec_id="created", signal=9),
             Code.FAILED_PRECONDITION, ["not created"]),
            ("unknown exec", "State", task_pb2.StateRequest(id=cid, exec_id="nosuch"), Code.NOT_FOUND, ["nosuch"]),
        ]
        if containerd.runtime == PYSHIM:
            # containerd-shim-runc-v2 (1.6) serves one container and ignores the id it is asked about
            cases.append(("unknown container", "State", task_pb2.StateRequest(id="nosuch"), Code.NOT_FOUND, ["nosuch"]))
        check_refusals(shim, cases)
        shim.call("Delete", task_pb2.DeleteRequest(id=cid, exec_id="created"))  # a created exec may go
        assert shim.error("State", task_pb2.StateRequest(id=cid, exec_id="created")).code == Code.NOT_FOUND
        assert shim.call("State", task_pb2.StateRequest(id=cid)).status == Status.RUNNING


def test_refusals_of_a_paused_task(containerd, ctr, sleeper):
    cid, _ = sleeper
    refused = state_error_code(containerd)
    assert ctr("task", "pause", cid).rc == 0
    try:
        with ShimClient(containerd, cid) as shim:
            check_refusals(shim, [
                ("exec", "Exec", task_pb2.ExecProcessRequest(id=cid, exec_id="e", spec=process_spec("true")),
                 refused, ["paused"]),
                ("pause twice", "Pause", task_pb2.PauseRequest(id=cid), refused, ["paused"]),
                ("start", "Start", task_pb2.StartRequest(id=cid), refused, ["paused"]),
                ("delete", "Delete", task_pb2.DeleteRequest(id=cid), refused, ["paused"]),
            ])
            assert shim.call("State", task_pb2.StateRequest(id=cid)).status == Status.PAUSED
    finally:
        assert ctr("task", "resume", cid).rc == 0  # SIGKILL does not end a frozen task


def test_refusals_of_a_stopped_task(containerd, ctr, cid):
    refused = state_error_code(containerd)
    with containerd.events() as events:
        result = ctr("run", "-d", "--fifo-dir", fifo_dir(containerd), "--runtime", containerd.runtime,
                     containerd.image, cid, "sh", "-c", "exit 3")
        assert result.rc == 0, result.stderr
        events.wait_for("/tasks/exit", container_id=cid, id=cid)
    try:
        with ShimClient(containerd, cid) as shim:
            memory = Any(type_url=RESOURCES_URL, value=json.dumps({"memory": {"limit": 1 << 26}}).encode())
            check_refusals(shim, [
                ("pause", "Pause", task_pb2.PauseRequest(id=cid), refused, ["stopped"]),
                ("resume", "Resume", task_pb2.ResumeRequest(id=cid), refused, ["stopped"]),
                ("start", "Start", task_pb2.StartRequest(id=cid), refused, ["stopped"]),
                ("exec", "Exec", task_pb2.ExecProcessRequest(id=cid, exec_id="e", spec=process_spec("true")),
                 refused, ["stopped"]),
                ("update", "Update", task_pb2.UpdateTaskRequest(id=cid, resources=memory), refused, ["stopped"]),
                ("checkpoint", "Checkpoint", task_pb2.CheckpointTaskRequest(id=cid, path="/tmp/never"),
                 refused, ["stopped"]),
                ("signal", "Kill", task_pb2.KillRequest(id=cid, signal=9), Code.NOT_FOUND, ["finished"]),
            ])
            state = shim.call("State", task_pb2.StateRequest(id=cid))
            assert (state.status, state.exit_status) == (Status.STOPPED, 3)

        # What a user sees: ctr shows the shim's message.
        result = ctr("task", "pause", cid)
        assert result.rc == 1 and "stopped" in result.stderr, result
        result = ctr("task", "exec", "--exec-id", "late", cid, "true")
        assert result.rc == 1 and "stopped" in result.stderr, result
    finally:
        assert ctr("task", "rm", cid).rc == 0
        assert ctr("container", "rm", cid).rc == 0
