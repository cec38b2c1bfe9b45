"""Checkpoint/restore through runc and criu. On hosts where criu cannot work (`criu check` fails,
as on the test machines' kernel) a checkpoint must fail with a clear error and leave the task
running and usable; where criu works, a checkpointed task restores and runs on."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from e2e.tasks import remove, run_detached


def criu_works():
    criu = shutil.which("criu")
    return criu is not None and subprocess.run([criu, "check"], check=False, capture_output=True,
                                                timeout=60).returncode == 0


# The count is renamed into place: `echo > /tmp/count` truncates first, and a reader may see
# the file empty in between. The first count is written before any child process starts.
COUNTER = ["sh", "-c", "echo started > /tmp/state; echo 0 > /tmp/count; i=0; while :; do i=$((i+1)); "
           "echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done"]


@pytest.mark.skipif(criu_works(), reason="criu works on this host: the failure path is not reachable")
def test_failed_checkpoint_leaves_the_task_running(containerd, ctr, cid):
    pid = run_detached(containerd, ctr, cid, *COUNTER)
    try:
        containerd.wait_task_pids(cid, 2)  # the shell and a child: both files are written
        result = ctr("task", "checkpoint", cid)
        assert result.rc == 1 and result.stdout == ""
        assert result.stderr.startswith("ctr: ") and "criu" in result.stderr, result.stderr
        # The error names criu's log, and the log is there to read (until the task is deleted).
        logs = re.findall(r"/\S+?\.log\b", result.stderr)
        assert logs, f"no log named in {result.stderr!r}"
        for log in logs:
            assert Path(log).is_file() and Path(log).stat().st_size > 0, f"{log} named in the error is not there"

        # The task is as it was: running, its init and files intact, and it still works.
        assert containerd.tasks()[cid] == (pid, "RUNNING")
        assert pid in containerd.task_pids(cid)
        result = ctr("task", "exec", "--exec-id", "after", cid, "sh", "-c", "cat /tmp/state; cat /tmp/count")
        assert result.rc == 0 and result.stdout.startswith("started\n"), result
        count = int(result.stdout.split()[1])
        result = ctr("task", "exec", "--exec-id", "later", cid, "sh", "-c", "sleep 0.2; cat /tmp/count")
        assert int(result.stdout) > count  # still counting: not left frozen or stopped
    finally:
        remove(containerd, ctr, cid)


@pytest.mark.skipif(not criu_works(), reason="`criu check` fails on this host (criu cannot checkpoint here)")
def test_checkpoint_and_restore(containerd, ctr, cid):
    ref = f"checkpoint/{cid}:1"
    run_detached(containerd, ctr, cid, *COUNTER)
    try:
        assert ctr("container", "checkpoint", "--task", cid, ref).rc == 0
        before = int(ctr("task", "exec", "--exec-id", "before", cid, "cat", "/tmp/count").stdout)
        remove(containerd, ctr, cid)

        result = ctr("container", "restore", "--live", cid, ref)
        assert result.rc == 0, result.stderr
        containerd.wait_task_status(cid, "RUNNING")
        result = ctr("task", "exec", "--exec-id", "after", cid, "sh", "-c", "cat /tmp/state; cat /tmp/count")
        assert result.rc == 0 and result.stdout.startswith("started\n"), result
        assert int(result.stdout.split()[1]) >= before  # the restored process kept its memory and files
    finally:
        if cid in ctr("container", "ls", "-q").stdout.split():
            remove(containerd, ctr, cid)
        ctr("images", "rm", ref)
