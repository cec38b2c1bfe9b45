"""Kubernetes' view: pods and containers run through containerd's CRI plugin with the runtime
handler under test (`pyshim`; `runc` with PYSHIM_TEST_RUNTIME=io.containerd.runc.v2), driven over
gRPC like the kubelet drives it. Every pod is host-network (no CNI on the test machines).

Each test asserts what the CRI reports, and (fixture `cri`) fails if it left a pod sandbox,
container, process, mount, runc state, shim socket or cgroup behind.
"""
import json
import os
import re
import time
from datetime import datetime, UTC

import grpc
import psutil
import pytest

from cri import api_pb2 as api
from cri.client import container
from cri.harness import CRI_NAMESPACE, PAUSE_ENTRYPOINT, shim_socket
from e2e.harness import mounts_under, shim_binary_name

IMAGE = "docker.io/pyshim/busybox:test"
# containerd's CRI log format: `<RFC3339Nano time> <stream> <P(artial)|F(ull)> <text>`
LOG_LINE = re.compile(r"^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:\d\d)) "
                      r"(?P<stream>stdout|stderr) (?P<tag>[PF]) (?P<text>.*)$")
# A PID-namespace init gets no signal it has no handler for except SIGKILL: `sleep` as init
# ignores SIGTERM, so stopping it needs the forced kill.
SLEEP = ["sleep", "100000"]


def log_lines(text):
    """[(time as datetime, stream, tag, text)] of a CRI log file; fails on a line in any other format."""
    lines = []
    for line in text.splitlines():
        match = LOG_LINE.match(line)
        assert match, f"not a CRI log line: {line!r}"
        stamp = re.sub(r"(\.\d{6})\d+", r"\1", match["time"]).replace("Z", "+00:00")  # microseconds at most
        lines.append((datetime.fromisoformat(stamp), match["stream"], match["tag"], match["text"]))
    return lines


def run_container(cri, pod, name, command, **kwargs):
    cid = cri.create_container(pod.id, container(name, IMAGE, command, **kwargs), pod.config)
    cri.start_container(cid)
    return cid


def task_pid(cri_containerd, cid):
    pid, status = cri_containerd.tasks(namespace=CRI_NAMESPACE)[cid]
    assert status == "RUNNING", (cid, status)
    return pid


def wait_exec(proc, cmdline, timeout=10.0):
    """Wait until `proc` runs `cmdline`: it is `runc init` until it execs, which may be after `runc
    start` (and so Start) returned."""
    deadline = time.monotonic() + timeout
    while proc.cmdline() != cmdline:
        assert time.monotonic() < deadline, f"pid {proc.pid} runs {proc.cmdline()}, not {cmdline}"
        time.sleep(0.02)


def wait_for_log(pod, name, text, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not (pod.log_directory / f"{name}.log").exists() or text not in pod.log(name):
        assert time.monotonic() < deadline, f"{text!r} not in {name}'s log after {timeout}s"
        time.sleep(0.05)


def wait_gone(pids, timeout=10.0):
    """Wait until none of `pids` exists (not even as a zombie); return those still there."""
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in pids if psutil.pid_exists(pid)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def shim_binary(proc):
    """The containerd-shim-* executable a process runs (directly, or as a script: `python -IS SCRIPT`)."""
    names = [os.path.basename(arg) for arg in proc.cmdline()[:3]]
    return next((name for name in names if name.startswith("containerd-shim-")), None)


def shim_address(bundle):
    """The shim address containerd keeps for a task: `bootstrap.json` (2.x, when the shim's start
    printed JSON) or `address`."""
    if (bundle / "bootstrap.json").exists():
        return json.loads((bundle / "bootstrap.json").read_text())["address"]
    return (bundle / "address").read_text()


def grpc_code(call, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as error:
        call(*args, **kwargs)
    return error.value.code()


def remove_pod(cri, cri_containerd, pod):
    """StopPodSandbox and RemovePodSandbox; then CRI must no longer know the pod, and nothing it ran may
    be left: no process, shim, shim socket, mount, runc state or cgroup."""
    cri.stop_pod_sandbox(pod.id)
    assert cri.pod_sandbox_status(pod.id).status.state == api.SANDBOX_NOTREADY
    cri.remove_pod_sandbox(pod.id)
    assert grpc_code(cri.pod_sandbox_status, pod.id) == grpc.StatusCode.NOT_FOUND
    assert [p.id for p in cri.list_pod_sandboxes()] == []
    assert cri.list_containers() == []
    assert not shim_socket(cri_containerd.address, CRI_NAMESPACE, pod.id).exists()
    assert cri_containerd.wait_for_no_leaks() == []


def test_version_and_images(cri, cri_containerd):
    version = cri.version()
    assert (version.runtime_name, version.runtime_api_version) == ("containerd", "v1")
    for ref in (IMAGE, cri_containerd.pause_image):
        image = cri.image_status(ref)
        assert image is not None and ref in image.repo_tags, ref
    assert cri.image_status("docker.io/pyshim/absent:none") is None


def test_host_network_pod_sandbox_runs_under_the_shim(cri, cri_containerd, pod):
    p = pod()
    status = cri.pod_sandbox_status(p.id).status
    assert status.state == api.SANDBOX_READY
    assert status.runtime_handler == cri_containerd.handler
    assert status.metadata.name == p.config.metadata.name
    assert status.linux.namespaces.options.network == api.NODE

    pause = psutil.Process(task_pid(cri_containerd, p.id))
    wait_exec(pause, PAUSE_ENTRYPOINT)
    # host network: the pause process is in this host's network and UTS namespaces, not in its PID namespace
    for ns, shared in (("net", True), ("uts", True), ("pid", False)):
        assert (os.readlink(f"/proc/{pause.pid}/ns/{ns}") == os.readlink(f"/proc/self/ns/{ns}")) == shared, ns
    shim = pause.parent()
    assert shim_binary(shim) == shim_binary_name(cri_containerd.runtime), shim.cmdline()

    remove_pod(cri, cri_containerd, p)
    assert wait_gone([pause.pid, shim.pid]) == []


@pytest.mark.parametrize("code, reason", [(0, "Completed"), (3, "Error")])
def test_container_output_is_in_the_cri_log_and_its_exit_code_in_the_status(cri, cri_containerd, pod, code, reason):
    p = pod()
    before = datetime.now(UTC)
    cid = run_container(cri, p, "c", ["sh", "-c", f"echo out-line; echo err-line >&2; echo out-2; exit {code}"])
    status = cri.wait_container_exited(cid)
    assert (status.exit_code, status.reason) == (code, reason)
    # started_at is when CRI saw StartContainer succeed, finished_at when the shim saw the exit: a
    # container this short may well exit first (with runc-v2 too)
    assert 0 < status.created_at <= min(status.started_at, status.finished_at)
    assert before.timestamp() * 1e9 <= status.finished_at <= time.time() * 1e9
    assert status.log_path == str(p.log_directory / "c.log")

    lines = log_lines(p.log("c"))
    assert [(stream, tag, text) for _, stream, tag, text in lines if stream == "stdout"] == [
        ("stdout", "F", "out-line"), ("stdout", "F", "out-2")]
    assert [(stream, tag, text) for _, stream, tag, text in lines if stream == "stderr"] == [
        ("stderr", "F", "err-line")]
    assert all(before <= when <= datetime.now(UTC) for when, *_ in lines), lines

    [listed] = cri.list_containers(p.id)
    assert (listed.id, listed.state, listed.metadata.name) == (cid, api.CONTAINER_EXITED, "c")
    cri.remove_container(cid)
    assert grpc_code(cri.container_status, cid) == grpc.StatusCode.NOT_FOUND
    remove_pod(cri, cri_containerd, p)


def test_tty_container_output_is_in_the_cri_log(cri, cri_containerd, pod):
    # with a terminal there is one stream, stdout; CRI drops the terminal's \r
    p = pod()
    config = container("t", IMAGE, ["sh", "-c", "echo tty-out; echo tty-err >&2; [ -t 1 ] && echo is-a-tty"])
    config.tty = True
    cid = cri.create_container(p.id, config, p.config)
    cri.start_container(cid)
    status = cri.wait_container_exited(cid)
    assert (status.exit_code, status.reason) == (0, "Completed")
    assert [(stream, tag, text) for _, stream, tag, text in log_lines(p.log("t"))] == [
        ("stdout", "F", "tty-out"), ("stdout", "F", "tty-err"), ("stdout", "F", "is-a-tty")]

    remove_pod(cri, cri_containerd, p)


def test_container_stats_come_from_the_shim(cri, cri_containerd, pod):
    p = pod()
    # the shell holds 16 MB in a variable while it waits (a last command `sleep` would replace it)
    command = "x=$(head -c 16000000 /dev/zero | tr '\\0' a); echo ready; sleep 100000 & wait"
    cid = run_container(cri, p, "c", ["sh", "-c", command])
    wait_for_log(p, "c", "ready")
    stats = cri.container_stats(cid)
    assert (stats.attributes.id, stats.attributes.metadata.name) == (cid, "c")
    assert stats.cpu.timestamp > 0 and stats.cpu.usage_core_nano_seconds.value > 0
    assert stats.memory.timestamp > 0
    assert 16_000_000 <= stats.memory.usage_bytes.value < 200_000_000, stats.memory
    assert 0 < stats.memory.working_set_bytes.value <= stats.memory.usage_bytes.value, stats.memory

    remove_pod(cri, cri_containerd, p)


def test_exec_sync_returns_output_and_exit_code(cri, cri_containerd, pod):
    p = pod()
    cid = run_container(cri, p, "c", SLEEP)
    cri.wait_container_state(cid, api.CONTAINER_RUNNING)

    reply = cri.exec_sync(cid, ["sh", "-c", "echo hi-from-exec; echo err >&2"], timeout=10)
    assert (reply.stdout, reply.stderr, reply.exit_code) == (b"hi-from-exec\n", b"err\n", 0)
    reply = cri.exec_sync(cid, ["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
    assert (reply.stdout, reply.stderr, reply.exit_code) == (b"out\n", b"err\n", 3)
    reply = cri.exec_sync(cid, ["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x"])  # more than a pipe holds
    assert (reply.stdout, reply.stderr, reply.exit_code) == (b"x" * 300000, b"", 0)
    with pytest.raises(grpc.RpcError) as error:  # runc exec fails: an error, not an exit code
        cri.exec_sync(cid, ["no-such-command"], timeout=10)
    assert error.value.code() == grpc.StatusCode.UNKNOWN, error.value
    assert "executable file not found" in error.value.details(), error.value
    assert cri.container_status(cid).state == api.CONTAINER_RUNNING

    remove_pod(cri, cri_containerd, p)


def test_exec_sync_timeout_is_honoured(cri, cri_containerd, pod):
    p = pod()
    cid = run_container(cri, p, "c", SLEEP)
    cri.wait_container_state(cid, api.CONTAINER_RUNNING)

    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        cri.exec_sync(cid, ["sleep", "60"], timeout=1)
    elapsed = time.monotonic() - start
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.value
    assert "timeout" in error.value.details(), error.value
    assert 1 <= elapsed < 10
    # the timed-out exec was killed; the container and its shim carry on
    cri_containerd.wait_task_pids(cid, 1, namespace=CRI_NAMESPACE)
    assert cri.exec_sync(cid, ["echo", "still here"], timeout=10).stdout == b"still here\n"
    assert cri.container_status(cid).state == api.CONTAINER_RUNNING

    remove_pod(cri, cri_containerd, p)


@pytest.mark.parametrize("kind, command, timeout, exit_code, seconds", [
    # The shell traps SIGTERM (it has said "ready" once the trap is set) and exits 7.
    ("graceful", ["sh", "-c", "trap 'echo TERM received; exit 7' TERM; echo ready; sleep 1000 & wait"], 30, 7, (0, 10)),
    # `sleep` as init ignores SIGTERM: SIGKILL after the 2 s timeout.
    ("forced", SLEEP, 2, 137, (2, 15)),
], ids=["graceful", "forced"])
def test_stop_and_remove_container_then_pod(cri, cri_containerd, pod, kind, command, timeout, exit_code, seconds):
    p = pod()
    cid = run_container(cri, p, "c", command)
    cri.wait_container_state(cid, api.CONTAINER_RUNNING)
    if kind == "graceful":
        wait_for_log(p, "c", "ready")
    pid = task_pid(cri_containerd, cid)
    shim = psutil.Process(pid).parent()
    bundle = cri_containerd.state / "io.containerd.runtime.v2.task" / CRI_NAMESPACE / cid
    assert mounts_under(bundle), "the container's rootfs is not mounted"

    start = time.monotonic()
    cri.stop_container(cid, timeout)
    elapsed = time.monotonic() - start
    assert seconds[0] <= elapsed < seconds[1]
    status = cri.container_status(cid)
    assert (status.state, status.exit_code, status.reason) == (api.CONTAINER_EXITED, exit_code, "Error")
    if kind == "graceful":
        assert "TERM received" in [text for _, _, _, text in log_lines(p.log("c"))]
    cri.stop_container(cid, timeout)  # idempotent
    assert wait_gone([pid]) == []

    cri.remove_container(cid)
    assert grpc_code(cri.container_status, cid) == grpc.StatusCode.NOT_FOUND
    assert cri.list_containers(p.id) == []
    assert mounts_under(bundle) == [] and not bundle.exists()
    assert shim.is_running(), "the pod's shim ended with the container, while the pause container still runs"

    remove_pod(cri, cri_containerd, p)
    assert wait_gone([shim.pid]) == []


def test_pod_with_three_containers_has_one_shim(cri, cri_containerd, pod):
    p = pod()
    cids = [run_container(cri, p, f"c{i}", SLEEP) for i in range(3)]
    for cid in cids:
        cri.wait_container_state(cid, api.CONTAINER_RUNNING)
    listed = cri.list_containers(p.id)
    assert sorted((c.id, c.state) for c in listed) == sorted((cid, api.CONTAINER_RUNNING) for cid in cids)

    # one shim: every container's bundle names the pause container's shim socket, and that shim
    # is the parent of every container process of the pod
    bundles = cri_containerd.state / "io.containerd.runtime.v2.task" / CRI_NAMESPACE
    addresses = {shim_address(bundles / cid) for cid in [p.id, *cids]}
    assert addresses == {f"unix://{shim_socket(cri_containerd.address, CRI_NAMESPACE, p.id)}"}
    pids = [task_pid(cri_containerd, cid) for cid in [p.id, *cids]]
    [shim] = {psutil.Process(pid).parent() for pid in pids}
    assert shim_binary(shim) == shim_binary_name(cri_containerd.runtime), shim.cmdline()

    # StopPodSandbox stops the containers too; RemovePodSandbox removes them
    cri.stop_pod_sandbox(p.id)
    assert [cri.container_status(cid).state for cid in cids] == [api.CONTAINER_EXITED] * 3
    remove_pod(cri, cri_containerd, p)
    assert wait_gone(pids + [shim.pid]) == []


def test_container_over_its_memory_limit_is_oom_killed(cri, cri_containerd, pod):
    p = pod()
    # `tail` keeps the last lines of its input; /dev/zero has no newline, so it keeps all of it.
    cid = run_container(cri, p, "c", ["tail", "/dev/zero"], memory_limit=32 << 20)
    status = cri.wait_container_exited(cid)
    assert (status.exit_code, status.reason) == (137, "OOMKilled")

    remove_pod(cri, cri_containerd, p)
