"""Terminals: `ctr run -t` and `ctr task exec -t`, run on a pty the test holds (terminal.py).

runc hands the shim the pty master over the console socket; the shim copies it to ctr's FIFO and
ctr to its own terminal. Inside the container the terminal's line discipline turns "\\n" into
"\\r\\n"; ctr's terminal passes that on unchanged, so it is what the test reads.
"""
import re
import time

import pytest

from e2e.shimapi import ShimClient
from e2e.tasks import remove, run_detached, xfail_unless_pyshim
from e2e.terminal import WAIT_FOR_SIZE, PtyCtr
from shim.api import task_pb2

SIZE = re.compile(rb"(?:(\d+) (\d+)|stty: [^\r\n]*)\r\n")  # `stty size`; busybox fails on a 0x0 terminal


@pytest.fixture
def sleeper(containerd, ctr, cid):
    run_detached(containerd, ctr, cid, "sleep", "1000")
    yield cid
    remove(containerd, ctr, cid)


def run_tty(containerd, cid, *command, **size):
    return PtyCtr(containerd, "run", "-t", "--rm", "--runtime", containerd.runtime, containerd.image, cid, *command,
                  **size)


def say(term, command, pattern, timeout=30.0):
    """Type a command line into the shell on the terminal; the match of `pattern` in what follows."""
    start = len(term.output)
    term.write(command + b"\n")
    return term.expect(pattern, timeout, start=start)


def terminal_size(term):
    """(rows, columns) of the terminal of the shell on `term`; (0, 0) before ctr has sized it."""
    rows, cols = say(term, b"stty size", SIZE).groups()
    return (int(rows), int(cols)) if rows else (0, 0)


def wait_for_size(term, rows, cols, timeout=10.0, resize=False):
    """Ask `stty size` until the shell's terminal has the size (ctr forwards resizes asynchronously).
    `resize`: resize ctr's terminal to it meanwhile, again and again, as a terminal emulator does
    while the user drags its window: ctr only listens for SIGWINCH once its own first resize after
    Start is done, and a SIGWINCH before that is lost."""
    term.expect(rb"# ")  # the shell's prompt: input typed before it may be lost
    deadline = time.monotonic() + timeout
    while True:
        if resize:
            term.resize(rows, cols)
        size = terminal_size(term)
        if size == (rows, cols) or time.monotonic() > deadline:
            return size
        time.sleep(0.05)


def test_run_with_a_terminal(containerd, ctr, cid):
    # Exits at once, usually before ctr sends the terminal's size: that ResizePty must not fail
    # (ctr would print its error on the terminal).
    with run_tty(containerd, cid, "sh", "-c", "tty; [ -t 0 ] && [ -t 1 ] && echo all-tty; exit 3") as term:
        assert term.wait() == 3
    assert term.output == b"/dev/pts/0\r\nall-tty\r\n"


def test_exec_with_a_terminal(containerd, sleeper):
    with PtyCtr(containerd, "task", "exec", "-t", "--exec-id", "tty", sleeper, "sh", "-c",
                f"[ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo all-tty; echo err >&2; {WAIT_FOR_SIZE} exit 4") as term:
        assert term.wait() == 4
    assert term.output == b"all-tty\r\nerr\r\n"  # stderr shares the terminal


def test_1000_lines_through_a_tty_arrive_in_order(containerd, ctr, cid):
    with run_tty(containerd, cid, "seq", "1", "1000") as term:
        assert term.wait() == 0
    expected = b"".join(b"%d\r\n" % i for i in range(1, 1001))
    if term.output != expected and expected.startswith(term.output):
        xfail_unless_pyshim(containerd, "dropped the end of a terminal's output at exit")
    assert term.output == expected


def test_megabytes_of_exec_output_through_a_tty_arrive_whole(containerd, sleeper):
    with PtyCtr(containerd, "task", "exec", "-t", "--exec-id", "big", sleeper, "seq", "1", "400000") as term:
        assert term.wait(timeout=120) == 0
    expected = b"".join(b"%d\r\n" % i for i in range(1, 400001))  # 3.1 MB
    output = term.output
    if output != expected and expected.startswith(output):
        xfail_unless_pyshim(containerd, "dropped the end of a terminal's output at exit")
    assert len(output) == len(expected) and output == expected, \
        f"{len(output)} bytes instead of {len(expected)}, ending {output[-40:]!r}"


def test_exec_terminal_follows_a_resize(containerd, sleeper):
    # What a user does: resize the terminal ctr runs on; ctr sends ResizePty for the exec.
    with PtyCtr(containerd, "task", "exec", "-t", "--exec-id", "resize", sleeper, "sh", rows=30, cols=100) as term:
        assert wait_for_size(term, 30, 100) == (30, 100)
        assert wait_for_size(term, 45, 123, resize=True) == (45, 123)
        term.write(b"exit 6\n")
        assert term.wait() == 6


def test_resize_pty_of_the_init_process(containerd, ctr, cid):
    with run_tty(containerd, cid, "sh", rows=30, cols=100) as term:
        assert wait_for_size(term, 30, 100) == (30, 100)  # ctr's own resize after start is done
        with ShimClient(containerd, cid) as shim:
            shim.call("ResizePty", task_pb2.ResizePtyRequest(id=cid, width=123, height=45))
        assert terminal_size(term) == (45, 123)
        term.write(b"exit\n")
        assert term.wait() == 0


def test_exec_terminal_closes_when_the_process_exits(containerd, sleeper):
    # The exec leaves a child behind that keeps the terminal open (in a session of its own, so
    # the terminal's hangup does not end it); the exec is over all the same, and so is ctr, promptly.
    with PtyCtr(containerd, "task", "exec", "-t", "--exec-id", "bg", sleeper,
                "sh", "-c", "mkfifo /tmp/ready; setsid sh -c 'echo > /tmp/ready; exec sleep 1000' &"
                            "read x < /tmp/ready; echo started; exit 2") as term:
        term.expect(rb"started\r\n")
        started = time.monotonic()
        assert term.wait(timeout=30) == 2
        assert time.monotonic() - started < 1.5
    assert len(containerd.task_pids(sleeper)) == 2  # the sleep lives on in the container
