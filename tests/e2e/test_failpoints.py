"""Failpoints on real containers: containerd's annotations unchanged, and pyshim's own points."""
import time

import pytest

CD = "io.containerd.runtime.v2.shim.failpoint."
PY = "io.pyshim.failpoint."


def run_with(ctr, containerd, cid, annotations, *command, detach=False):
    options = ["-d"] if detach else ["--rm"]
    for key, value in annotations.items():
        options += ["--annotation", f"{key}={value}"]
    return ctr("run", *options, "--runtime", containerd.runtime, containerd.image, cid,
               *(command or ("echo", "hi")))


def remove(ctr, cid):
    """Whatever a failed `ctr run --rm` left (ctr removes its container only on success)."""
    ctr("task", "rm", "-f", cid)
    ctr("container", "rm", cid)


def test_start_error_once_then_the_same_run_succeeds(containerd, ctr, cid):
    result = run_with(ctr, containerd, cid, {CD + "Start": "1*error(please retry)"})
    assert result.rc != 0 and "please retry" in result.stderr, result
    if containerd.major_version() >= 2:
        # ctr 2.x deletes the failed task (killing it) and then the container: nothing left.
        assert containerd.wait_for_no_leaks() == []
    else:
        # ctr 1.6 asks to delete the task, but its client refuses to delete a CREATED task
        # (any shim's: the check is client-side), so the task and container stay until
        # removed; removing them leaves nothing (the leak check covers it).
        assert containerd.tasks()[cid][1] == "CREATED"
        remove(ctr, cid)
        assert containerd.wait_for_no_leaks() == []
    # The same image and id again, without the failpoint.
    assert run_with(ctr, containerd, cid, {}) == (0, "hi\n", "")


def test_cascading_terms_let_the_first_call_through(containerd, ctr, cid):
    # The first Kill passes, the second fails.
    result = run_with(ctr, containerd, cid, {CD + "Kill": "1*off->1*error(second kill)"},
                      "sleep", "30", detach=True)
    assert result.rc == 0, result
    containerd.wait_task_status(cid, "RUNNING")
    assert ctr("task", "kill", "-s", "KILL", cid).rc == 0
    containerd.wait_task_status(cid, "STOPPED")
    second = ctr("task", "kill", "-s", "KILL", cid)
    assert second.rc != 0 and "second kill" in second.stderr, second
    assert ctr("task", "rm", cid).rc == 0
    assert ctr("container", "rm", cid).rc == 0


def test_delay_delays_by_at_least_that_much(containerd, ctr, cid):
    began = time.monotonic()
    assert run_with(ctr, containerd, cid, {CD + "Start": "1*delay(1500)"}) == (0, "hi\n", "")
    assert time.monotonic() - began >= 1.5


@pytest.mark.parametrize("key,value,detail", [
    (CD + "Start", "1*error", "needs an argument"),
    (CD + "Start", "error(x)", "expected <count>*"),
    (CD + "Strat", "1*off", "not a Task method"),
    (CD + "Start", "1*hang", "not accepted"),
    (PY + "runc.start.sometime", "1*off", "unknown failpoint"),
    (PY + "Create.after", "1*kill(soon)", "whole number"),
])
def test_malformed_failpoint_is_invalid_argument_naming_it(containerd, ctr, cid, key, value, detail):
    result = run_with(ctr, containerd, cid, {key: value})
    assert result.rc != 0 and key in result.stderr and detail in result.stderr, result
    assert "invalid argument" in result.stderr.lower()
    remove(ctr, cid)


@pytest.mark.parametrize("key,value,status", [
    (PY + "Create.after", "1*kill", "killed after Create replied"),
    (CD + "Start", "1*panic(boom)", "panicked in Start"),
])
def test_a_shim_that_dies_is_cleaned_up_by_delete(containerd, ctr, cid, key, value, status):
    result = run_with(ctr, containerd, cid, {key: value}, "sleep", "30", detach=True)
    # The next call after the shim died finds its connection closed...
    assert result.rc != 0 and "ttrpc: closed" in result.stderr, (status, result)
    # ...containerd reports the task gone (it ran `delete` when the shim disconnected)...
    assert cid not in containerd.tasks(), status
    gone = ctr("task", "rm", "-f", cid)
    assert gone.rc != 0 and "not found" in gone.stderr, (status, gone)
    # ...and removing the container leaves nothing: the leak check covers the container's
    # process, runc state, cgroups, mounts and the bundle.
    assert ctr("container", "rm", cid).rc == 0


def test_a_shim_killed_during_delete_leaves_nothing(containerd, ctr, cid):
    """SIGKILL in the middle of Delete, before `runc delete`: containerd cleans up with
    the `delete` action (runc state, mounts, bundle), the leak check proves it."""
    result = run_with(ctr, containerd, cid, {PY + "runc.delete.before": "1*kill"})
    assert result.rc != 0 and result.stdout == "hi\n" and "ttrpc: closed" in result.stderr, result
    assert cid not in containerd.tasks()
    ctr("container", "rm", cid)  # ctr --rm already removed it; nothing must be left


def test_runc_failpoint_fails_the_call_with_its_message(containerd, ctr, cid):
    result = run_with(ctr, containerd, cid, {PY + "runc.start.before": "1*error(no start today)"})
    assert result.rc != 0 and "no start today" in result.stderr, result
    remove(ctr, cid)


def test_stdio_close_after_some_bytes(containerd, ctr, cid):
    result = run_with(ctr, containerd, cid, {PY + "stdio.stdout": "1*close(3)"}, "echo", "hello")
    assert result.rc == 0 and result.stdout == "hel", result


def test_event_dup_forwards_the_exit_twice(containerd, ctr, cid):
    with containerd.events() as events:
        assert run_with(ctr, containerd, cid, {PY + "event.exit": "1*dup"}) == (0, "hi\n", "")
        events.wait_for("/tasks/delete", container_id=cid)
        exits = [data for _, topic, data in events.seen
                 if topic == "/tasks/exit" and data.get("container_id") == cid]
    assert len(exits) == 2, exits


def test_exit_delay_holds_wait_back(containerd, ctr, cid):
    began = time.monotonic()
    assert run_with(ctr, containerd, cid, {PY + "exit": "1*delay(1000)"}) == (0, "hi\n", "")
    assert time.monotonic() - began >= 1.0
