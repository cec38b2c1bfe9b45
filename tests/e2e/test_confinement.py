"""Hostile requests sent straight to a running shim over ttrpc (as a local client with access to
its socket could): stdio that names a regular file, a bundle reached through `..`, mount targets
that climb out of the rootfs. pyshim refuses each with InvalidArgument and a message that starts
with the field's name (shim/task/confine.py), before it opens, writes or mounts anything.

With PYSHIM_TEST_RUNTIME=io.containerd.runc.v2 the same requests show what containerd's shim does:
where it accepts one (and, for stdio, writes or reads the named file) the test is an expected
failure saying so. Every test is leak-checked afterwards (the `ctr` fixture), and the files and
directories a request names are checked to be untouched.
"""
import json
import os
import threading

import pytest
from google.protobuf.any_pb2 import Any

from e2e.shimapi import PYSHIM, ShimClient
from e2e.shims import bundle
from e2e.tasks import fifo_dir, remove
from private_containerd import mounts_under
from shim.api import task_pb2
from shim.api.mount_pb2 import Mount
from shim.ttrpc import Code, TTRPCError

PROCESS_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Process"


def sleeper_spec(containerd, cid, args):
    """The container's own process spec (from its bundle) with other arguments."""
    process = json.loads((bundle(containerd, cid) / "config.json").read_text())["process"]
    process["args"] = args
    process["terminal"] = False
    return process


def exec_request(cid, exec_id, process, stdin="", stdout="", stderr=""):
    return task_pb2.ExecProcessRequest(id=cid, exec_id=exec_id, stdin=stdin, stdout=stdout, stderr=stderr,
                                       spec=Any(type_url=PROCESS_TYPE, value=json.dumps(process).encode()))


@pytest.fixture
def sleeper(containerd, ctr, cid):
    run = ctr("run", "-d", "--fifo-dir", fifo_dir(containerd), "--runtime", containerd.runtime, containerd.image,
              cid, "sleep", "100000")
    assert run.rc == 0, run.stderr
    containerd.wait_task_status(cid, "RUNNING")
    yield cid
    remove(containerd, ctr, cid)


def refusal(call, field):
    """The TTRPCError of `call()`, which must be InvalidArgument naming `field`; None if it
    was accepted."""
    try:
        call()
    except TTRPCError as e:
        return e
    return None


def judge(containerd, error, field, accepted_does):
    """pyshim refuses with InvalidArgument naming the field; for another runtime, record what
    it did instead as an expected failure."""
    if containerd.runtime != PYSHIM and (error is None or error.code != Code.INVALID_ARGUMENT):
        what = "accepts it" if error is None else f"answers {error.code.name}: {error.message}"
        pytest.xfail(f"{containerd.runtime} {what}{accepted_does if error is None else ''}")
    assert error is not None, "accepted"
    assert error.code == Code.INVALID_ARGUMENT and error.message.startswith(f"{field} "), error


def run_exec(shim, cid, exec_id):
    """Start an accepted exec, wait for it and delete it (for a runtime that accepted it)."""
    try:
        shim.call("Start", task_pb2.StartRequest(id=cid, exec_id=exec_id))
        shim.call("Wait", task_pb2.WaitRequest(id=cid, exec_id=exec_id))
    finally:
        try:
            shim.call("Delete", task_pb2.DeleteRequest(id=cid, exec_id=exec_id))
        except TTRPCError:
            pass


def test_exec_stdout_naming_a_regular_file(containerd, sleeper, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("original\n")
    with ShimClient(containerd, sleeper) as shim:
        request = exec_request(sleeper, "to-file", sleeper_spec(containerd, sleeper, ["echo", "overwritten"]),
                               stdout=str(victim))
        error = refusal(lambda: shim.call("Exec", request), "stdout")
        if error is None:
            run_exec(shim, sleeper, "to-file")
    written = victim.read_text()
    judge(containerd, error, "stdout", f", and writes the exec's output into the file: {written!r}")
    assert written == "original\n"


def test_exec_stdin_naming_a_regular_file(containerd, sleeper, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    out = tmp_path / "out"
    os.mkfifo(out)
    reader = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    got = []
    with ShimClient(containerd, sleeper) as shim:
        request = exec_request(sleeper, "from-file", sleeper_spec(containerd, sleeper, ["cat"]),
                               stdin=str(secret), stdout=str(out))
        error = refusal(lambda: shim.call("Exec", request), "stdin")
        if error is None:
            thread = threading.Thread(target=lambda: got.append(_read_all(reader)), daemon=True)
            run_exec(shim, sleeper, "from-file")
            thread.start()
            thread.join(5)
    os.close(reader)
    judge(containerd, error, "stdin", f", and feeds the file to the container: it read {got!r}")


def _read_all(fd):
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def test_exec_stdout_naming_a_device(containerd, sleeper):
    with ShimClient(containerd, sleeper) as shim:
        request = exec_request(sleeper, "to-dev", sleeper_spec(containerd, sleeper, ["true"]), stdout="/dev/null")
        error = refusal(lambda: shim.call("Exec", request), "stdout")
        if error is None:
            run_exec(shim, sleeper, "to-dev")
    judge(containerd, error, "stdout", " (opens the character device for writing)")


@pytest.mark.parametrize("case", ["dotdot", "elsewhere"])
def test_create_with_a_bundle_outside_the_state_dir(containerd, sleeper, tmp_path, case):
    new = containerd.new_id("hostile-bundle")
    if case == "dotdot":
        path = f"{bundle(containerd, sleeper)}/../{new}"
        made = bundle(containerd, new)
    else:
        path = str(tmp_path / new)
        made = tmp_path / new
    made.mkdir()
    try:
        with ShimClient(containerd, sleeper) as shim:
            error = refusal(lambda: shim.call("Create", task_pb2.CreateTaskRequest(id=new, bundle=path)), "bundle")
        judge(containerd, error, "bundle", "")
        assert sorted(os.listdir(made)) == [], "the shim wrote into the bundle it refused"
    finally:
        for entry in made.iterdir():
            entry.unlink()
        made.rmdir()


@pytest.mark.parametrize("target", ["../../../../escape", "sub/../../escape"])
def test_create_with_a_mount_target_outside_the_rootfs(containerd, sleeper, tmp_path, target):
    """A bind mount whose target climbs out of the new container's rootfs (containerd 2.x mounts
    carry a target): refused, and nothing is mounted anywhere below the test's directories."""
    new = containerd.new_id("hostile-mount")
    made = bundle(containerd, new)
    made.mkdir()
    source = tmp_path / "source"
    source.mkdir()
    try:
        with ShimClient(containerd, sleeper) as shim:
            request = task_pb2.CreateTaskRequest(id=new, bundle=str(made), rootfs=[
                Mount(type="bind", source=str(source), target=target, options=["rbind", "ro"])])
            error = refusal(lambda: shim.call("Create", request), "rootfs[0].target")
        assert mounts_under(containerd.state) == [m for m in mounts_under(containerd.state)
                                                  if not m.startswith(str(made))], "left a mount"
        judge(containerd, error, "rootfs[0].target", "")
    finally:
        for point in mounts_under(made):
            os.system(f"umount -l {point}")  # noqa: S605 (a path of ours)
        for entry in sorted(made.rglob("*"), reverse=True):
            entry.rmdir() if entry.is_dir() else entry.unlink()
        made.rmdir()
