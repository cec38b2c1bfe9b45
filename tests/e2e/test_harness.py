"""The harness itself: the leak check must see what a running container leaves behind."""


def test_leak_check_sees_a_running_container(containerd, leak_check, cid):
    result = containerd.ctr("run", "-d", "--runtime", containerd.runtime, containerd.image, cid, "sleep", "1000")
    assert result.rc == 0, result.stderr
    containerd.wait_task_status(cid, "RUNNING")

    leaks = containerd.find_leaks()
    kinds = {line.split(":")[0].split(" ")[0] for line in leaks}
    # a shim and the container's sleep; the container; its bundle; its rootfs mount; its runc
    # state (runc-v2's default root: a shim using another root must be added to the check); cgroups
    assert kinds >= {"process", "container", "bundle", "mount", "runc", "cgroup"}, leaks
    assert any(line.startswith("process") and line.endswith("sleep 1000") for line in leaks), leaks

    containerd.clean_leaks()
    assert containerd.find_leaks() == []
