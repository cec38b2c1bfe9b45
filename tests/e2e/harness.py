"""End-to-end test harness: a private containerd per test session, ctr helpers, leak detection.

The fixtures in tests/conftest.py build on `TestContainerd`, a
`PrivateContainerd` (scripts/private_containerd.py) that also knows the
runtime and image under test, and can tell and clean up what a test leaked.

Settings (environment):
    PYSHIM_TEST_RUNTIME    runtime for `ctr run --runtime` (default io.containerd.pyshim.v1)
    CONTAINERD_BIN         containerd binary (default: `containerd` on PATH)
    CTR_BIN                ctr binary (default: the `ctr` beside CONTAINERD_BIN, else on PATH)
    PYSHIM_TEST_LOG_LEVEL  containerd log level (default debug; the shim then gets -debug)
    PYSHIM_SHIM_DIR        directory put first on containerd's PATH, holding the shim under test
                           (default: this interpreter's bin directory, the development venv's);
                           scripts/test.sh points it at a venv with the built wheel installed
"""
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
from build_image import DEFAULT_REF, build_image  # noqa: E402
from private_containerd import (RUNC_V2_ROOT, PrivateContainerd, mounts_under, namespace_cgroups,  # noqa: E402
                                shim_binary_name, unmount_under)

DEFAULT_RUNTIME = "io.containerd.pyshim.v1"
# Which containerd a test uses, and where its log stood when the test began: the root
# conftest adds that part of the log to the report of a failed test.
TEST_CONTAINERD = pytest.StashKey["TestContainerd"]()
LOG_OFFSET = pytest.StashKey[int]()


def watch_log(node, containerd):
    """Report `containerd`'s log lines from now on if test `node` fails."""
    node.stash[TEST_CONTAINERD] = containerd
    node.stash[LOG_OFFSET] = containerd.log_path.stat().st_size


def log_section(item):
    """The log lines of the containerd the test used, or None if it used none."""
    if TEST_CONTAINERD not in item.stash:
        return None
    return item.stash[TEST_CONTAINERD].log_tail(200, offset=item.stash[LOG_OFFSET]) or "(empty)"


SETTLE_SECONDS = 10.0  # how long processes and mounts may take to go away after a test


def session_containerd(cls, prefix):
    """For a session fixture: a started `cls` (TestContainerd or a subclass) in a new work
    directory, shut down (leaks checked) when the session ends, or at once if it fails to
    start. Use as `yield from session_containerd(...)`."""
    s = settings()
    instance = cls(tempfile.mkdtemp(prefix=prefix), s["runtime"], containerd=s["containerd"],
                   ctr=s["ctr"], log_level=s["log_level"])
    try:
        instance.start()
    except BaseException:
        instance.shutdown()
        raise
    yield instance
    instance.shutdown()


def settings():
    containerd = os.environ.get("CONTAINERD_BIN") or "containerd"
    ctr = os.environ.get("CTR_BIN")
    if not ctr:
        beside = Path(containerd).parent / "ctr"
        ctr = str(beside) if "/" in containerd and beside.exists() else "ctr"
    return {
        "runtime": os.environ.get("PYSHIM_TEST_RUNTIME") or DEFAULT_RUNTIME,
        "containerd": containerd,
        "ctr": ctr,
        "log_level": os.environ.get("PYSHIM_TEST_LOG_LEVEL") or "debug",
        "shim_dir": shim_dir(),
    }


def shim_dir():
    """Where containerd finds the shim under test: $PYSHIM_SHIM_DIR, else this venv's bin."""
    return os.environ.get("PYSHIM_SHIM_DIR") or sysconfig.get_path("scripts")


class TestContainerd(PrivateContainerd):
    """The session's containerd: private dirs under `workdir`, its own namespace, PATH = the shim's
    directory first (shim_dir(): so it finds containerd-shim-pyshim-v1), the busybox image imported."""

    __test__ = False  # not a pytest test class

    def __init__(self, workdir, runtime, containerd="containerd", ctr="ctr", log_level="debug"):
        # A namespace of its own keeps runc state (/run/containerd/runc/<ns>) and cgroups
        # (<hierarchy>/<ns>/<id>) apart from every other containerd on the machine.
        # PATH: the venv's bin (the shim under test), then the directory of a containerd given by path,
        # so that a 1.7/2.x build finds its own containerd-shim-runc-v2 before the system's.
        path_prefix = [shim_dir()] + ([str(Path(containerd).parent)] if "/" in containerd else [])
        super().__init__(workdir, containerd=containerd, ctr=ctr, path_prefix=path_prefix,
                         namespace="pyshim-test-" + uuid.uuid4().hex[:8], log_level=log_level, restartable=True)
        self.runtime = runtime
        self.image = DEFAULT_REF
        self.owned_namespaces = [self.namespace]
        self._ids = 0

    def start(self, timeout=30.0):
        shim = shim_binary_name(self.runtime)
        if shutil.which(shim, path=self.environ()["PATH"]) is None:
            raise RuntimeError(f"{shim} (runtime {self.runtime}) is not on containerd's PATH "
                               f"{self.environ()['PATH']}; run scripts/setup.sh")
        super().start(timeout)
        archive = self.workdir / "busybox.oci.tar"
        build_image(str(archive))
        self.import_image(archive)
        return self

    def new_id(self, hint="c"):
        """A container id unique in this session, readable in logs: `<hint>-<n>`."""
        self._ids += 1
        return f"{re.sub(r'[^A-Za-z0-9]+', '-', hint)[:40].strip('-') or 'c'}-{self._ids}"

    # -- tasks --------------------------------------------------------------------------------

    def tasks(self, namespace=None):
        """{task id: (pid, status)} from `ctr task ls`."""
        result = self.ctr("task", "ls", namespace=namespace, timeout=30)
        assert result.rc == 0, f"ctr task ls failed: {result.stderr}"
        rows = [line.split() for line in result.stdout.splitlines()[1:]]
        return {row[0]: (int(row[1]), row[2]) for row in rows if len(row) == 3}

    def wait_task_status(self, container_id, status, timeout=30.0, proc=None, namespace=None):
        """Poll `ctr task ls` until the task has `status` (e.g. RUNNING); return its pid.
        `proc`: the ctr process that creates the task; fail early if it exits."""
        deadline = time.monotonic() + timeout
        while True:
            task = self.tasks(namespace).get(container_id)
            if task and task[1] == status:
                return task[0]
            if proc is not None and proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"ctr exited with {proc.returncode} before task {container_id} was {status}: "
                                     f"stdout={out!r} stderr={err!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"task {container_id} not {status} within {timeout}s: {task}")
            time.sleep(0.02)

    def task_pids(self, container_id, namespace=None):
        """The pids `ctr task ps` lists for a task."""
        result = self.ctr("task", "ps", container_id, namespace=namespace, timeout=30)
        assert result.rc == 0, f"ctr task ps {container_id} failed: {result.stderr}"
        return [int(line.split()[0]) for line in result.stdout.splitlines()[1:] if line.strip()]

    def wait_task_pids(self, container_id, count, timeout=30.0, namespace=None):
        """Poll `ctr task ps` until the task has `count` processes; return their pids."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.task_pids(container_id, namespace)
            if len(pids) == count:
                return pids
            if time.monotonic() > deadline:
                raise AssertionError(f"task {container_id} has pids {pids}, not {count} processes, after {timeout}s")
            time.sleep(0.02)

    def events(self):
        """An `EventWatcher` on this containerd (use as a context manager)."""
        return EventWatcher(self)

    # -- leaks --------------------------------------------------------------------------------

    def find_leaks(self, allow_idle_zygote=True):
        """What is left that a finished test should not leave, one line per item.

        pyshim's zygote (shim/binary/zygote.py) outlives a test by design, but only while idle:
        it exits on its own a few seconds after its last shim, so between tests it is
        allowed when it has no children; at the end of the session it must be gone."""
        if not self.running():
            return [self._not_running()] + self.host_leftovers()
        leaks = []
        for proc in psutil.Process(self.process.pid).children(recursive=True):
            if proc.pid == self.containerd_pid:
                continue
            if allow_idle_zygote and _is_idle_zygote(proc, self.process.pid):
                continue
            try:
                leaks.append(f"process {proc.pid} (parent {proc.ppid()}, {proc.status()}): "
                             f"{' '.join(proc.cmdline()) or proc.name()}")
            except psutil.NoSuchProcess:
                pass
        for namespace in self.ctr("namespaces", "ls", "-q", timeout=30).stdout.split():
            for container in self.ctr("containers", "ls", "-q", namespace=namespace, timeout=30).stdout.split():
                leaks.append(f"container {namespace}/{container} still exists in containerd")
        return leaks + self.host_leftovers()

    def host_leftovers(self):
        """What find_leaks() reports that outlives containerd: bundles, mounts, runc state, cgroups."""
        leaks = [f"bundle left: {p}" for p in sorted(self.state.glob("io.containerd.runtime.v2.task/*/*"))]
        leaks += [f"mount left: {m}" for m in mounts_under(self.workdir)]
        for namespace in self.owned_namespaces:
            runc_root = RUNC_V2_ROOT / namespace
            if runc_root.is_dir():
                leaks += [f"runc state left: {p}" for p in sorted(runc_root.iterdir())]
            for cgroup in namespace_cgroups(namespace):
                leaks += [f"cgroup left: {p}" for p in sorted(cgroup.iterdir()) if p.is_dir()]
        return leaks

    def _not_running(self):
        return f"containerd is not running (subreaper exit status {self.process and self.process.poll()})"

    def wait_for_no_leaks(self, settle=SETTLE_SECONDS, allow_idle_zygote=True):
        """find_leaks() polled for up to `settle` seconds (shims may still be exiting); the last answer."""
        deadline = time.monotonic() + settle
        while True:
            leaks = self.find_leaks(allow_idle_zygote)
            if not leaks or time.monotonic() > deadline or not self.running():
                return leaks
            time.sleep(0.05)

    def clean_leaks(self):
        """Remove what find_leaks() reports, so that the next test starts clean."""
        if self.running():
            for namespace in self.ctr("namespaces", "ls", "-q", timeout=30).stdout.split():
                for task in self.tasks(namespace):
                    self.ctr("task", "rm", "-f", task, namespace=namespace, timeout=30)
                for container in self.ctr("containers", "ls", "-q", namespace=namespace, timeout=30).stdout.split():
                    self.ctr("containers", "rm", container, namespace=namespace, timeout=30)
            _kill_and_wait([p for p in psutil.Process(self.process.pid).children(recursive=True)
                            if p.pid != self.containerd_pid])
        unmount_under(self.workdir)
        for bundle in self.state.glob("io.containerd.runtime.v2.task/*/*"):
            shutil.rmtree(bundle, ignore_errors=True)
        for namespace in self.owned_namespaces:
            runc_root = RUNC_V2_ROOT / namespace
            for state in runc_root.iterdir() if runc_root.is_dir() else ():
                subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", state.name],
                               capture_output=True, timeout=30)
                shutil.rmtree(state, ignore_errors=True)
            for cgroup in namespace_cgroups(namespace):
                for child in cgroup.iterdir():
                    if child.is_dir():
                        _remove_cgroup(child)

    def check_leaks(self, settle=SETTLE_SECONDS):
        """Raise AssertionError naming every leak (after cleaning them up)."""
        leaks = self.wait_for_no_leaks(settle)
        if leaks:
            self.clean_leaks()
            raise AssertionError("leaked:\n  " + "\n  ".join(leaks))

    def shutdown(self):
        """End of session: check for leaks, stop containerd, clean up everything, remove workdir.
        Raises AssertionError if anything had leaked (found before, while or after stopping)."""
        if self.running():
            leaks = self.wait_for_no_leaks(allow_idle_zygote=False)
            if leaks:
                self.clean_leaks()
        else:
            leaks = [self._not_running()]
        leaks += self.stop()  # the processes the subreaper had to kill
        after = self.host_leftovers()
        if after:
            leaks += [f"{line} (after containerd stopped)" for line in after]
            self.clean_leaks()
        self.cleanup(self.owned_namespaces)
        for namespace in self.owned_namespaces:
            leaks += [f"could not remove {p}" for p in [RUNC_V2_ROOT / namespace, *namespace_cgroups(namespace)]
                      if p.exists()]
        if leaks:
            kept = self.workdir.with_name(self.workdir.name + ".containerd.log")
            shutil.copy(self.log_path, kept)
            leaks.append(f"(containerd log kept in {kept})")
        shutil.rmtree(self.workdir, ignore_errors=True)
        if leaks:
            raise AssertionError("leaked at the end of the session:\n  " + "\n  ".join(leaks))


def _is_idle_zygote(proc, subreaper_pid):
    """An idle zygote, or its spare daemon (which serves nobody yet)."""
    try:
        if command_line(proc)[-1:] == ["spare"]:
            return _is_idle_zygote(psutil.Process(proc.ppid()), subreaper_pid)
        return (command_line(proc)[-1:] == ["zygote"] and proc.ppid() == subreaper_pid
                and all(command_line(child)[-1:] == ["spare"] for child in proc.children()))
    except psutil.NoSuchProcess:
        return True


def command_line(proc):
    """proc.cmdline() without the empty words of a command line rewritten in place (a
    zygote's and its daemons' are, see shim/binary/zygote.py)."""
    return [word for word in proc.cmdline() if word]


def _kill_and_wait(procs, timeout=10.0):
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    # the subreaper reaps them; wait until they are gone, zombies included
    deadline = time.monotonic() + timeout
    while any(p.is_running() and _status(p) != "gone" for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)


def _status(proc):
    try:
        return proc.status()
    except psutil.NoSuchProcess:
        return "gone"


def _remove_cgroup(path, timeout=5.0):
    """Kill the processes of a cgroup (and its children), then remove it."""
    deadline = time.monotonic() + timeout
    for child in path.iterdir():
        if child.is_dir():
            _remove_cgroup(child, timeout)
    while True:
        try:
            for pid in (path / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)


class EventWatcher:
    """`ctr events` running in the background.

        with containerd.events() as events:
            ctr("task", "kill", cid)
            exit_event = events.wait_for("/tasks/exit", container_id=cid)
        assert exit_event.get("exit_status", 0) == 143   # protobuf JSON omits zero values

    Entering waits until the subscription is live (a namespace label round trip).
    """

    SYNC_LABEL = "pyshim.test.sync"
    LINE = re.compile(r"^\S+ \S+ \S+ \S+ (?P<namespace>\S+) (?P<topic>/\S+) ?(?P<data>.*)$")

    def __init__(self, containerd):
        self.containerd = containerd
        self.proc = None
        self.lines = queue.Queue()
        self.seen = []

    def __enter__(self):
        self.proc = self.containerd.ctr_popen("events", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        threading.Thread(target=self._read, daemon=True).start()
        # Events published before the subscription is live are never delivered: label the namespace
        # until one of the labels comes back as an event.
        tokens = set()
        deadline = time.monotonic() + 20
        while True:
            token = uuid.uuid4().hex
            tokens.add(token)
            result = self.containerd.ctr("namespaces", "label", self.containerd.namespace, f"{self.SYNC_LABEL}={token}")
            assert result.rc == 0, result.stderr
            try:
                self.wait_for("/namespaces/update", timeout=0.2, name=self.containerd.namespace,
                              where=lambda data: data.get("labels", {}).get(self.SYNC_LABEL) in tokens)
                break
            except AssertionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()
        self.containerd.ctr("namespaces", "label", self.containerd.namespace, self.SYNC_LABEL)

    def _read(self):
        for raw in self.proc.stdout:
            match = self.LINE.match(raw.decode(errors="replace").rstrip("\n"))
            if match:
                try:
                    data = json.loads(match["data"]) if match["data"] else {}
                except json.JSONDecodeError:
                    data = {"raw": match["data"]}
                self.lines.put((match["namespace"], match["topic"], data))
        self.lines.put(None)

    def wait_for(self, topic, timeout=30.0, namespace=None, where=None, **fields):
        """The first event (its JSON payload) on `topic` whose payload has all `fields` (and for
        which `where(payload)` is true, if given)."""
        def matches(event):
            ns, event_topic, data = event
            return (event_topic == topic and (namespace is None or ns == namespace)
                    and all(data.get(k) == v for k, v in fields.items()) and (where is None or where(data)))

        for event in self.seen:
            if matches(event):
                return event[2]
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {topic} event with {fields} within {timeout}s; saw {self.seen}") from None
            if event is None:
                self.lines.put(None)  # every later wait fails at once too
                raise AssertionError(f"ctr events ended before a {topic} event with {fields}; saw {self.seen}")
            self.seen.append(event)
            if matches(event):
                return event[2]
