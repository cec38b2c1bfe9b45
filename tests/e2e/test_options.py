"""Runtime options reach the shim: BinaryName (crun instead of runc) and Root (runc's state dir).

ctr sends options to a runtime that is not `io.containerd.runc.v2` only as
`runtimeoptions.v1.Options{config_path}` (`--runtime-config-path`, a TOML file with the runc
shim's key names, as in CRI's options table); for runc-v2 itself (comparison runs) the same
options go as its own flags (`--runc-binary`, `--runc-root`).

Every test is leak-checked afterwards (the `ctr` fixture); the custom root is checked here.
"""
import json
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import psutil

from e2e.harness import RUNC_V2_ROOT
from e2e.shims import alive, remove_ctr_fifos, shim_pid, wait_until

RUNC_V2 = "io.containerd.runc.v2"


def runtime_options(containerd, tmp_path, **table):
    """ctr flags that give the runtime under test these runc options (TOML key names)."""
    if containerd.runtime == RUNC_V2:
        flags = {"BinaryName": "--runc-binary", "Root": "--runc-root"}
        return [arg for key, value in table.items() for arg in (flags[key], value)]
    config = tmp_path / "runtime-options.toml"
    config.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items()))
    return ["--runtime-config-path", str(config)]


def runtime_list(binary, root):
    """The container ids `<binary> --root <root> list` knows."""
    result = subprocess.run([binary, "--root", str(root), "list", "--quiet"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


UNIFIED = Path("/sys/fs/cgroup/unified")


def crun_binary(tmp_path):
    """`crun`, or a wrapper around it for what Debian 12's crun 1.8.1 cannot do on the test
    machines (neither has anything to do with the shim):

    * it refuses to run any container when cgroup v1 controllers coexist with a cgroup2
      hierarchy that has controllers of its own (here hugetlb in /sys/fs/cgroup/unified): the
      wrapper runs it in a mount namespace without that cgroup2 mount, where it sees cgroup v1;
    * it accepts only OCI spec 1.0.x ("unknown version specified"), while containerd 1.7/2.x
      write 1.1/1.2: the wrapper relabels the bundle's config.json as 1.0.2-dev for `create`
      (ctr's default specs use nothing newer)."""
    crun = shutil.which("crun")
    try:
        hybrid = bool((UNIFIED / "cgroup.controllers").read_text().split())
    except OSError:
        hybrid = False
    old_spec = "spec: 1.0." in subprocess.run([crun, "--version"], capture_output=True, text=True).stdout
    if not (hybrid or old_spec):
        return "crun"
    lines = ["#!/bin/sh"]
    if old_spec:
        lines += ['bundle= prev=',
                  'for arg in "$@"; do [ "$prev" = --bundle ] && bundle=$arg; prev=$arg; done',
                  '[ -z "$bundle" ] || sed -i \'s/"ociVersion":"1\\.[1-9][^"]*"/"ociVersion":"1.0.2-dev"/\' '
                  '"$bundle/config.json"']
    if hybrid:
        lines.append(f"exec unshare --mount --propagation private sh -c 'umount -l {UNIFIED} && "
                     f'exec "$0" "$@"\' {crun} "$@"')
    else:
        lines.append(f'exec {crun} "$@"')
    wrapper = tmp_path / "crun-adapted"
    wrapper.write_text("\n".join(lines) + "\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def test_binary_name_runs_the_container_with_crun(containerd, ctr, cid, tmp_path):
    options = runtime_options(containerd, tmp_path, BinaryName=crun_binary(tmp_path))
    try:
        result = ctr("run", "-d", *options, "--runtime", containerd.runtime, containerd.image, cid, "sleep", "1000")
        assert result.rc == 0, result.stderr
        containerd.wait_task_status(cid, "RUNNING")
        state_root = RUNC_V2_ROOT / containerd.namespace
        # crun keeps its own state format under the same --root: crun lists the container, runc
        # does not know it (runc's state.json is missing)
        assert cid in runtime_list("crun", state_root)
        assert (state_root / cid / "status").exists() and not (state_root / cid / "state.json").exists()
        pid, _ = containerd.tasks()[cid]
        assert containerd.task_pids(cid) == [pid]  # `crun ps` through the shim

        result = ctr("task", "exec", "--exec-id", "hello", cid, "echo", "hello from crun")
        assert (result.rc, result.stdout) == (0, "hello from crun\n"), result.stderr

        ctr("task", "kill", "-s", "KILL", cid)
        containerd.wait_task_status(cid, "STOPPED")
        assert ctr("task", "rm", cid).rc == 0
        assert cid not in runtime_list("crun", state_root)
    finally:
        ctr("task", "rm", "-f", cid)
        ctr("container", "rm", cid)
        remove_ctr_fifos(cid)

    # the same with `ctr run --rm` (output through the shim's stdio, crun's exit status)
    result = ctr("run", "--rm", *options, "--runtime", containerd.runtime, containerd.image,
                 containerd.new_id("crun-rm"), "sh", "-c", "echo crun out; exit 3")
    assert (result.rc, result.stdout) == (3, "crun out\n"), result.stderr


def test_root_option_puts_runc_state_there_and_delete_finds_it(containerd, ctr, cid, tmp_path):
    """With Root set, runc keeps the container's state in <Root>/<namespace> (runc at that root
    lists it; the default root does not have it), and when the shim is SIGKILLed its `delete`
    action finds the container there too (the options saved in the bundle)."""
    root = Path(tempfile.mkdtemp(prefix="pyshim-runc-root-", dir="/run"))
    runc_root = root / containerd.namespace
    try:
        options = runtime_options(containerd, tmp_path, Root=str(root))
        result = ctr("run", "-d", *options, "--runtime", containerd.runtime, containerd.image, cid, "sleep", "1000")
        assert result.rc == 0, result.stderr
        containerd.wait_task_status(cid, "RUNNING")
        assert runtime_list("runc", runc_root) == [cid]
        assert not (RUNC_V2_ROOT / containerd.namespace / cid).exists()
        pid, _ = containerd.tasks()[cid]
        assert containerd.task_pids(cid) == [pid]  # `runc --root <Root>/<ns> ps` through the shim

        with containerd.events() as events:
            psutil.Process(shim_pid(containerd, cid)).send_signal(signal.SIGKILL)
            assert events.wait_for("/tasks/exit", container_id=cid).get("exit_status", 0) == 137
        wait_until(lambda: not alive(pid), what="the container is killed by the shim's delete action")
        wait_until(lambda: cid not in containerd.tasks(), what="the task is gone")
        assert runtime_list("runc", runc_root) == [], "the delete action left runc state under Root"
    finally:
        ctr("task", "rm", "-f", cid)
        ctr("container", "rm", cid)
        remove_ctr_fifos(cid)
        for state in runc_root.iterdir() if runc_root.is_dir() else ():
            subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", state.name], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
