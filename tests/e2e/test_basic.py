"""Walking skeleton: what a user of `ctr run` sees, with the runtime under test.

Every test is leak-checked afterwards (the `ctr` fixture): no shim, runc or container process,
no bundle, mount, runc state or cgroup may be left.
"""
import subprocess

import pytest


def test_echo_prints_exactly_its_arguments(run):
    result = run("echo", "hello", "world")
    assert (result.rc, result.stdout, result.stderr) == (0, "hello world\n", "")


def test_exit_code_is_the_container_exit_code(run):
    result = run("sh", "-c", "exit 42")
    assert (result.rc, result.stdout) == (42, ""), result.stderr


@pytest.mark.parametrize("data", [b"hello from stdin\n", bytes(range(256)) * 4096], ids=["line", "1MiB"])
def test_stdin_comes_back_out(containerd, ctr, cid, data):
    # ctr closes the container's stdin only if its own stdin reaches EOF after the task exists
    # (test-machine.md), so the input goes in through a pipe once the task is running.
    proc = containerd.ctr_popen("run", "--rm", "--runtime", containerd.runtime, containerd.image, cid, "cat",
                                stdin=subprocess.PIPE)
    try:
        containerd.wait_task_status(cid, "RUNNING", proc=proc)
        out, err = proc.communicate(data, timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert out == data


# A PID-namespace init gets no signal it has no handler for, except SIGKILL (pid_namespaces(7)):
# `sleep` as init would ignore SIGTERM. The shell turns SIGTERM into exit status 143; it has set
# its trap once its `sleep` child exists (2 processes).
SLEEP_UNTIL_SIGTERM = ["sh", "-c", "trap 'exit 143' TERM; sleep 1000 & wait"]


@pytest.mark.parametrize("signal, command, processes, status", [
    ("SIGTERM", SLEEP_UNTIL_SIGTERM, 2, 143),
    ("SIGKILL", ["sleep", "1000"], 1, 137),  # killed by the signal: 128 + 9
], ids=["SIGTERM", "SIGKILL"])
def test_detached_container_lifecycle(containerd, ctr, cid, signal, command, processes, status):
    result = ctr("run", "-d", "--runtime", containerd.runtime, containerd.image, cid, *command)
    assert (result.rc, result.stdout) == (0, ""), result.stderr

    pid, task_status = containerd.tasks()[cid]
    assert task_status == "RUNNING"
    pids = containerd.wait_task_pids(cid, processes)  # `ctr task ps`
    assert pid in pids

    with containerd.events() as events:
        result = ctr("task", "kill", "--signal", signal, cid)
        assert result.rc == 0, result.stderr
        exit_event = events.wait_for("/tasks/exit", container_id=cid, id=cid)
    assert exit_event.get("exit_status", 0) == status  # protobuf JSON leaves out zero values
    assert exit_event.get("pid") == pid
    assert containerd.tasks()[cid] == (pid, "STOPPED")

    assert ctr("task", "rm", cid).rc == 0
    assert cid not in containerd.tasks()
    assert ctr("container", "rm", cid).rc == 0
    assert cid not in ctr("container", "ls", "-q").stdout.split()


def test_kill_all_ends_every_process(containerd, ctr, cid):
    # The init shell ignores SIGTERM (see above); its children do not, and once they are gone
    # `wait` returns and the shell exits 0.
    command = ["sh", "-c", "sleep 1000 & sleep 1000 & sleep 1000 & wait"]
    result = ctr("run", "-d", "--runtime", containerd.runtime, containerd.image, cid, *command)
    assert result.rc == 0, result.stderr
    containerd.wait_task_pids(cid, 4)

    with containerd.events() as events:
        result = ctr("task", "kill", "--all", cid)
        assert result.rc == 0, result.stderr
        exit_event = events.wait_for("/tasks/exit", container_id=cid, id=cid)
    assert exit_event.get("exit_status", 0) == 0
    assert ctr("task", "rm", cid).rc == 0
    assert ctr("container", "rm", cid).rc == 0


def test_sequential_runs(run):
    results = [run("/bin/true") for _ in range(50)]
    failed = [r for r in results if r != (0, "", "")]
    assert not failed, f"{len(failed)} of 50 runs failed, e.g. {failed[0]}"


def test_concurrent_runs_keep_their_exit_codes(containerd, ctr):
    codes = range(1, 21)
    procs = {code: containerd.ctr_popen("run", "--rm", "--runtime", containerd.runtime, containerd.image,
                                        containerd.new_id(f"concurrent-exit-{code}"), "sh", "-c", f"exit {code}")
             for code in codes}
    results = {}
    try:
        for code, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            results[code] = (proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
    wrong = {code: r for code, r in results.items() if r[0] != code}
    assert not wrong, f"exit codes differ (expected: (rc, stdout, stderr)): {wrong}"
