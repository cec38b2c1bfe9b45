"""stdin: CloseIO gives a running process (init or exec) end of input; a process with no stdin runs.

(Streaming stdin through `ctr run` is in test_basic.py.)
"""
import os
import subprocess

import pytest

from e2e.shimapi import ShimClient
from e2e.tasks import exec_popen, fifo_dir, finish, remove, run_detached
from shim.api import task_pb2


def test_exec_stdin_reaches_eof_when_closed(containerd, ctr, cid):
    run_detached(containerd, ctr, cid, "sleep", "1000")
    try:
        # ctr sends CloseIO once its own stdin ends; `cat` only exits on EOF. (ctr sends nothing if
        # its stdin ends before the exec exists: the input goes in once the exec runs.)
        execution = exec_popen(containerd, cid, "reader", "sh", "-c", "cat; echo eof", stdin=subprocess.PIPE)
        try:
            containerd.wait_task_pids(cid, 3)  # sleep, sh and cat
            out, err = execution.communicate(b"line 1\nline 2\n", timeout=60)
        finally:
            execution.kill()
            execution.wait()
        assert (execution.returncode, out, err) == (0, b"line 1\nline 2\neof\n", b"")
    finally:
        remove(containerd, ctr, cid)


@pytest.mark.parametrize("process", ["init", "exec"])
def test_close_io_ends_the_input_of_a_detached_process(containerd, ctr, cid, process):
    # `ctr run -d` and `ctr task exec -d` leave when the process has started; their end of the stdin
    # FIFO closes with them, and the shim's own keeps the process reading until CloseIO.
    stdin_r, stdin_w = os.pipe()
    try:
        if process == "init":
            proc = containerd.ctr_popen("run", "-d", "--fifo-dir", fifo_dir(containerd), "--runtime",
                                        containerd.runtime, containerd.image, cid, "cat",
                                        stdin=stdin_r)
            exec_id = ""
        else:
            run_detached(containerd, ctr, cid, "sleep", "1000")
            proc = exec_popen(containerd, cid, "cat", "cat", options=["--detach", "--fifo-dir", fifo_dir(containerd)],
                              stdin=stdin_r)
            exec_id = "cat"
        assert finish(proc) == (0, "", "")
    finally:
        os.close(stdin_r)
        os.close(stdin_w)
    try:
        with containerd.events() as events:
            # ctr is gone and so is its writer; an exec round trip later `cat` still waits for input
            assert ctr("task", "exec", "--exec-id", "probe", cid, "true").rc == 0
            assert len(containerd.task_pids(cid)) == (1 if process == "init" else 2)
            with ShimClient(containerd, cid) as shim:
                shim.call("CloseIO", task_pb2.CloseIORequest(id=cid, exec_id=exec_id, stdin=True))
            exited = events.wait_for("/tasks/exit", container_id=cid, id=exec_id or cid)
        assert exited.get("exit_status", 0) == 0  # cat saw EOF and ended by itself
    finally:
        remove(containerd, ctr, cid)


def test_a_process_without_stdin_runs(containerd, ctr, cid):
    # --null-io: no stdin, stdout or stderr at all (as CRI starts most containers). `cat` reads
    # EOF at once; a broken stdin would block it or fail it.
    result = ctr("run", "--rm", "--null-io", "--runtime", containerd.runtime, containerd.image, cid,
                 "sh", "-c", "cat && [ \"$(readlink /proc/self/fd/0)\" = /dev/null ] && exit 3")
    assert result == (3, "", "")
