"""The OOM watcher: v2 with a fake memory.events file, v1 with a real OOM kill."""

import logging
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shim.linux.cgroups import Cgroup
from shim.linux.oom import OOMWatcher, read_oom_kills

from live_cgroups import live_v1, rmdir_retry, v1_mount_points


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Events:
    """on_oom for the tests: queues the id, as the shim's callback does."""

    def __init__(self) -> None:
        self.q: queue.Queue[str] = queue.Queue()

    def __call__(self, container_id: str) -> None:
        self.q.put(container_id)

    def next(self, timeout: float = 5.0) -> str:
        return self.q.get(timeout=timeout)

    def none_within(self, seconds: float) -> bool:
        try:
            got = self.q.get(timeout=seconds)
        except queue.Empty:
            return True
        pytest.fail(f"unexpected OOM event for {got}")


# -- v2: a fake cgroup directory -------------------------------------------------


def write_events(path: Path, *, high: int = 0, oom: int = 0, oom_kill: int = 0) -> None:
    # One write at offset 0, same length every time and no truncation: the watcher
    # sees one IN_MODIFY and never a half-written file (the kernel's file is atomic too).
    text = (f"low {0:8d}\nhigh {high:8d}\nmax {0:8d}\noom {oom:8d}\n"
            f"oom_kill {oom_kill:8d}\noom_group_kill {0:8d}\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, text, 0)
    finally:
        os.close(fd)


def write_populated(path: Path, populated: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, f"populated {populated}\nfrozen 0\n".encode(), 0)
    finally:
        os.close(fd)


@pytest.fixture
def fake_v2(tmp_path):
    write_events(tmp_path / "memory.events")
    return Cgroup(v2_path=str(tmp_path))


@pytest.fixture
def fake_v2_populated(tmp_path):
    write_events(tmp_path / "memory.events")
    write_populated(tmp_path / "cgroup.events", 1)
    return Cgroup(v2_path=str(tmp_path))


def test_read_oom_kills(tmp_path):
    p = tmp_path / "memory.events"
    assert read_oom_kills(str(p)) is None
    write_events(p, oom_kill=4)
    assert read_oom_kills(str(p)) == 4
    p.write_text("low 0\nhigh 0\n")  # no oom_kill line: nothing to conclude
    assert read_oom_kills(str(p)) is None


def test_v2_reports_when_oom_kill_grows(fake_v2):
    before = open_fds()
    events = Events()
    w = OOMWatcher(events)
    try:
        w.add("c1", fake_v2)
        assert "c1" in w
        path = Path(fake_v2.memory_path) / "memory.events"

        write_events(path, oom=1, oom_kill=1)
        assert events.next() == "c1"

        write_events(path, high=3, oom=1, oom_kill=1)  # other counters: no event
        assert events.none_within(0.3)

        write_events(path, oom=3, oom_kill=3)  # two kills between reads: one event
        assert events.next() == "c1"
        assert events.none_within(0.3)
    finally:
        w.close()
    assert open_fds() == before


def test_v2_baseline_is_the_count_at_add(fake_v2):
    path = Path(fake_v2.memory_path) / "memory.events"
    write_events(path, oom_kill=5)
    events = Events()
    w = OOMWatcher(events)
    try:
        w.add("c1", fake_v2)
        write_events(path, high=1, oom_kill=5)
        assert events.none_within(0.3)
        write_events(path, oom_kill=6)
        assert events.next() == "c1"
    finally:
        w.close()


def test_v2_watch_ends_when_the_cgroup_goes(fake_v2):
    before = open_fds()
    events = Events()
    w = OOMWatcher(events)
    try:
        w.add("c1", fake_v2)
        os.unlink(Path(fake_v2.memory_path) / "memory.events")
        wait_until(lambda: "c1" not in w)
        assert events.none_within(0.2)
    finally:
        w.close()
    assert open_fds() == before


def test_v2_kill_that_empties_the_cgroup_is_reported_then_the_watch_ends(fake_v2_populated):
    before = open_fds()
    events = Events()
    w = OOMWatcher(events)
    try:
        w.add("c1", fake_v2_populated)
        d = Path(fake_v2_populated.memory_path)
        write_events(d / "memory.events", oom=1, oom_kill=1)
        write_populated(d / "cgroup.events", 0)
        assert events.next() == "c1"
        wait_until(lambda: "c1" not in w)
        assert events.none_within(0.2)
    finally:
        w.close()
    assert open_fds() == before


def test_v2_watch_ends_when_the_cgroup_empties(fake_v2_populated):
    events = Events()
    w = OOMWatcher(events)
    try:
        w.add("c1", fake_v2_populated)
        d = Path(fake_v2_populated.memory_path)
        write_events(d / "memory.events", high=1)  # still populated: keeps watching
        assert events.none_within(0.2)
        assert "c1" in w
        write_populated(d / "cgroup.events", 0)
        wait_until(lambda: "c1" not in w)
        assert events.none_within(0.2)
    finally:
        w.close()


def test_v2_two_ids_on_one_cgroup_newest_wins(fake_v2_populated):
    events = Events()
    w = OOMWatcher(events)
    try:
        w.add("old", fake_v2_populated)
        w.add("new", fake_v2_populated)
        assert "old" not in w and "new" in w
        write_events(Path(fake_v2_populated.memory_path) / "memory.events", oom_kill=1)
        assert events.next() == "new"
        assert events.none_within(0.2)
    finally:
        w.close()


def test_v2_remove_stops_events(fake_v2, tmp_path_factory):
    other_dir = tmp_path_factory.mktemp("other")
    write_events(other_dir / "memory.events")
    other = Cgroup(v2_path=str(other_dir))
    events = Events()
    w = OOMWatcher(events)
    try:
        w.add("c1", fake_v2)
        w.add("c2", other)
        w.remove("c1")
        w.remove("c1")  # twice is fine
        assert "c1" not in w and "c2" in w
        write_events(Path(fake_v2.memory_path) / "memory.events", oom_kill=1)
        write_events(other_dir / "memory.events", oom_kill=1)
        assert events.next() == "c2"
        assert events.none_within(0.3)
    finally:
        w.close()


def test_callback_exceptions_are_logged_and_the_thread_survives(fake_v2, caplog):
    caplog.set_level(logging.ERROR, logger="shim.linux.oom")
    events = Events()
    calls = []

    def on_oom(container_id: str) -> None:
        calls.append(container_id)
        if len(calls) == 1:
            raise RuntimeError("boom")
        events(container_id)

    w = OOMWatcher(on_oom)
    try:
        w.add("c1", fake_v2)
        path = Path(fake_v2.memory_path) / "memory.events"
        write_events(path, oom_kill=1)
        wait_until(lambda: calls == ["c1"])
        write_events(path, oom_kill=2)
        assert events.next() == "c1"
    finally:
        w.close()
    assert any(r.name == "shim.linux.oom" and r.exc_info and "boom" in str(r.exc_info[1])
               for r in caplog.records)


def test_close_from_the_callback(fake_v2):
    before = open_fds()
    holder: list[OOMWatcher] = []
    w = OOMWatcher(lambda cid: holder[0].close())
    holder.append(w)
    w.add("c1", fake_v2)
    write_events(Path(fake_v2.memory_path) / "memory.events", oom_kill=1)
    w._thread.join(5)
    assert not w._thread.is_alive()
    assert open_fds() == before
    w.close()  # again, from outside: a no-op
    with pytest.raises(RuntimeError):
        w.add("c2", fake_v2)


def test_add_errors_leave_nothing_open(tmp_path):
    events = Events()
    w = OOMWatcher(events)
    try:
        before = open_fds()
        with pytest.raises(FileNotFoundError):
            w.add("c1", Cgroup(v2_path=str(tmp_path / "gone")))
        with pytest.raises(ValueError):
            w.add("c2", Cgroup(v1_paths={"pids": str(tmp_path)}))  # no memory controller
        with pytest.raises(OSError):
            w.add("c3", Cgroup(v1_paths={"memory": str(tmp_path)}))  # not a memory cgroup
        assert "c1" not in w and "c2" not in w and "c3" not in w
        assert open_fds() == before
    finally:
        w.close()


# -- v1: a real memory cgroup on this machine -------------------------------------------










@pytest.fixture
def memory_cgroup():
    path = os.path.join(v1_mount_points()["memory"], f"pyshim-test-oom-{os.getpid()}")
    os.mkdir(path)
    try:
        yield path
    finally:
        rmdir_retry(path)
    assert not os.path.exists(path)


@live_v1
def test_live_v1_oom_kill(memory_cgroup):
    limit = str(8 << 20)
    Path(memory_cgroup, "memory.limit_in_bytes").write_text(limit)
    memsw = Path(memory_cgroup, "memory.memsw.limit_in_bytes")
    if memsw.exists():
        memsw.write_text(limit)  # no escaping into swap
    before = open_fds()
    events = Events()
    w = OOMWatcher(events)
    child = None
    try:
        w.add("oom-ctr", Cgroup(v1_paths={"memory": memory_cgroup}))
        # Touch every page of 64 MiB, eight times the limit.
        hog = "b = bytearray(64 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
        child = subprocess.Popen(
            ["sh", "-c", 'echo $$ > "$1/cgroup.procs" && exec "$2" -c "$3"', "sh",
             memory_cgroup, sys.executable, hog])
        assert events.next(timeout=10) == "oom-ctr"
        assert child.wait(timeout=10) == -signal.SIGKILL
        child = None
        oom = Path(memory_cgroup, "memory.oom_control").read_text()
        assert "oom_kill 0" not in oom
    finally:
        if child is not None:
            child.kill()
            child.wait()
        w.remove("oom-ctr")
        w.close()
    assert open_fds() == before


@live_v1
def test_live_v1_removed_cgroup_is_dropped_silently(memory_cgroup):
    events = Events()
    w = OOMWatcher(events)
    try:
        before = open_fds()
        w.add("gone", Cgroup(v1_paths={"memory": memory_cgroup}))
        assert open_fds() != before  # the eventfd
        # Removing the cgroup fires the eventfd too; that must not read as an OOM.
        os.rmdir(memory_cgroup)
        wait_until(lambda: "gone" not in w)
        assert events.none_within(0.3)
        assert open_fds() == before
    finally:
        w.close()


def test_watches_added_before_the_thread_starts_report_once_it_runs(fake_v2):
    # The daemon adds a container's watch in Create, possibly before it has started the
    # watcher's thread (it starts it once the ttrpc server accepts).
    before = open_fds()
    events = Events()
    w = OOMWatcher(events, start=False)
    try:
        w.add("c1", fake_v2)
        write_events(Path(fake_v2.memory_path) / "memory.events", oom=1, oom_kill=1)
        assert events.none_within(0.3)  # nobody reads yet
        w.start()
        assert events.next() == "c1"
    finally:
        w.close()
    assert open_fds() == before


def test_a_watcher_never_started_closes_cleanly(fake_v2):
    before = open_fds()
    w = OOMWatcher(Events(), start=False)
    w.add("c1", fake_v2)
    w.close()
    assert open_fds() == before
