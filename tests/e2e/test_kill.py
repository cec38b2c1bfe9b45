"""`ctr task kill`: signals to the init and to execs, --all, and killing or deleting what is already
gone (an exited init, a container runc itself deleted behind the shim's back)."""
import subprocess

from e2e.shimapi import ShimClient
from e2e.tasks import exec_popen, fifo_dir, finish, remove, run_detached
from shim.api import task_pb2
from shim.ttrpc import Code


def trapping(signal, status):
    """A shell that exits with `status` on `signal` once its child exists (the trap is set before
    the child starts; a container's init only gets the signals it handles). The child, left
    behind, does not hold the shell's output open: the exit would wait for it."""
    return ["sh", "-c", f"trap 'exit {status}' {signal}; sleep 1000 >/dev/null 2>&1 & wait"]


def test_signals_reach_the_init_and_an_exec(containerd, ctr, cid):
    run_detached(containerd, ctr, cid, *trapping("USR1", 10))
    try:
        execution = exec_popen(containerd, cid, "trapper", *trapping("TERM", 12))
        containerd.wait_task_pids(cid, 4)  # both shells, both sleeps
        with containerd.events() as events:
            assert ctr("task", "kill", "--exec-id", "trapper", "--signal", "TERM", cid) == (0, "", "")
            assert finish(execution) == (12, "", "")
            assert events.wait_for("/tasks/exit", container_id=cid, id="trapper")["exit_status"] == 12
            assert containerd.tasks()[cid][1] == "RUNNING"  # the init did not get it

            assert ctr("task", "kill", "--signal", "USR1", cid) == (0, "", "")
            assert events.wait_for("/tasks/exit", container_id=cid, id=cid)["exit_status"] == 10
    finally:
        remove(containerd, ctr, cid)


def test_kill_all_reaches_execs_too(containerd, ctr, cid):
    run_detached(containerd, ctr, cid, "sleep", "1000")
    try:
        execution = exec_popen(containerd, cid, "sleeper", "sleep", "1000")
        containerd.wait_task_pids(cid, 2)
        with containerd.events() as events:
            assert ctr("task", "kill", "--all", "--signal", "SIGKILL", cid) == (0, "", "")
            assert finish(execution)[0] == 137
            assert events.wait_for("/tasks/exit", container_id=cid, id="sleeper")["exit_status"] == 137
            assert events.wait_for("/tasks/exit", container_id=cid, id=cid)["exit_status"] == 137
    finally:
        remove(containerd, ctr, cid)


def test_killing_what_already_exited_is_not_found(containerd, ctr, cid):
    run_detached(containerd, ctr, cid, "sleep", "1000")
    try:
        with containerd.events() as events:
            assert ctr("task", "exec", "--detach", "--fifo-dir", fifo_dir(containerd), "--exec-id", "quick", cid,
                       "true").rc == 0  # detached: ctr does not delete it
            events.wait_for("/tasks/exit", container_id=cid, id="quick")
            ctr("task", "kill", "--signal", "SIGKILL", cid)
            events.wait_for("/tasks/exit", container_id=cid, id=cid)

        # What a user sees: ctr reports containerd's NotFound, for the init and for the exec.
        for exec_id in ("", "quick"):
            result = ctr("task", "kill", *(["--exec-id", exec_id] if exec_id else []), cid)
            assert result.rc == 1 and result.stderr.rstrip().endswith("process already finished: not found"), result
        with ShimClient(containerd, cid) as shim:
            for exec_id in ("", "quick"):
                error = shim.error("Kill", task_pb2.KillRequest(id=cid, exec_id=exec_id, signal=15))
                assert error.code == Code.NOT_FOUND and "finished" in error.message, (exec_id, error)
    finally:
        remove(containerd, ctr, cid)


def test_deleting_a_container_runc_already_deleted(containerd, ctr, cid):
    run_detached(containerd, ctr, cid, "sleep", "1000")
    with containerd.events() as events:
        # Behind the shim's back: runc kills the container and forgets it (state and cgroup).
        runc = subprocess.run(["runc", "--root", f"/run/containerd/runc/{containerd.namespace}", "delete", "--force",
                               cid], check=False, capture_output=True, text=True, timeout=30)
        assert runc.returncode == 0, runc.stderr
        assert events.wait_for("/tasks/exit", container_id=cid, id=cid)["exit_status"] == 137
        assert containerd.tasks()[cid][1] == "STOPPED"
        assert ctr("task", "rm", cid).rc == 0
        events.wait_for("/tasks/delete", container_id=cid)
    assert ctr("container", "rm", cid) == (0, "", "")
    assert cid not in containerd.tasks()
    # and nothing is left behind: the leak check after the test
