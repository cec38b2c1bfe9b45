"""Faults around the shim: a runc that fails or hangs on one verb, a full or read-only disk under
runc's state dir or the bundle, a FIFO whose reader went away, a shim stopped during Wait, and
containerd killed while containers start.

What every test asks: a clear error reaches the client and names the operation, the shim never
hangs past a bound (shim/runtime/runc.py: BOUNDS, or the request's deadline), and once the fault is
gone the container is either running and manageable or cleanly gone, its exit delivered. Every
test is leak-checked afterwards (the `ctr` fixture).

The faulty runc is a wrapper given as the `BinaryName` runtime option: it reads `<its dir>/fault`
("fail VERB" or "hang VERB") on every call and otherwise runs the real runc. A hang is an `exec
sleep`, so the process the shim must kill is the one it started.
"""
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from google.protobuf.any_pb2 import Any

from e2e.shimapi import PYSHIM, ShimClient
from e2e.shims import alive, shim_pid, wait_until
from e2e.tasks import fifo_dir, remove, xfail_unless_pyshim
from e2e.test_options import RUNC_V2, runtime_options
from shim.api import task_pb2
from shim.runtime.runc import QUICK_BOUND

WRAPPER = """#!/bin/sh
# runc with an injected fault: $dir/fault holds "fail VERB" or "hang VERB"
dir=${0%/*}
log= prev= verb=
for arg; do
    [ "$prev" = --log ] && log=$arg
    case $arg in
        create|start|exec|kill|delete|pause|resume|update|ps|state|checkpoint|restore)
            [ -z "$verb" ] && verb=$arg;;
    esac
    prev=$arg
done
read -r mode target < "$dir/fault"
if [ "$verb" = "$target" ]; then
    echo "$mode $verb $$" >> "$dir/hits"
    case $mode in
        fail)
            msg="injected failure of runc $verb"
            [ -n "$log" ] && printf '{"level":"error","msg":"%s","time":"2026-01-01T00:00:00Z"}\\n' "$msg" >> "$log"
            echo "$msg" >&2
            exit 1;;
        hang) exec sleep 3600;;
    esac
fi
exec runc "$@"
"""


class FaultyRunc:
    def __init__(self, directory):
        self.dir = Path(directory)
        self.binary = self.dir / "runc-faulty"
        self.binary.write_text(WRAPPER)
        self.binary.chmod(0o755)
        self.set("")

    def set(self, mode, verb=""):
        (self.dir / "fault").write_text(f"{mode} {verb}\n")

    def hits(self):
        path = self.dir / "hits"
        return [line.split() for line in path.read_text().splitlines()] if path.exists() else []

    def hung(self):
        """The hung `sleep 3600` processes it started that still run."""
        return [int(pid) for mode, _, pid in self.hits() if mode == "hang" and alive(int(pid))]

    def kill_hung(self):
        for pid in self.hung():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def faulty(containerd, tmp_path):
    runc = FaultyRunc(tmp_path)
    runc.options = runtime_options(containerd, tmp_path, BinaryName=str(runc.binary))
    yield runc
    runc.set("")
    runc.kill_hung()  # only where the shim did not (containerd-shim-runc-v2)


def start(containerd, ctr, faulty, cid, *command):
    result = ctr("run", "-d", "--fifo-dir", fifo_dir(containerd), *faulty.options, "--runtime", containerd.runtime,
                 containerd.image, cid, *command)
    assert result.rc == 0, result.stderr
    return containerd.wait_task_status(cid, "RUNNING")


def injected(verb):
    return f"injected failure of runc {verb}"


def unclear(text, verb, *names):
    """Why `text` (a client's error) is not a clear error for a failed runc `verb`, or "": it must
    carry runc's message and, apart from that message, name the operation."""
    assert injected(verb) in text, f"runc's message did not reach the client: {text!r}"
    rest = text.replace(injected(verb), "")
    return "" if any(name in rest for name in names) else f"{verb}: {text.strip()!r} names no operation"


def assert_clear_error(result, verb, *names):
    assert result.rc != 0, result
    assert not unclear(result.stderr, verb, *names)


# -- runc fails ------------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["create", "start"])
def test_failing_create_or_start_reaches_ctr_and_leaves_nothing(containerd, ctr, cid, faulty, verb):
    faulty.set("fail", verb)
    result = ctr("run", "--rm", *faulty.options, "--runtime", containerd.runtime, containerd.image, cid,
                 "echo", "never")
    assert_clear_error(result, verb, f"OCI runtime {verb} failed", f"failed to {verb}")
    assert "never" not in result.stdout
    ctr("task", "rm", "-f", cid)
    ctr("container", "rm", cid)
    # the same options work once runc does
    faulty.set("")
    result = ctr("run", "--rm", *faulty.options, "--runtime", containerd.runtime, containerd.image, cid,
                 "sh", "-c", "echo works; exit 4")
    assert (result.rc, result.stdout) == (4, "works\n"), result.stderr


def test_failing_verbs_on_a_running_container(containerd, ctr, cid, faulty):
    """exec, ps, pause, resume, update, kill, delete fail in turn; each error carries runc's
    message and names its operation, and the container is as it was: the next verb works once
    runc does."""
    vague = []

    def failed(result, verb, *names):
        assert result.rc != 0, result
        if reason := unclear(result.stderr, verb, *names):
            vague.append(reason)

    start(containerd, ctr, faulty, cid, "sleep", "100000")
    try:
        faulty.set("fail", "exec")
        failed(ctr("task", "exec", "--exec-id", "e1", cid, "echo", "no"), "exec", "exec")
        faulty.set("")
        assert ctr("task", "exec", "--exec-id", "e1", cid, "echo", "yes") == (0, "yes\n", "")

        faulty.set("fail", "ps")
        failed(ctr("task", "ps", cid), "ps", "pids", "ps")
        faulty.set("")
        assert len(containerd.task_pids(cid)) == 1

        faulty.set("fail", "pause")
        failed(ctr("task", "pause", cid), "pause", "pause")
        assert containerd.tasks()[cid][1] == "RUNNING"
        faulty.set("fail", "resume")
        assert ctr("task", "pause", cid).rc == 0
        failed(ctr("task", "resume", cid), "resume", "resume")
        assert containerd.tasks()[cid][1] == "PAUSED"
        faulty.set("")
        assert ctr("task", "resume", cid).rc == 0
        assert containerd.tasks()[cid][1] == "RUNNING"

        with ShimClient(containerd, cid) as shim:  # ctr 1.6 has no update command
            faulty.set("fail", "update")
            resources = Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources", value=b"{}")
            error = shim.error("Update", task_pb2.UpdateTaskRequest(id=cid, resources=resources))
            if reason := unclear(error.message, "update", "update"):
                vague.append(reason)

        faulty.set("fail", "kill")
        failed(ctr("task", "kill", "-s", "KILL", cid), "kill", "kill")
        assert containerd.tasks()[cid][1] == "RUNNING"
        faulty.set("")
        with containerd.events() as events:
            assert ctr("task", "kill", "-s", "KILL", cid).rc == 0
            assert events.wait_for("/tasks/exit", container_id=cid, id=cid)["exit_status"] == 137

        faulty.set("fail", "delete")
        failed(ctr("task", "rm", cid), "delete", "delete")
        faulty.set("")
        assert ctr("task", "rm", cid).rc == 0
    finally:
        faulty.set("")
        remove(containerd, ctr, cid)
    if vague:
        xfail_unless_pyshim(containerd, "; ".join(vague))
    assert not vague


# -- runc hangs ------------------------------------------------------------------------------------


def test_hung_runc_kill_is_killed_at_the_bound(containerd, ctr, cid, faulty):
    """No deadline from the client (ctr sets none): the shim's own bound for kill applies, the
    call fails naming the verb and the bound, and the shim serves the container on."""
    start(containerd, ctr, faulty, cid, "sleep", "100000")
    try:
        faulty.set("hang", "kill")
        began = time.monotonic()
        result = ctr("task", "kill", "-s", "KILL", cid, timeout=QUICK_BOUND + 20)
        took = time.monotonic() - began
        assert result.rc != 0
        assert "kill" in result.stderr and f"did not finish within {QUICK_BOUND:g}s" in result.stderr, result.stderr
        assert QUICK_BOUND - 1 < took < QUICK_BOUND + 8, took
        wait_until(lambda: not faulty.hung(), 5, "the hung runc is killed")
        faulty.set("")
        assert ctr("task", "exec", "--exec-id", "after", cid, "echo", "served") == (0, "served\n", "")
    except subprocess.TimeoutExpired:
        if containerd.runtime == RUNC_V2:
            pytest.xfail(f"{RUNC_V2} waits for a hung runc kill for ever")
        raise
    finally:
        faulty.set("")
        faulty.kill_hung()
        remove(containerd, ctr, cid)


@pytest.mark.parametrize("verb", ["create", "start", "exec", "ps", "pause", "delete"])
def test_hung_runc_ends_with_the_callers_deadline(containerd, ctr, cid, faulty, verb):
    """ctr --timeout gives every call a deadline, which containerd passes on to the shim: the
    hung runc is killed then, and afterwards the container can be used or removed."""
    if verb in ("create", "start"):
        faulty.set("hang", verb)
        began = time.monotonic()
        result = ctr("--timeout", "4s", "run", "-d", "--fifo-dir", fifo_dir(containerd), *faulty.options,
                     "--runtime", containerd.runtime, containerd.image, cid, "sleep", "100000", timeout=60)
    else:
        start(containerd, ctr, faulty, cid, "sleep", "100000")
        if verb == "delete":
            with containerd.events() as events:
                assert ctr("task", "kill", "-s", "KILL", cid).rc == 0
                events.wait_for("/tasks/exit", container_id=cid)
        faulty.set("hang", verb)
        args = {"exec": ("task", "exec", "--exec-id", "hung", cid, "true"), "ps": ("task", "ps", cid),
                "pause": ("task", "pause", cid), "delete": ("task", "rm", cid)}[verb]
        began = time.monotonic()
        result = ctr("--timeout", "4s", *args, timeout=60)
    assert result.rc != 0, result
    assert time.monotonic() - began < 20
    wait_until(lambda: faulty.hits(), 5, f"runc {verb} was called")
    try:
        wait_until(lambda: not faulty.hung(), 8, f"the hung runc {verb} is killed")
    except AssertionError:
        if containerd.runtime == RUNC_V2:
            pytest.xfail(f"{RUNC_V2} leaves a hung runc {verb} running after the deadline")
        raise
    finally:
        faulty.set("")
        faulty.kill_hung()
        if verb == "pause" and cid in containerd.tasks() and containerd.tasks()[cid][1] != "RUNNING":
            ctr("task", "resume", cid)
        remove(containerd, ctr, cid)


# -- disks -----------------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs():
    """mount(path, remove=False): a 1 MiB tmpfs at `path` (made if missing); unmounted
    afterwards, and with `remove` its directory removed too."""
    mounted = []

    def mount(path, remove=False):
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0711", "pyshim-fault", str(path)], check=True)
        mounted.append((path, remove))
        return path

    yield mount
    for path, owned in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)
        if owned:
            os.rmdir(path)


def fill(directory):
    """Write to `directory` until its filesystem is full."""
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_runc_state_dir_full_or_read_only(containerd, ctr, cid, tmp_path, small_tmpfs, fault):
    """runc's state dir (the Root option) cannot be written: Create fails with runc's reason,
    and nothing is left (no shim, no mount, no process, no state)."""
    root = small_tmpfs(Path(tempfile.mkdtemp(prefix="pyshim-fault-root-", dir="/run")), remove=True)
    if fault == "full":
        fill(root)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
    options = runtime_options(containerd, tmp_path, Root=str(root))
    result = ctr("run", "--rm", *options, "--runtime", containerd.runtime, containerd.image, cid, "echo", "never")
    assert result.rc != 0 and "never" not in result.stdout
    # runc 1.1.5 loses the errno of a full disk ("unable to store init state: %!w(<nil>)")
    reasons = ("no space left on device", "unable to store init state") if fault == "full" else \
        ("read-only file system",)
    assert "create" in result.stderr and any(r in result.stderr.lower() for r in reasons), result.stderr
    ctr("container", "rm", cid)
    assert not list((root).glob("*/*")), "runc state left"


def test_bundle_dir_full_while_running(containerd, ctr, cid, small_tmpfs):
    """The filesystem of the bundles fills up under a running container: exec fails with a clear
    error and leaves nothing; the container is still served (kill, exit, delete)."""
    parent = containerd.state / "io.containerd.runtime.v2.task" / containerd.namespace
    small_tmpfs(parent)
    unclear = ""
    run = ctr("run", "-d", "--fifo-dir", fifo_dir(containerd), "--runtime", containerd.runtime, containerd.image,
              cid, "sleep", "100000")
    assert run.rc == 0, run.stderr
    try:
        containerd.wait_task_status(cid, "RUNNING")
        fill(parent)
        result = ctr("task", "exec", "--exec-id", "full", cid, "echo", "no")
        if result.rc == 0:
            assert result.stdout == "no\n"  # nothing it needed to write found the disk full
        elif "no space left on device" not in result.stderr.lower():
            unclear = result.stderr.strip()
        assert result.rc == 0 or "exec" in result.stderr, result.stderr
        assert len(containerd.task_pids(cid)) == 1, "a failed exec left a process"
        os.unlink(parent / "filler")
        assert ctr("task", "exec", "--exec-id", "room", cid, "echo", "yes") == (0, "yes\n", "")
        with containerd.events() as events:
            assert ctr("task", "kill", "-s", "KILL", cid).rc == 0
            assert events.wait_for("/tasks/exit", container_id=cid, id=cid)["exit_status"] == 137
    finally:
        (parent / "filler").unlink(missing_ok=True)
        remove(containerd, ctr, cid)
    if unclear:
        xfail_unless_pyshim(containerd, f"does not say why exec failed on a full disk: {unclear!r}")
    assert not unclear


# -- FIFOs -----------------------------------------------------------------------------------------


def test_output_fifo_whose_reader_went_away(containerd, ctr):
    """ctr (the FIFO's reader) is SIGKILLed while its container runs: a container that writes a
    little more exits normally and its exit is delivered; one that writes more than the FIFO holds
    blocks, as it would on a full pipe, and is still killed and deleted."""
    small, large = containerd.new_id("reader-gone-small"), containerd.new_id("reader-gone-large")
    with containerd.events() as events:
        procs = {}
        for cid, more in ((small, "seq 1 100"), (large, "seq 1 300000")):
            procs[cid] = containerd.ctr_popen("run", "--fifo-dir", fifo_dir(containerd), "--runtime",
                                              containerd.runtime, containerd.image, cid,
                                              "sh", "-c", f"echo started; sleep 2; {more}; exit 7")
        for proc in procs.values():
            assert proc.stdout.readline() == b"started\n"
            proc.kill()
            proc.wait()
        assert events.wait_for("/tasks/exit", container_id=small, timeout=30)["exit_status"] == 7
        time.sleep(3)
        assert containerd.tasks()[large][1] == "RUNNING"  # blocked writing, as on any full pipe
        assert ctr("task", "kill", "-s", "KILL", large).rc == 0
        assert events.wait_for("/tasks/exit", container_id=large, timeout=30)["exit_status"] == 137
    for cid in (small, large):
        began = time.monotonic()
        assert ctr("task", "rm", cid).rc == 0
        assert time.monotonic() - began < 10, "delete waited for the blocked output copy"
        assert ctr("container", "rm", cid).rc == 0


def test_exec_with_a_missing_fifo_is_refused(containerd, ctr, cid, tmp_path):
    """An Exec whose stdout FIFO does not exist (containerd makes FIFOs before it asks): refused,
    naming the field, and the container is untouched."""
    from e2e.test_confinement import exec_request, sleeper_spec
    run = ctr("run", "-d", "--fifo-dir", fifo_dir(containerd), "--runtime", containerd.runtime, containerd.image,
              cid, "sleep", "100000")
    assert run.rc == 0, run.stderr
    try:
        containerd.wait_task_status(cid, "RUNNING")
        with ShimClient(containerd, cid) as shim:
            request = exec_request(cid, "missing", sleeper_spec(containerd, cid, ["echo", "x"]),
                                   stdout=str(tmp_path / "missing-fifo"))
            try:
                shim.call("Exec", request)
                error = shim.error("Start", task_pb2.StartRequest(id=cid, exec_id="missing"))
                shim.call("Delete", task_pb2.DeleteRequest(id=cid, exec_id="missing"))
                pytest.xfail(f"{containerd.runtime} accepts the Exec and fails its Start: {error.code.name} "
                             f"{error.message}")
            except Exception as e:
                from shim.ttrpc import Code, TTRPCError
                if not isinstance(e, TTRPCError):
                    raise
                assert e.code == Code.INVALID_ARGUMENT and e.message.startswith("stdout "), e
                assert "does not exist" in e.message
        assert len(containerd.task_pids(cid)) == 1
    finally:
        remove(containerd, ctr, cid)


# -- a stopped shim, a killed containerd ---------------------------------------------------------


def test_shim_stopped_during_wait_still_delivers_the_exit(containerd, ctr, cid):
    """SIGSTOP the shim for 3 s while `ctr run` waits and the container exits meanwhile: after
    SIGCONT the exit status and the output reach ctr, and /tasks/exit is published."""
    with containerd.events() as events:
        proc = containerd.ctr_popen("run", "--rm", "--runtime", containerd.runtime, containerd.image, cid,
                                    "sh", "-c", "sleep 1; echo done; exit 5")
        containerd.wait_task_status(cid, "RUNNING", proc=proc)
        shim = shim_pid(containerd, cid)
        os.kill(shim, signal.SIGSTOP)
        try:
            time.sleep(3)  # the container exits while its shim is stopped
        finally:
            os.kill(shim, signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
        assert (proc.returncode, out, err) == (5, b"done\n", b"")
        assert events.wait_for("/tasks/exit", container_id=cid).get("exit_status") == 5


@pytest.mark.parametrize("when", ["early", "midway"])
def test_containerd_killed_while_ten_containers_start(containerd, ctr, when):
    """containerd is SIGKILLed while ten `ctr run -d` are under way, and started again: every
    container is then either running and manageable (exec, kill, its exit delivered, delete) or
    cleanly gone (the leak check: no shim, bundle, mount, runc state or cgroup left)."""
    ids = [containerd.new_id("start-storm") for _ in range(10)]
    procs = [containerd.ctr_popen("run", "-d", "--fifo-dir", fifo_dir(containerd), "--runtime", containerd.runtime,
                                  containerd.image, cid, "sleep", "100000") for cid in ids]
    if when == "early":  # shims are starting, hardly any Create has come yet
        time.sleep(0.4)
    else:  # once three run, the others are being created, started, or not yet asked for
        wait_until(lambda: sum(status == "RUNNING" for _, status in containerd.tasks().values()) >= 3, 30,
                   "three containers running")
    with containerd.killed():
        time.sleep(1)
    for proc in procs:
        proc.communicate(timeout=60)
    tasks = containerd.tasks()
    outcome = {"running": 0, "created": 0, "gone": 0}
    with containerd.events() as events:
        for cid in ids:
            status = tasks.get(cid, (0, "gone"))[1]
            if status == "RUNNING":
                assert ctr("task", "exec", "--exec-id", "check", cid, "echo", cid) == (0, f"{cid}\n", "")
            if status in ("RUNNING", "CREATED"):
                outcome[status.lower()] += 1
                assert ctr("task", "kill", "-s", "KILL", cid).rc == 0, cid
                assert events.wait_for("/tasks/exit", container_id=cid, id=cid).get("exit_status") == 137
                assert ctr("task", "rm", cid).rc == 0
            else:
                assert status == "gone", (cid, status)
                outcome["gone"] += 1
            ctr("container", "rm", cid)
    print(outcome)
    assert sum(outcome.values()) == 10 and (when == "early" or outcome["running"] >= 3), outcome
    leaks = containerd.wait_for_no_leaks()
    if leaks and containerd.runtime != PYSHIM:
        containerd.clean_leaks()
        pytest.xfail(f"{containerd.runtime} leaves behind: {'; '.join(leaks)}")
    assert not leaks, leaks
