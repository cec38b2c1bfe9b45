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
import shutil
import subprocess
import time

import pytest
from google.protobuf.any_pb2 import Any

from e2e.harness import RUNC_V2_ROOT
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


def judge(containerd, error, field, accepted_does):
    """pyshim refuses with InvalidArgument naming the field; for another runtime, record what
    it did instead as an expected failure."""
    if containerd.runtime != PYSHIM and (error is None or error.code != Code.INVALID_ARGUMENT):
        what = "accepts it" if error is None else f"answers {error.code.name}: {error.message}"
        pytest.xfail(f"{containerd.runtime} {what}{accepted_does if error is None else ''}")
    assert error is not None, "accepted"
    assert error.code == Code.INVALID_ARGUMENT and error.message.startswith(f"{field} "), error


@pytest.fixture
def fifos(tmp_path):
    """fifo(name): a FIFO with a reader open (non-blocking), as a client would have; read(name)
    returns what was written to it so far."""
    readers = {}

    def fifo(name):
        path = tmp_path / name
        os.mkfifo(path)
        readers[name] = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        return str(path)

    def read(name):
        chunks = []
        while True:
            try:
                data = os.read(readers[name], 65536)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    fifo.read = read
    yield fifo
    for fd in readers.values():
        os.close(fd)


def try_exec(shim, cid, exec_id, request):
    """Exec; if accepted, Start, Wait and Delete it. (the Exec's TTRPCError or None, what
    happened after an accepted Exec)."""
    try:
        shim.call("Exec", request)
    except TTRPCError as e:
        return e, ""
    try:
        shim.call("Start", task_pb2.StartRequest(id=cid, exec_id=exec_id))
        status = shim.call("Wait", task_pb2.WaitRequest(id=cid, exec_id=exec_id)).exit_status
        after = f"its Start succeeded (exit status {status})"
    except TTRPCError as e:
        after = f"its Start failed: {e.code.name} {e.message}"
    try:
        shim.call("Delete", task_pb2.DeleteRequest(id=cid, exec_id=exec_id))
    except TTRPCError:
        pass
    return None, after


def test_exec_stdout_naming_a_regular_file(containerd, sleeper, tmp_path, fifos):
    victim = tmp_path / "victim"
    victim.write_text("original\n")
    with ShimClient(containerd, sleeper) as shim:
        request = exec_request(sleeper, "to-file", sleeper_spec(containerd, sleeper, ["echo", "overwritten"]),
                               stdout=str(victim), stderr=fifos("err"))
        error, after = try_exec(shim, sleeper, "to-file", request)
    written = victim.read_text()
    judge(containerd, error, "stdout", f"; {after}, and the file now holds {written!r}")
    assert written == "original\n"


def test_exec_stdin_naming_a_regular_file(containerd, sleeper, tmp_path, fifos):
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    with ShimClient(containerd, sleeper) as shim:
        request = exec_request(sleeper, "from-file", sleeper_spec(containerd, sleeper, ["cat"]),
                               stdin=str(secret), stdout=fifos("out"), stderr=fifos("err"))
        error, after = try_exec(shim, sleeper, "from-file", request)
        time.sleep(0.5)  # the copy to the FIFO
    judge(containerd, error, "stdin", f"; {after}, and the container read {fifos.read('out')!r}")


def test_exec_stdout_naming_a_device(containerd, sleeper, fifos):
    with ShimClient(containerd, sleeper) as shim:
        request = exec_request(sleeper, "to-dev", sleeper_spec(containerd, sleeper, ["echo", "to a device"]),
                               stdout="/dev/null", stderr=fifos("err"))
        error, after = try_exec(shim, sleeper, "to-dev", request)
    judge(containerd, error, "stdout", f"; {after} (it opened the character device for writing)")


@pytest.fixture
def new_bundle(containerd, sleeper):
    """make(path): a bundle at `path` that would work (the sleeper's config.json, an empty rootfs
    directory), so that a runtime that accepts a hostile Create really creates; everything it
    made is removed afterwards."""
    made = []

    def make(path):
        path.mkdir()
        (path / "rootfs").mkdir()
        shutil.copy(bundle(containerd, sleeper) / "config.json", path / "config.json")
        made.append(path)
        return path

    yield make
    for path in made:
        subprocess.run(["runc", "--root", str(RUNC_V2_ROOT / containerd.namespace), "delete", "--force", path.name],
                       capture_output=True, timeout=30)
        for point in mounts_under(path):
            subprocess.run(["umount", "-l", point], check=False)
        shutil.rmtree(path, ignore_errors=True)


def try_create(shim, request):
    """Create; if accepted, Delete it again. The Create's TTRPCError, or None."""
    try:
        shim.call("Create", request)
    except TTRPCError as e:
        return e
    try:
        shim.call("Delete", task_pb2.DeleteRequest(id=request.id))
    except TTRPCError:
        pass
    return None


@pytest.mark.parametrize("case", ["dotdot", "elsewhere"])
def test_create_with_a_bundle_outside_the_state_dir(containerd, sleeper, tmp_path, new_bundle, case):
    new = containerd.new_id("hostile-bundle")
    if case == "dotdot":  # the bundle of another id, reached through the sleeper's
        made = new_bundle(bundle(containerd, new).with_name(new + "-other"))
        path = f"{bundle(containerd, sleeper)}/../{made.name}"
    else:
        made = new_bundle(tmp_path / new)
        path = str(made)
    with ShimClient(containerd, sleeper) as shim:
        error = try_create(shim, task_pb2.CreateTaskRequest(id=new, bundle=path))
    left = sorted(os.listdir(made))
    judge(containerd, error, "bundle", f" and creates the container there (the bundle then holds {left})")
    assert left == ["config.json", "rootfs"], "the shim wrote into the bundle it refused"


@pytest.mark.parametrize("target", ["../../../../escape", "sub/../../escape"])
def test_create_with_a_mount_target_outside_the_rootfs(containerd, sleeper, tmp_path, new_bundle, target):
    """A bind mount whose target climbs out of the new container's rootfs (containerd 2.x mounts
    carry a target): refused, and nothing is mounted outside the rootfs."""
    new = containerd.new_id("hostile-mount")
    made = new_bundle(bundle(containerd, new))
    source = tmp_path / "source"
    source.mkdir()
    (source / "marker").write_text("mounted\n")
    with ShimClient(containerd, sleeper) as shim:
        request = task_pb2.CreateTaskRequest(id=new, bundle=str(made), rootfs=[
            Mount(type="bind", source=str(source), target=target, options=["rbind", "ro"])])
        error = try_create(shim, request)
    escaped = [m for m in mounts_under("/") if m.endswith("/escape")]
    judge(containerd, error, "rootfs[0].target", f"; mounts named escape afterwards: {escaped}")
    assert not escaped
