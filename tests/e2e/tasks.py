"""Small helpers for tests that work on a detached task (`ctr run -d`) with `ctr task ...`."""
import subprocess
from pathlib import Path

import pytest

from e2e.shimapi import PYSHIM


def xfail_unless_pyshim(containerd, flaw):
    """For a known flaw of containerd-shim-runc-v2 (test-machine.md: it loses output now and then):
    the expectation stands for pyshim, and with another runtime a miss is an expected failure."""
    if containerd.runtime != PYSHIM:
        pytest.xfail(f"{containerd.runtime} {flaw}")


def fifo_dir(containerd):
    """`--fifo-dir` for detached ctr commands: `ctr run -d` and `ctr task exec -d` leave their
    FIFOs behind, and this directory goes with the session's."""
    path = containerd.workdir / "fifo"
    path.mkdir(exist_ok=True)
    return str(path)


def run_detached(containerd, ctr, cid, *command, options=()):
    """`ctr run -d` the busybox image as `cid`; wait until the task is RUNNING; its pid."""
    result = ctr("run", "-d", "--fifo-dir", fifo_dir(containerd), *options, "--runtime", containerd.runtime,
                 containerd.image, cid, *command)
    assert (result.rc, result.stdout) == (0, ""), result.stderr
    return containerd.wait_task_status(cid, "RUNNING")


def remove(containerd, ctr, cid):
    """SIGKILL the task (if it still runs), delete it and the container; fail if any step fails."""
    tasks = containerd.tasks()
    if cid in tasks:
        if tasks[cid][1] != "STOPPED":
            ctr("task", "kill", "--all", "--signal", "SIGKILL", cid)
            containerd.wait_task_status(cid, "STOPPED")
        result = ctr("task", "rm", cid)
        assert result.rc == 0, result.stderr
    result = ctr("container", "rm", cid)
    assert result.rc == 0, result.stderr


def exec_popen(containerd, cid, exec_id, *command, options=(), **popen_kwargs):
    """`ctr task exec --exec-id EXEC_ID CID COMMAND...` started in the background."""
    return containerd.ctr_popen("task", "exec", *options, "--exec-id", exec_id, cid, *command, **popen_kwargs)


def finish(proc, timeout=60.0):
    """(rc, stdout, stderr) of a ctr started with ctr_popen (text); it is killed if it hangs."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"ctr {proc.args[5:]} still running after {timeout}s; output {out!r} {err!r}") from None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def cgroup_dir(pid, controller):
    """The directory of a process's cgroup for a v1 controller ("memory", "freezer", ...), or its
    cgroup v2 directory on a unified host."""
    unified = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if unified and controllers == "":
            return Path("/sys/fs/cgroup" + path)
        if controller in controllers.split(","):
            return Path(f"/sys/fs/cgroup/{controllers}{path}")
    raise AssertionError(f"pid {pid} has no {controller} cgroup")
