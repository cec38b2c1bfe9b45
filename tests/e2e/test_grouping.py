"""One shim per group (a pod): containers with the same `io.containerd.runc.v2.group` annotation
share one shim process, which exits after the last of them is deleted; and a long-lived
grouped shim does not accumulate fds.

Every test is leak-checked afterwards (the `ctr` fixture).
"""
import pytest

from e2e.harness import DEFAULT_RUNTIME, RUNC_V2_ROOT
from e2e.shims import (GROUP_ANNOTATION, alive, bundle, fd_kinds, open_fds, remove_ctr_fifos, shim_address,
                       shim_pid, socket_path, wait_until)

CONTAINERS_FOR_FD_CHECK = 50


def run_in_group(containerd, ctr, group, cid, *command, detach=True):
    result = ctr("run", *(["-d"] if detach else ["--rm"]), "--annotation", f"{GROUP_ANNOTATION}={group}",
                 "--runtime", containerd.runtime, containerd.image, cid, *command)
    assert result.rc == 0, result.stderr
    if detach:
        containerd.wait_task_status(cid, "RUNNING")
    return result


def delete(containerd, ctr, cid):
    ctr("task", "kill", "-s", "KILL", cid)
    containerd.wait_task_status(cid, "STOPPED")
    assert ctr("task", "rm", cid).rc == 0
    assert ctr("container", "rm", cid).rc == 0
    remove_ctr_fifos(cid)


def test_group_shares_one_shim_until_its_last_container_is_deleted(containerd, ctr, cid):
    group = f"group-{cid}"
    members = [containerd.new_id(f"member-{n}") for n in range(3)]
    try:
        for member in members:
            run_in_group(containerd, ctr, group, member, "sleep", "1000")
        shims = {member: shim_pid(containerd, member) for member in members}
        assert len(set(shims.values())) == 1, f"not one shim for the group: {shims}"
        shim = shims[members[0]]
        # every member's bundle points containerd at the group's socket
        sock = socket_path(containerd, group)
        assert {shim_address(bundle(containerd, m)) for m in members} == {f"unix://{sock}"}

        # deleting one member (its `delete` action runs too) touches only that member
        delete(containerd, ctr, members[0])
        tasks = containerd.tasks()
        assert members[0] not in tasks and all(tasks[m][1] == "RUNNING" for m in members[1:])
        assert alive(shim) and sock.exists()
        assert [m for m in members if (RUNC_V2_ROOT / containerd.namespace / m).exists()] == members[1:]

        # the first member's bundle (the shim's working directory) is gone: the shim still serves
        # new members and execs in the others
        result = run_in_group(containerd, ctr, group, containerd.new_id("late-member"), "echo", "joined",
                              detach=False)
        assert result.stdout == "joined\n"
        result = ctr("task", "exec", "--exec-id", "hello", members[1], "echo", "exec")
        assert (result.rc, result.stdout) == (0, "exec\n"), result.stderr
        assert shim_pid(containerd, members[1]) == shim

        delete(containerd, ctr, members[1])
        assert alive(shim), "the shim exited while a member was left"
        delete(containerd, ctr, members[2])
        wait_until(lambda: not alive(shim), what="the shim exits after its last container")
        if containerd.runtime != DEFAULT_RUNTIME and sock.exists():
            sock.unlink()
            pytest.xfail("runc-v2 (2.x) leaves its socket behind when its last container is deleted")
        assert not sock.exists()
    finally:
        for member in members:
            ctr("task", "rm", "-f", member)
            ctr("container", "rm", member)
            remove_ctr_fifos(member)


def test_grouped_shim_keeps_no_fds_from_finished_containers(containerd, ctr, cid):
    """A shim kept alive by one container of its group serves 50 more, one after the other
    (FIFO stdio, output checked): afterwards it holds no more fds than before them."""
    group = f"fds-{cid}"
    try:
        run_in_group(containerd, ctr, group, cid, "sleep", "1000")
        shim = shim_pid(containerd, cid)
        for n in range(2):  # warm-up: whatever is opened once per shim (e.g. the events connection)
            assert run_in_group(containerd, ctr, group, containerd.new_id("warm-up"), "echo", str(n),
                                detach=False).stdout == f"{n}\n"
        before = open_fds(shim)
        for n in range(CONTAINERS_FOR_FD_CHECK):
            result = run_in_group(containerd, ctr, group, containerd.new_id("fds"), "echo", f"container {n}",
                                  detach=False)
            assert result.stdout == f"container {n}\n"
        assert shim_pid(containerd, cid) == shim, "the group's shim changed"
        # connections containerd has just closed may take a moment to be noticed
        try:
            wait_until(lambda: len(open_fds(shim)) <= len(before), timeout=5)
        except AssertionError:
            after = open_fds(shim)
            message = (f"the shim holds {len(after)} fds after {CONTAINERS_FOR_FD_CHECK} containers, "
                       f"{len(before)} before: {fd_kinds(before)} -> {fd_kinds(after)}")
            if containerd.runtime != DEFAULT_RUNTIME:
                pytest.xfail(message)  # observed with runc-v2 2.1 now and then: one more anon_inode
            raise AssertionError(message) from None
    finally:
        ctr("task", "rm", "-f", cid)
        ctr("container", "rm", cid)
        remove_ctr_fifos(cid)
