"""The confinement checks of Create and Exec (shim/task/confine.py), mount targets resolved
inside the rootfs (shim/linux/mount.py), and the bounds on runc commands (shim/runtime/runc.py)."""
import os
import socket
import time

import pytest

from shim.api import task_pb2 as pb
from shim.api.mount_pb2 import Mount
from shim.linux.mount import resolve_in_root
from shim.runtime import runc
from shim.task import confine
from shim.task.errors import InvalidArgument
from shim.ttrpc import Code


@pytest.fixture
def place(tmp_path):
    """A bundle parent with bundle `c1`, a FIFO, a regular file, a socket and a symlink."""
    parent = tmp_path / "ns"
    (parent / "c1").mkdir(parents=True)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_text("secret\n")
    os.symlink(tmp_path / "fifo", tmp_path / "link-to-fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    yield tmp_path, str(parent)
    sock.close()


def refused(call, *args):
    with pytest.raises(InvalidArgument) as info:
        call(*args)
    assert info.value.code == Code.INVALID_ARGUMENT
    return info.value.message


def create(tmp_path, parent, **fields):
    fields.setdefault("bundle", f"{parent}/c1")
    return pb.CreateTaskRequest(id="c1", **fields)


def test_a_plain_create_passes(place):
    tmp_path, parent = place
    confine.check_create(create(tmp_path, parent, stdin=f"{tmp_path}/fifo", stdout=f"{tmp_path}/fifo",
                                stderr=f"fifo://{tmp_path}/fifo",
                                rootfs=[Mount(type="overlay", source="overlay"),
                                        Mount(type="bind", source="/x", target="/sub/dir")]), parent)
    confine.check_create(create(tmp_path, parent), parent)  # no stdio at all


@pytest.mark.parametrize("bundle, why", [
    ("{parent}/c1/../c1", "'..'"),
    ("{parent}/other/../c1", "'..'"),
    ("{parent}//c1", "normalized"),
    ("{parent}/c1/", "normalized"),
    ("ns/c1", "absolute"),
    ("{parent}/c2", "not this namespace's bundle for c1"),
    ("{tmp}/elsewhere", "not this namespace's bundle"),
    ("{parent}/c1\0", "NUL"),
])
def test_bundles_elsewhere_are_refused(place, bundle, why):
    tmp_path, parent = place
    message = refused(confine.check_create, create(tmp_path, parent, bundle=bundle.format(parent=parent, tmp=tmp_path)),
                      parent)
    assert message.startswith("bundle ") and why in message, message


def test_a_bundle_that_is_a_symlink_is_refused(place):
    tmp_path, parent = place
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", f"{parent}/c2")
    message = refused(confine.check_create, pb.CreateTaskRequest(id="c2", bundle=f"{parent}/c2"), parent)
    assert "not this namespace's bundle" in message


@pytest.mark.parametrize("target", ["..", "../../etc", "a/../../b", "/x/../..", "a\0b"])
def test_mount_targets_with_dotdot_are_refused(place, target):
    tmp_path, parent = place
    req = create(tmp_path, parent,
                 rootfs=[Mount(type="bind", source="/"), Mount(type="bind", source="/", target=target)])
    assert refused(confine.check_create, req, parent).startswith("rootfs[1].target ")


@pytest.mark.parametrize("field", ["stdin", "stdout", "stderr"])
@pytest.mark.parametrize("value, why", [
    ("{tmp}/file", "not a FIFO (a regular file)"),
    ("{tmp}/link-to-fifo", "not a FIFO (a symlink)"),
    ("{tmp}/sock", "not a FIFO (a socket)"),
    ("/dev/null", "not a FIFO (a character device)"),
    ("{tmp}", "not a FIFO (a directory)"),
    ("{tmp}/missing", "does not exist"),
    ("{tmp}/../{name}/fifo", "'..'"),
    ("relative/fifo", "absolute"),
    ("fifo://{tmp}/file", "not a FIFO"),
])
def test_stdio_that_is_not_a_fifo_is_refused(place, field, value, why):
    tmp_path, parent = place
    value = value.format(tmp=tmp_path, name=tmp_path.name)
    message = refused(confine.check_create, create(tmp_path, parent, **{field: value}), parent)
    assert message.startswith(f"{field} ") and why in message, message
    message = refused(confine.check_exec, pb.ExecProcessRequest(id="c1", exec_id="e", **{field: value}))
    assert message.startswith(f"{field} ") and why in message, message


def test_with_a_terminal_the_stderr_fifo_is_not_looked_at(place):
    """containerd's client names a stderr FIFO for a terminal but never makes it (the terminal
    carries both streams): TestContainerPTY of its own suite sends exactly that."""
    tmp_path, parent = place
    missing = f"{tmp_path}/missing-stderr"
    confine.check_create(create(tmp_path, parent, terminal=True, stderr=missing), parent)
    confine.check_exec(pb.ExecProcessRequest(id="c1", exec_id="e", terminal=True, stderr=missing))
    refused(confine.check_create, create(tmp_path, parent, stderr=missing), parent)  # not without one


@pytest.mark.parametrize("uri, why", [
    ("file:///proc/sys/kernel/core_pattern", "pseudo-filesystem"),
    ("file:///sys/kernel/notes", "pseudo-filesystem"),
    ("file:///dev/sda", "pseudo-filesystem"),
    ("file://{tmp}/fifo", "not a regular file (a FIFO"),
    ("file://{tmp}/link-to-fifo", "not a regular file (a symlink)"),
    ("file://{tmp}/../x", "'..'"),
    ("binary://{tmp}/file", "not an executable file"),
    ("binary://{tmp}/missing", "No such file"),
    ("binary://relative", "absolute"),
    ("ftp://host/x", "unknown stdio scheme 'ftp'"),
])
def test_log_uris_naming_other_files_are_refused(place, uri, why):
    tmp_path, parent = place
    uri = uri.format(tmp=tmp_path)
    message = refused(confine.check_create, create(tmp_path, parent, stdout=uri, stderr=uri), parent)
    assert message.startswith("stdout ") and why in message, message


def test_log_uris_to_new_or_regular_files_and_loggers_pass(place):
    tmp_path, parent = place
    logger = tmp_path / "logger"
    logger.write_text("#!/bin/sh\n")
    logger.chmod(0o755)
    for uri in (f"file://{tmp_path}/file", f"file://{tmp_path}/new%20dir/log", f"binary://{logger}?a=b"):
        confine.check_create(create(tmp_path, parent, stdout=uri, stderr=uri), parent)


def test_stdin_takes_no_uri(place):
    tmp_path, parent = place
    message = refused(confine.check_create, create(tmp_path, parent, stdin=f"file://{tmp_path}/file"), parent)
    assert message.startswith("stdin ") and "must be a FIFO path" in message


# -- mount targets inside the rootfs ------------------------------------------------------------


def test_resolve_in_root_keeps_symlinks_inside(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    os.symlink("/etc", root / "abs")           # absolute: means the rootfs's /etc
    os.symlink("../../../..", root / "up")     # relative, climbing past the root
    os.symlink("etc", root / "rel")
    os.symlink("loop", root / "loop")
    r = str(root)
    assert resolve_in_root(r, "abs/x") == f"{r}/etc/x"
    assert resolve_in_root(r, "up/etc/passwd") == f"{r}/etc/passwd"
    assert resolve_in_root(r, "/rel/./y/") == f"{r}/etc/y"
    assert resolve_in_root(r, "../../x") == f"{r}/x"
    assert resolve_in_root(r, "new/dir") == f"{r}/new/dir"
    assert resolve_in_root(r, "/") == r
    with pytest.raises(OSError, match="too many symlinks"):
        resolve_in_root(r, "loop/x")


# -- bounds on runc commands --------------------------------------------------------------------


def test_quick_verbs_are_bounded_and_a_request_deadline_shortens_the_bound():
    assert runc.bound_for("kill") == runc.bound_for("delete") == runc.bound_for("state") == runc.QUICK_BOUND
    assert runc.bound_for("create") == runc.START_BOUND
    assert runc.bound_for("checkpoint") is None
    token = runc.request_deadline.set(time.monotonic() + 2)
    try:
        assert 1.5 < runc.bound_for("kill") <= 2
        assert 1.5 < runc.bound_for("checkpoint") <= 2
    finally:
        runc.request_deadline.reset(token)
    token = runc.request_deadline.set(time.monotonic() + 60)
    try:
        assert runc.bound_for("delete") == runc.QUICK_BOUND
    finally:
        runc.request_deadline.reset(token)


def test_collect_stops_at_the_deadline_and_reads_everything_before_it():
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    os.write(w1, b"out")
    os.write(w2, b"err")
    start = time.monotonic()
    out, err = runc._collect(os.fdopen(r1, "rb"), os.fdopen(r2, "rb"), time.monotonic() + 0.3)
    assert (out, err) == (b"out", b"err")
    assert 0.25 < time.monotonic() - start < 2  # the writers never closed: the deadline ended it
    os.close(w1)
    os.close(w2)
    r, w = os.pipe()
    os.write(w, b"all")
    os.close(w)
    assert runc._collect(os.fdopen(r, "rb"), None, None) == (b"all", b"")
