"""The reaper: spawned commands get their own exit status, every other child goes to
on_exit, nothing is left a zombie, and wake()/SIGCHLD make run() look again at once.

run() runs in the main thread, as in the daemon (signal handlers only run there); the
commands are started by a helper thread, as request handlers do. Each test that reaps
runs in a forked child of pytest's process, whose only children are the test's own.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

import pytest

from shim.linux.reaper import Child, Reaper, exit_code

DEADLINE = 5.0  # only reached when something is broken; a passing test takes far less


class Exits:
    """on_exit for the tests: records (pid, code, time) and wakes the loop, as the
    daemon's exit queue lets its stop condition be looked at again."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, float]] = []
        self.lock = threading.Lock()
        self.wake: Callable[[], None] = lambda: None

    def __call__(self, pid: int, code: int, when: float) -> None:
        with self.lock:
            self.seen.append((pid, code, when))
        self.wake()

    def pids(self) -> set[int]:
        with self.lock:
            return {pid for pid, _, _ in self.seen}


def children() -> set[int]:
    pids: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except FileNotFoundError:  # a thread that ended since the listing has no children left
            pass
    return pids


@contextlib.contextmanager
def sigchld_to(reaper: Reaper) -> Iterator[Reaper]:
    """The reaper with SIGCHLD routed to it; the previous handler and wake-up fd are put
    back afterwards."""
    assert threading.current_thread() is threading.main_thread()
    old_handler = signal.getsignal(signal.SIGCHLD)
    old_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(old_fd)
    try:
        reaper.install()
        yield reaper
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGCHLD, old_handler)


REAPER_ARGS = {"reaper", "installed", "exits"}


def own_process(test: Callable[..., None]) -> Callable[..., None]:
    """Run the test in a forked child of the test process, with its reaper made there:
    `reaper` (a Reaper whose on_exit records into `exits`) and `installed` (the same,
    with SIGCHLD routed to it). waitpid(-1) in pytest's own process would also take the
    children of whatever else runs there, such as the end-to-end session's containerd
    when the suites run together; in the child it sees only the test's own."""
    wanted = REAPER_ARGS & set(inspect.signature(test).parameters)

    def in_child(fixtures: dict[str, object]) -> None:
        assert not children(), "the test process's children came along"
        exits = Exits()
        reaper = Reaper(exits)
        exits.wake = reaper.wake
        made = {"reaper": reaper, "installed": reaper, "exits": exits}
        with contextlib.ExitStack() as stack:
            if "installed" in wanted:
                stack.enter_context(sigchld_to(reaper))
            test(**fixtures, **{name: made[name] for name in wanted})
            reaper.reap()
            assert not children(), "the test left children behind"

    @functools.wraps(test)
    def run(**fixtures: object) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report a failure on w, then exit without cleanup
            code = 0
            try:
                os.close(r)
                in_child(fixtures)
            except BaseException:
                os.write(w, traceback.format_exc().encode())
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        report = b""
        try:
            deadline = time.monotonic() + 6 * DEADLINE
            while select.select([r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                report += chunk
            else:
                os.kill(pid, signal.SIGKILL)
        finally:
            os.close(r)
            _, status = os.waitpid(pid, 0)
        if status != 0:
            pytest.fail(report.decode(errors="replace") or f"test process: status {status}",
                        pytrace=False)

    params = [p for name, p in inspect.signature(test).parameters.items()
              if name not in REAPER_ARGS]
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return run


def run_until(reaper: Reaper, done: Callable[[], bool], timeout: float = DEADLINE) -> float:
    """reaper.run() in this (the main) thread until done(); returns the seconds it took."""
    start = time.monotonic()
    reaper.run(lambda: done() or time.monotonic() - start > timeout)
    elapsed = time.monotonic() - start
    assert done(), f"not done after {elapsed:.1f}s"
    return elapsed


class Helper(threading.Thread):
    """Runs `work` beside the reaper loop, as a request handler does, and wakes the loop
    when done (also on failure), so that its stop condition is looked at again."""

    def __init__(self, reaper: Reaper, work: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.reaper, self.work = reaper, work
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.work()
        except BaseException as e:  # handed to the test by check()
            self.error = e
        finally:
            self.done.set()
            self.reaper.wake()

    def check(self) -> None:
        self.join(DEADLINE)
        if self.error is not None:
            raise self.error


def outside_child(script: str) -> int:
    """A child started without the reaper's spawn, as runc leaves container processes:
    no Popen object waits for it."""
    return os.posix_spawn("/bin/sh", ["sh", "-c", script], os.environ)


def assert_reaped(pid: int) -> None:
    """The pid is no child of ours any more: no zombie left (a zombie would still be
    waitable)."""
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# -- exit_code ------------------------------------------------------------------------


@pytest.mark.parametrize("status,code", [
    (0, 0), (3 << 8, 3), (255 << 8, 255),
    (signal.SIGKILL, 137), (signal.SIGTERM, 143),
    (signal.SIGSEGV | 0x80, 128 + signal.SIGSEGV),  # core dumped
])
def test_exit_code_is_the_status_or_128_plus_the_signal(status, code):
    assert exit_code(status) == code


# -- spawned commands -------------------------------------------------------------------


@own_process
def test_spawned_commands_get_their_own_exit_code(installed, exits):
    scripts = {"exit 0": 0, "exit 3": 3, "exit 255": 255, "kill -TERM $$": 143,
               "kill -KILL $$": 137}
    children: dict[str, Child] = {}
    codes: dict[str, int] = {}

    def work() -> None:
        for script in scripts:
            children[script] = installed.spawn(["/bin/sh", "-c", script])
        for script, child in children.items():
            codes[script] = child.wait(DEADLINE)

    helper = Helper(installed, work)
    run_until(installed, helper.done.is_set)
    helper.check()
    assert codes == scripts
    for script, child in children.items():
        # Popen knows too, so its finalizer never waits for a pid now somebody else's.
        assert child.popen.returncode == scripts[script]
        assert child.code == scripts[script]
        assert_reaped(child.pid)
    assert exits.seen == []  # none of them went to on_exit


@own_process
def test_a_spawned_command_passes_popen_arguments_on(installed, tmp_path):
    out: list[bytes] = []

    def work() -> None:
        child = installed.spawn(["/bin/sh", "-c", "pwd; echo $X"], cwd=tmp_path,
                                env={"X": "from env"}, stdout=subprocess.PIPE)
        assert child.popen.stdout is not None
        out.append(child.popen.stdout.read())
        child.popen.stdout.close()
        assert child.wait(DEADLINE) == 0

    helper = Helper(installed, work)
    run_until(installed, helper.done.is_set)
    helper.check()
    assert out == [f"{tmp_path}\nfrom env\n".encode()]


@own_process
def test_wait_times_out_while_the_command_runs(reaper):
    child = reaper.spawn(["/bin/sleep", "5"])
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=str(child.pid)):
            child.wait(0.1)
        assert time.monotonic() - start < 1.0
        assert child.code is None
    finally:
        os.kill(child.pid, signal.SIGKILL)
        os.waitpid(child.pid, 0)  # not through the reaper: it is not running


@own_process
def test_many_spawns_racing_the_loop_are_never_taken_for_other_children(installed, exits):
    # spawn registers the child before the loop can reap it; otherwise a fast exit
    # would go to on_exit and its waiter would hang.
    codes: dict[int, int] = {}

    def work(base: int) -> None:
        for n in range(base, base + 10):
            codes[n] = installed.spawn(["/bin/sh", "-c", f"exit {n}"]).wait(DEADLINE)

    helpers = [Helper(installed, lambda b=b: work(b)) for b in (1, 11, 21)]
    run_until(installed, lambda: all(h.done.is_set() for h in helpers))
    for h in helpers:
        h.check()
    assert codes == {n: n for n in range(1, 31)}
    assert exits.seen == []


# -- other children -------------------------------------------------------------------


@own_process
def test_other_children_go_to_on_exit_with_pid_code_and_time(installed, exits):
    before = time.time()
    pids = {outside_child("exit 7"): 7, outside_child("kill -KILL $$"): 137,
            outside_child("sleep 0.05; exit 0"): 0}
    run_until(installed, lambda: exits.pids() == set(pids))
    after = time.time()
    assert {pid: code for pid, code, _ in exits.seen} == pids
    assert len(exits.seen) == 3  # each exit reported once
    for _, _, when in exits.seen:
        assert before <= when <= after
    for pid in pids:
        assert_reaped(pid)


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@own_process
def test_one_reap_takes_every_child_that_has_exited(reaper, exits):
    pids = [outside_child(f"exit {n}") for n in (1, 2, 3)]
    deadline = time.monotonic() + DEADLINE
    while any(proc_state(pid) != "Z" for pid in pids):  # all exited, none reaped yet
        assert time.monotonic() < deadline
        time.sleep(0.01)
    reaper.reap()
    assert len(exits.seen) == 3
    assert {pid: code for pid, code, _ in exits.seen} == dict(zip(pids, (1, 2, 3), strict=True))
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")
        assert_reaped(pid)


@own_process
def test_spawned_and_other_children_are_told_apart(installed, exits):
    outside = outside_child("sleep 0.05; exit 9")
    codes: list[int] = []
    helper = Helper(installed, lambda: codes.append(
        installed.spawn(["/bin/sh", "-c", "exit 4"]).wait(DEADLINE)))
    run_until(installed, lambda: helper.done.is_set() and exits.pids() == {outside})
    helper.check()
    assert codes == [4]
    assert [(pid, code) for pid, code, _ in exits.seen] == [(outside, 9)]


def test_orphaned_grandchildren_of_a_subreaper_go_to_on_exit():
    # The container case: runc's child is re-parented to the shim when runc exits.
    # In a process of its own, as becoming a subreaper cannot be undone.
    script = r"""
import os, sys, threading
from shim.linux.reaper import Reaper, set_child_subreaper
set_child_subreaper()
seen = []
r = Reaper(lambda pid, code, when: (seen.append((pid, code)), r.wake()))
r.install()
read, write = os.pipe()
# "runc": forks the container process, reports its pid, exits at once.
runc = r.spawn(["/bin/sh", "-c", "(sleep 0.1; exit 42) & echo $!"], stdout=write)
os.close(write)
grandchild = int(os.read(read, 64))
threading.Thread(target=lambda: (runc.wait(5), r.wake()), daemon=True).start()
r.run(lambda: len(seen) == 1)
print(runc.code, grandchild, seen)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=10)
    assert result.returncode == 0, result.stderr
    runc_code, grandchild, seen = result.stdout.split(" ", 2)
    assert runc_code == "0"
    assert seen.strip() == f"[({grandchild}, 42)]"


# -- waking the loop ------------------------------------------------------------------


@own_process
def test_wake_makes_run_check_its_stop_condition_at_once(reaper):
    # Without a wake-up the loop looks again only after its 1 s poll.
    helper = Helper(reaper, lambda: time.sleep(0.05))  # then wake()
    elapsed = run_until(reaper, helper.done.is_set)
    helper.check()
    assert elapsed < 0.5


@own_process
def test_repeated_wakes_never_block_the_waker_and_the_loop_drains_them(reaper):
    # The wake-up pipe is non-blocking: a full pipe must not stop a handler.
    start = time.monotonic()
    for _ in range(100_000):
        reaper.wake()
    assert time.monotonic() - start < 2.0
    checks = iter([False, True])  # one turn of the loop
    assert run_until(reaper, lambda: next(checks, True)) < 0.5
    with pytest.raises(BlockingIOError):
        os.read(reaper._wake_r, 1)  # drained: the next poll waits again


@own_process
def test_sigchld_wakes_run_once_installed(installed, exits):
    start = time.time()
    pid = outside_child("sleep 0.05; exit 5")
    elapsed = run_until(installed, lambda: bool(exits.seen))
    [(reaped, code, when)] = exits.seen
    assert (reaped, code) == (pid, 5)
    # Reaped at once, not after the loop's 1 s poll: SIGCHLD woke it.
    assert when - start < 0.5
    assert elapsed < 0.5


@own_process
def test_install_routes_sigchld_to_the_wake_up_pipe(reaper):
    old_handler = signal.getsignal(signal.SIGCHLD)
    old_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(old_fd)
    try:
        reaper.install()
        assert signal.getsignal(signal.SIGCHLD) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        assert signal.set_wakeup_fd(old_fd) == reaper._wake_w
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGCHLD, old_handler)
    assert signal.getsignal(signal.SIGCHLD) == old_handler
