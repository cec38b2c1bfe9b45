"""The task service's exit protocol, without containerd or runc: a fake runc writes pid
files, and the test plays the reaper by queueing exits the way the real one does.

- an exit that happens before `runc create`/`runc exec` returns is delivered, after the
  create or exec-started event;
- an init that exits while an exec runs is reported last;
- deleting execs while the init exits never loses the init's exit (the exec table's lock).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Iterator

import pytest

from shim.api import task_pb2 as pb
from shim.task import service as service_module
from shim.task.service import TaskService
from shim.ttrpc import Code, Context, TTRPCError

ROUNDS = int(os.environ.get("PYSHIM_RACE_ROUNDS", "10"))
CTX = Context("containerd.task.v2.Task", "", {}, None)  # what the server hands a handler
FAKE_PID = 4_000_000  # beyond pid_max: no real process is ever signalled


class Recorder:
    """The events publisher: records (topic, event) in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def publish(self, topic: str, event: object) -> None:
        with self.lock:
            self.events.append((topic, event))

    def topics(self, **match: object) -> list[str]:
        with self.lock:
            return [t for t, e in self.events
                    if all(getattr(e, k, None) == v for k, v in match.items())]


class FakeRunc:
    """Writes the pid files runc would write; `on_launch(pid)` runs before it returns."""

    next_pid = FAKE_PID
    on_launch: object = None

    def __init__(self, reaper: object, config: object, namespace: str, bundle: str) -> None:
        self.config = config

    def _launch(self, pid_file: str) -> None:
        FakeRunc.next_pid += 1
        with open(pid_file, "w") as f:
            f.write(str(FakeRunc.next_pid))
        if callable(FakeRunc.on_launch):
            FakeRunc.on_launch(FakeRunc.next_pid)

    def create(self, cid: str, pid_file: str, stdio: object, console: object, running=None) -> None:
        if running:
            running()  # as Runc does once runc runs: the copy loops start
        self._launch(pid_file)

    def exec(self, cid: str, spec: str, pid_file: str, stdio: object, console: object,
             running=None) -> None:
        if running:
            running()
        self._launch(pid_file)

    def start(self, cid: str) -> None:
        pass

    def delete(self, cid: str) -> None:
        pass

    def kill(self, cid: str, sig: int, all: bool = False) -> None:
        pass


@pytest.fixture
def shim(tmp_path, monkeypatch) -> Iterator[tuple[TaskService, Recorder]]:
    monkeypatch.setattr(service_module, "Runc", FakeRunc)
    monkeypatch.setattr(FakeRunc, "on_launch", None)
    (tmp_path / "ns").mkdir()
    recorder = Recorder()
    svc = TaskService("ns", str(tmp_path / "ns" / "first"), recorder, lambda: None)  # type: ignore[arg-type]
    svc._exit_thread.start()  # the exits thread only: no reaper, no OOM watcher
    yield svc, recorder


def create(svc: TaskService, cid: str) -> int:
    bundle = os.path.join(svc.bundle_parent, cid)
    os.makedirs(bundle)
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump({"linux": {"namespaces": [{"type": "pid"}]}}, f)
    return svc.Create(pb.CreateTaskRequest(id=cid, bundle=bundle), None).pid  # type: ignore[arg-type]


def exec_started(svc: TaskService, cid: str, exec_id: str) -> int:
    svc.Exec(pb.ExecProcessRequest(id=cid, exec_id=exec_id), None)  # type: ignore[arg-type]
    return svc.Start(pb.StartRequest(id=cid, exec_id=exec_id), None).pid  # type: ignore[arg-type]


def wait(svc: TaskService, cid: str, exec_id: str = "", timeout: float = 5.0) -> int:
    """Wait's exit status, or a test failure if Wait would hang."""
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(
        svc.Wait(pb.WaitRequest(id=cid, exec_id=exec_id), None).exit_status), daemon=True)  # type: ignore[arg-type]
    t.start()
    t.join(timeout)
    assert result, f"Wait({cid!r}, {exec_id!r}) still blocked after {timeout}s"
    return result[0]


def exit_now(svc: TaskService, pid: int, status: int) -> None:
    svc._exit_queued(pid, status, time.time())  # what the reaper does for a container process


def test_an_init_that_exits_before_create_returns_is_delivered_after_the_create_event(shim):
    svc, events = shim

    def exits_at_once(pid: int) -> None:
        exit_now(svc, pid, 7)
        deadline = time.monotonic() + 5
        while pid not in svc._early:  # the exits thread has seen it, pid still unknown
            assert time.monotonic() < deadline
            time.sleep(0.001)

    FakeRunc.on_launch = exits_at_once
    create(svc, "c1")
    assert wait(svc, "c1") == 7
    assert events.topics(container_id="c1") == ["/tasks/create", "/tasks/exit"]
    assert not svc._early and not svc._pids  # nothing kept for a pid that may be reused


def test_an_exec_that_exits_before_runc_exec_returns_is_delivered_after_exec_started(shim):
    svc, events = shim
    init_pid = create(svc, "c1")
    svc.Start(pb.StartRequest(id="c1"), None)

    FakeRunc.on_launch = lambda pid: exit_now(svc, pid, 3)
    exec_started(svc, "c1", "e1")
    assert wait(svc, "c1", "e1") == 3
    assert events.topics(container_id="c1") == [
        "/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"]
    FakeRunc.on_launch = None
    exit_now(svc, init_pid, 0)
    assert wait(svc, "c1") == 0


def test_the_init_exit_is_the_last_one_while_an_exec_runs(shim):
    svc, events = shim
    init_pid = create(svc, "c1")
    svc.Start(pb.StartRequest(id="c1"), None)
    exec_pid = exec_started(svc, "c1", "e1")

    exit_now(svc, init_pid, 137)
    time.sleep(0.05)
    state = svc.State(pb.StateRequest(id="c1"), None)
    assert "/tasks/exit" not in events.topics(container_id="c1"), "init reported before its exec"
    assert state.exit_status == 0
    with pytest.raises(Exception) as refused:  # no exec may start once the init is reaped
        exec_started(svc, "c1", "e2")
    assert "init process is stopped" in str(refused.value)

    exit_now(svc, exec_pid, 1)
    assert wait(svc, "c1") == 137
    exits = [e for t, e in events.events if t == "/tasks/exit"]
    assert [(e.id, e.exit_status) for e in exits] == [("e1", 1), ("c1", 137)]


def test_deleting_execs_while_the_init_exits_never_loses_the_init_exit(shim):
    """The exits thread reads the exec table while Delete removes execs from it: with
    the table unguarded, 'dict changed size during iteration' dropped the init's exit."""
    svc, events = shim
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: make them collide
    try:
        for round in range(ROUNDS):
            cid = f"c{round}"
            init_pid = create(svc, cid)
            svc.Start(pb.StartRequest(id=cid), None)  # type: ignore[arg-type]
            execs = [f"e{i}" for i in range(400)]
            for exec_id in execs:
                exit_now(svc, exec_started(svc, cid, exec_id), 0)
            for exec_id in execs:
                assert wait(svc, cid, exec_id) == 0
            deleting = threading.Event()

            def delete_all(cid: str = cid, execs: list[str] = execs,
                           deleting: threading.Event = deleting) -> None:
                for i, exec_id in enumerate(execs):
                    svc.Delete(pb.DeleteRequest(id=cid, exec_id=exec_id), None)  # type: ignore[arg-type]
                    if i == 20:
                        deleting.set()

            deleter = threading.Thread(target=delete_all)
            deleter.start()
            deleting.wait(5)
            exit_now(svc, init_pid, 9)  # while the deleter is in the middle of the table
            deleter.join(10)
            assert wait(svc, cid) == 9, f"round {round}: the init's exit was lost"
            assert events.topics(container_id=cid, id=cid).count("/tasks/exit") == 1
            svc.Delete(pb.DeleteRequest(id=cid), None)  # type: ignore[arg-type]
    finally:
        sys.setswitchinterval(old)


def test_requests_for_unknown_things_are_not_found_at_the_boundary(shim):
    svc, _ = shim
    methods = svc.methods()
    _, state = methods["State"]
    with pytest.raises(TTRPCError) as err:
        state(pb.StateRequest(id="nosuch"), CTX)
    assert (err.value.code, err.value.message) == (Code.NOT_FOUND, "container nosuch: not found")
    create(svc, "c1")
    with pytest.raises(TTRPCError) as err:
        state(pb.StateRequest(id="c1", exec_id="e9"), CTX)
    assert err.value.code == Code.NOT_FOUND and "exec e9 in container c1" in err.value.message


def test_a_second_create_of_one_id_already_exists(shim):
    svc, _ = shim
    create(svc, "c1")
    _, create_method = svc.methods()["Create"]
    bundle = os.path.join(svc.bundle_parent, "c1")
    with pytest.raises(TTRPCError) as err:
        create_method(pb.CreateTaskRequest(id="c1", bundle=bundle), CTX)
    assert err.value.code == Code.ALREADY_EXISTS and "c1" in err.value.message


def test_not_found_and_already_exists_are_worded_as_containerd_words_them(shim):
    """containerd 2.x passes the message on as it is: the class text must be there."""
    svc, _ = shim
    create(svc, "c1")
    svc.Start(pb.StartRequest(id="c1"), None)  # type: ignore[arg-type]
    FakeRunc.on_launch = lambda pid: exit_now(svc, pid, 0)
    exec_started(svc, "c1", "e1")
    assert wait(svc, "c1", "e1") == 0
    _, kill = svc.methods()["Kill"]
    with pytest.raises(TTRPCError) as err:
        kill(pb.KillRequest(id="c1", exec_id="e1", signal=9), CTX)
    assert (err.value.code, err.value.message) == (
        Code.NOT_FOUND, "exec e1 in container c1: process already finished: not found")
