"""The stdio copy (ProcessIO) with real FIFOs and pipes, driven the way the task service
drives it: construct, hand `runc_stdio` to "runc", `started()`, `wait_drained()` after the
exit, `close_stdin()` for CloseIO, `close()` on Delete.

"runc" here is either a real child process given `runc_stdio` as its fds 0-2, or
duplicates of those fds kept by the test (what the container inherits from runc);
"the client" is containerd's side: FIFOs made with mkfifo and opened before Create.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.runtime.stdio import ProcessIO

LABEL = "test-io"
DEADLINE = 5.0  # only reached when something is broken


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def io_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(LABEL)]


class Reader(threading.Thread):
    """Reads a FIFO until EOF (all writers gone), as containerd's copy does."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd, self.data = fd, bytearray()
        self.start()

    def run(self) -> None:
        while chunk := os.read(self.fd, 1 << 16):
            self.data += chunk

    def result(self) -> bytes:
        self.join(DEADLINE)
        assert not self.is_alive(), "no EOF on the client's FIFO"
        return bytes(self.data)


class Client:
    """The FIFOs of one process, made and (stdout, stderr) opened for reading by the
    client before Create, the way ctr does."""

    def __init__(self, tmp: Path, stdin: bool = True) -> None:
        self.stdin = str(tmp / "stdin") if stdin else ""
        self.stdout, self.stderr = str(tmp / "stdout"), str(tmp / "stderr")
        for path in (self.stdin, self.stdout, self.stderr):
            if path:
                os.mkfifo(path)
        self.fds: list[int] = []
        self.out_fd = self._open(self.stdout)
        self.err_fd = self._open(self.stderr)

    def _open(self, path: str) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)
        self.fds.append(fd)
        return fd

    def read_outputs(self) -> tuple[Reader, Reader]:
        """Start reading; only once the shim has its writers open, or the first read
        of a FIFO without writers would be EOF."""
        return Reader(self.out_fd), Reader(self.err_fd)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    c = Client(tmp_path)
    yield c
    c.close()


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Every fd and thread a test's ProcessIO made is gone once it is closed."""
    before = open_fds()
    yield
    assert io_threads() == []
    assert open_fds() == before


def inherit(io: ProcessIO) -> list[int | None]:
    """What the container gets from runc: its own copies of runc_stdio."""
    return [None if fd is None else os.dup(fd) for fd in io.runc_stdio]


def close_all(fds: list[int | None]) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def open_as_containerd(fifo: Path) -> int:
    """The client's end of an output FIFO opened the way containerd's client opens it: a
    blocking open(2), which returns once a writer is there. Fails if none comes."""
    opened: list[int] = []
    opener = threading.Thread(target=lambda: opened.append(os.open(fifo, os.O_RDONLY | os.O_CLOEXEC)),
                              daemon=True)
    opener.start()
    opener.join(DEADLINE)
    if opener.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the open return
        opener.join(DEADLINE)
        close_all(opened)
        raise AssertionError(f"no writer came for the client's open of {fifo}")
    return opened[0]


# -- stdout and stderr --------------------------------------------------------------------


def test_a_process_output_reaches_the_fifos(client, no_leaks):
    io = ProcessIO(LABEL, "", client.stdout, client.stderr)
    out, err = client.read_outputs()
    # "runc" starts the container with these fds as its stdio, then exits.
    child = subprocess.Popen(["/bin/sh", "-c", "echo to stdout; echo to stderr >&2"],
                             stdin=subprocess.DEVNULL, stdout=io.runc_stdio[1],
                             stderr=io.runc_stdio[2])
    io.started()
    assert child.wait(DEADLINE) == 0
    assert io.wait_drained(DEADLINE)
    assert (out.result(), err.result()) == (b"to stdout\n", b"to stderr\n")
    io.close()


def test_megabytes_of_binary_output_arrive_exactly(client, no_leaks):
    payload_out = os.urandom(3 << 20) + bytes(range(256)) * 64  # every byte value, NULs too
    payload_err = os.urandom((1 << 20) + 4097)
    io = ProcessIO(LABEL, "", client.stdout, client.stderr)
    out, err = client.read_outputs()
    _, w_out, w_err = inherit(io)
    io.started()
    assert w_out is not None and w_err is not None
    writers = [threading.Thread(target=lambda fd=fd, data=data: (write_all(fd, data),
                                                                  os.close(fd)))
               for fd, data in ((w_out, payload_out), (w_err, payload_err))]
    for t in writers:
        t.start()
    got_out, got_err = out.result(), err.result()
    for t in writers:
        t.join(DEADLINE)
    assert io.wait_drained(DEADLINE)
    assert len(got_out) == len(payload_out) and got_out == payload_out
    assert len(got_err) == len(payload_err) and got_err == payload_err
    io.close()


def test_wait_drained_only_once_the_writers_are_closed(client, no_leaks):
    io = ProcessIO(LABEL, "", client.stdout, client.stderr)
    out, err = client.read_outputs()
    _, w_out, w_err = inherit(io)
    io.started()
    assert w_out is not None and w_err is not None
    write_all(w_out, b"partial")
    start = time.monotonic()
    assert not io.wait_drained(0.2)  # the process still holds its stdout and stderr
    assert time.monotonic() - start >= 0.15
    os.close(w_out)
    assert not io.wait_drained(0.1)  # stderr is still open
    os.close(w_err)
    assert io.wait_drained(DEADLINE)
    assert (out.result(), err.result()) == (b"partial", b"")
    io.close()


def test_the_shims_copies_of_runcs_ends_are_dropped_by_started(client, no_leaks):
    # Otherwise the copy never sees EOF, however long the process is gone.
    io = ProcessIO(LABEL, "", client.stdout, client.stderr)
    out, err = client.read_outputs()
    close_all(inherit(io))  # the process exits without writing
    assert not io.wait_drained(0.1)  # not yet started(): the shim still holds them
    io.started()
    assert io.wait_drained(DEADLINE)
    assert (out.result(), err.result()) == (b"", b"")
    io.close()


def test_output_waits_in_the_fifo_while_the_client_is_away(tmp_path, no_leaks):
    client = Client(tmp_path, stdin=False)
    io = ProcessIO(LABEL, "", client.stdout, client.stderr)
    _, w_out, w_err = inherit(io)
    io.started()
    assert w_out is not None and w_err is not None
    client.close()  # containerd goes away: the shim's spare reader keeps the FIFO open
    write_all(w_out, b"written while nobody read\n")
    # A new client (containerd restarted) opens the FIFO again and gets it.
    fd = os.open(client.stdout, os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert select.select([fd], [], [], DEADLINE)[0] == [fd]
        assert os.read(fd, 1024) == b"written while nobody read\n"
        os.close(w_out)
        os.close(w_err)
        assert io.wait_drained(DEADLINE)
    finally:
        os.close(fd)
    io.close()


def test_an_output_fifo_opened_by_the_client_only_later(tmp_path, no_leaks):
    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)
    io = ProcessIO(LABEL, "", str(fifo), "")  # nobody reads it yet
    assert io.runc_stdio[2] is None  # no stderr asked for: runc gets /dev/null
    _, w_out, _ = inherit(io)
    io.started()
    assert w_out is not None
    write_all(w_out, b"early ")
    fd = open_as_containerd(fifo)
    try:
        late = Reader(fd)
        write_all(w_out, b"and late")
        os.close(w_out)
        assert io.wait_drained(DEADLINE)
        assert late.result() == b"early and late"  # what came before the reader waited
    finally:
        os.close(fd)
    io.close()


def exited_before_the_client_opened(tmp_path: Path, output: bytes) -> tuple[Path, ProcessIO]:
    """A stdout FIFO nobody has opened yet, and the stdio of a process that wrote `output`
    to it and exited."""
    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)
    io = ProcessIO(LABEL, "", str(fifo), "")
    _, w_out, _ = inherit(io)
    io.started()
    assert w_out is not None
    write_all(w_out, output)
    os.close(w_out)
    return fifo, io


def test_a_client_whose_blocking_open_comes_after_the_output_still_gets_it(tmp_path, no_leaks):
    # containerd's client opens its FIFO ends in the background, with a blocking open(2),
    # which waits for a writer: one that comes after the process's output is complete must
    # still find the shim's writer there, and the output.
    fifo, io = exited_before_the_client_opened(tmp_path, b"all of it\n")
    try:
        assert not io.wait_drained(0.2)  # not copied: nobody to copy it to yet
        fd = open_as_containerd(fifo)
        try:
            late = Reader(fd)
            assert io.wait_drained(DEADLINE)
            assert late.result() == b"all of it\n"
        finally:
            os.close(fd)
    finally:
        io.close()


def test_close_stops_a_copy_waiting_for_its_client(tmp_path, no_leaks):
    fifo, io = exited_before_the_client_opened(tmp_path, b"never read")
    assert not io.wait_drained(0.1)
    start = time.monotonic()
    io.close()
    assert time.monotonic() - start < 0.5
    # Nobody holds a writer: a reader that comes now sees the end at once.
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        assert os.read(fd, 64) == b""
    finally:
        os.close(fd)


# -- stdin ------------------------------------------------------------------------------


def test_stdin_reaches_the_process_and_close_stdin_gives_eof(client, no_leaks):
    io = ProcessIO(LABEL, client.stdin, client.stdout, client.stderr)
    out, err = client.read_outputs()
    # cat echoes its stdin and exits at EOF.
    child = subprocess.Popen(["/bin/cat"], stdin=io.runc_stdio[0], stdout=io.runc_stdio[1],
                             stderr=io.runc_stdio[2])
    io.started()
    w = os.open(client.stdin, os.O_WRONLY | os.O_CLOEXEC)
    payload = os.urandom(1 << 20) + b"\n"
    t = threading.Thread(target=lambda: (write_all(w, payload), os.close(w)))
    t.start()
    t.join(DEADLINE)
    # The client has closed its end: without CloseIO, the process has no EOF yet.
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0.3)
    io.close_stdin()
    assert child.wait(DEADLINE) == 0
    assert io.wait_drained(DEADLINE)
    got = out.result()
    assert len(got) == len(payload) and got == payload
    assert err.result() == b""
    io.close()


def test_close_stdin_is_idempotent(client, no_leaks):
    io = ProcessIO(LABEL, client.stdin, client.stdout, client.stderr)
    fds = inherit(io)
    io.started()
    io.close_stdin()
    io.close_stdin()
    r = fds[0]
    assert r is not None
    assert select.select([r], [], [], DEADLINE)[0] == [r]
    assert os.read(r, 16) == b""  # no writer left at all: EOF
    close_all(fds)
    io.close()


# -- file:// ------------------------------------------------------------------------------


def test_file_stdio_appends_stdout_and_stderr_to_the_file(tmp_path, no_leaks):
    log = tmp_path / "logs" / "c1.log"  # its directory is made too
    io = ProcessIO(LABEL, "", f"file://{log}", f"file://{log}")
    child = subprocess.Popen(["/bin/sh", "-c", "echo out; echo err >&2"],
                             stdin=subprocess.DEVNULL, stdout=io.runc_stdio[1],
                             stderr=io.runc_stdio[2])
    io.started()
    assert child.wait(DEADLINE) == 0
    assert io.wait_drained(DEADLINE)
    assert sorted(log.read_bytes().splitlines(keepends=True)) == [b"err\n", b"out\n"]
    assert oct(log.stat().st_mode & 0o777) == oct(0o644)
    io.close()


def test_file_stdio_keeps_what_the_file_had(tmp_path, no_leaks):
    log = tmp_path / "c1.log"
    log.write_bytes(b"from an earlier run\n")
    io = ProcessIO(LABEL, "", f"file://{log}", "")
    _, w_out, w_err = inherit(io)
    io.started()
    assert w_out is not None and w_err is not None
    write_all(w_out, b"\x00\xffbinary\n")
    close_all([w_out, w_err])
    assert io.wait_drained(DEADLINE)
    assert log.read_bytes() == b"from an earlier run\n\x00\xffbinary\n"
    io.close()


# -- close --------------------------------------------------------------------------------


def test_close_while_the_process_still_runs_stops_everything(client, no_leaks):
    io = ProcessIO(LABEL, client.stdin, client.stdout, client.stderr)
    fds = inherit(io)
    io.started()
    assert len(io_threads()) == 3  # stdin, stdout, stderr copies
    start = time.monotonic()
    io.close()
    assert time.monotonic() - start < 1.0
    close_all(fds)


def test_the_copy_loops_start_only_with_begin_and_lose_nothing_before(client, no_leaks):
    """Output written before the loops run waits in the pipe: begin() (called once runc
    runs) starts them, and everything arrives."""
    io = ProcessIO(LABEL, "", client.stdout, client.stderr)
    out, err = client.read_outputs()
    assert io_threads() == []  # set up, not started
    child = subprocess.Popen(["/bin/sh", "-c", "echo early; echo late >&2"],
                             stdin=subprocess.DEVNULL, stdout=io.runc_stdio[1],
                             stderr=io.runc_stdio[2])
    assert child.wait(DEADLINE) == 0
    io.begin()
    assert len(io_threads()) == 2
    io.started()
    assert io.wait_drained(DEADLINE)
    assert (out.result(), err.result()) == (b"early\n", b"late\n")
    io.close()


def test_started_begins_the_loops_if_nobody_did(client, no_leaks):
    io = ProcessIO(LABEL, "", client.stdout, client.stderr)
    out, err = client.read_outputs()
    child = subprocess.Popen(["/bin/echo", "hi"], stdout=io.runc_stdio[1], stderr=io.runc_stdio[2])
    assert child.wait(DEADLINE) == 0
    io.started()
    assert io.wait_drained(DEADLINE)
    assert (out.result(), err.result()) == (b"hi\n", b"")
    io.close()


def test_close_before_runc_ran(client, no_leaks):
    # Create failed: runc never started, started() is never called.
    io = ProcessIO(LABEL, client.stdin, client.stdout, client.stderr)
    io.close()
    io.close()  # and a second close does nothing


def test_an_unknown_scheme_fails_without_leaving_anything(tmp_path, no_leaks):
    with pytest.raises(OSError, match="unknown STDIO scheme tcp"):
        ProcessIO(LABEL, "", "tcp://127.0.0.1:1", "")


def test_no_stdio_at_all(no_leaks):
    io = ProcessIO(LABEL, "", "", "")
    assert io.runc_stdio == (None, None, None)
    io.started()
    assert io.wait_drained(0)
    io.close()


def test_a_real_exec_like_sequence(tmp_path, no_leaks):
    # The service's order for an exec whose client writes stdin and closes it.
    client = Client(tmp_path)
    try:
        io = ProcessIO(LABEL, client.stdin, client.stdout, client.stderr)
        out, err = client.read_outputs()
        child = subprocess.Popen([sys.executable, "-c",
                                  "import sys; d = sys.stdin.buffer.read();"
                                  "sys.stdout.buffer.write(d[::-1]); sys.stderr.write('done')"],
                                 stdin=io.runc_stdio[0], stdout=io.runc_stdio[1],
                                 stderr=io.runc_stdio[2])
        io.started()
        w = os.open(client.stdin, os.O_WRONLY | os.O_CLOEXEC)
        write_all(w, b"abc")
        os.close(w)
        io.close_stdin()  # CloseIO
        assert child.wait(DEADLINE) == 0
        assert io.wait_drained(DEADLINE)  # before the exit is reported
        assert (out.result(), err.result()) == (b"cba", b"done")
        io.close()  # Delete
    finally:
        client.close()


# -- terminals ----------------------------------------------------------------------------


class Terminal:
    """What runc does for a terminal: a pty whose master it sends over the console socket;
    the slave is the container's stdio."""

    def __init__(self, io: ProcessIO) -> None:
        assert io.console_socket is not None
        master, self.slave = os.openpty()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(io.console_socket)
            socket.send_fds(s, [b"/dev/pts/x"], [master])
        os.close(master)

    def spawn(self, *argv: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                start_new_session=True)

    def close(self) -> None:
        os.close(self.slave)


def test_a_terminal_carries_stdin_and_output_and_ends_input_with_eot(tmp_path, no_leaks):
    client = Client(tmp_path)
    try:
        io = ProcessIO(LABEL, client.stdin, client.stdout, "", terminal=True)
        assert io.runc_stdio == (None, None, None)  # runc gets no stdio, only the socket
        console_dir = os.path.dirname(io.console_socket or "")
        term = Terminal(io)
        child = term.spawn("/bin/cat")
        io.started()
        assert not os.path.exists(console_dir)  # the socket is gone once the pty came
        io.resize(132, 43)
        assert os.get_terminal_size(term.slave) == (132, 43)
        term.close()
        out = Reader(client.out_fd)
        w = os.open(client.stdin, os.O_WRONLY | os.O_CLOEXEC)
        write_all(w, b"hello\n")
        os.close(w)
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(0.2)  # no CloseIO yet
        io.close_stdin()  # the copy ends and sends EOT: cat sees end of input
        assert child.wait(DEADLINE) == 0
        assert io.wait_drained(DEADLINE)
        # The terminal echoes the line, then cat prints it; both in terminal line endings.
        assert out.result() == b"hello\r\nhello\r\n"
        io.close()
    finally:
        client.close()


def test_a_terminal_held_by_a_left_over_child_drains_once_quiet(tmp_path, no_leaks):
    client = Client(tmp_path, stdin=False)
    try:
        io = ProcessIO(LABEL, "", client.stdout, "", terminal=True)
        term = Terminal(io)
        # The process exits, but a child it left behind holds the terminal for ever.
        left_over = term.spawn("/bin/sh", "-c", "echo bye; exec sleep 30")
        io.started()
        term.close()
        try:
            got = b""
            while len(got) < len(b"bye\r\n"):  # the process is done: it has exited
                assert select.select([client.out_fd], [], [], DEADLINE)[0]
                got += os.read(client.out_fd, 64)
            start = time.monotonic()
            assert io.wait_drained(DEADLINE)
            assert time.monotonic() - start < 2.0  # QUIET_MS of silence, not the child's end
            assert got + Reader(client.out_fd).result() == b"bye\r\n"
            assert left_over.poll() is None
        finally:
            left_over.kill()
            left_over.wait()
        io.close()
    finally:
        client.close()


# -- binary:// loggers --------------------------------------------------------------------


class LoggerChild:
    """What ProcessIO uses of the reaper's Child for a logger."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid

    def wait(self, timeout: float | None = None) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"logger {self.pid} still running") from None


def test_a_binary_logger_gets_the_output_on_fds_3_and_4(tmp_path, monkeypatch, no_leaks):
    monkeypatch.setenv("PYSHIM_TEST_PRIVATE", "not for loggers")
    logger = tmp_path / "logger"
    logger.write_text(f"""#!/bin/sh
cd {tmp_path}
echo "$@" > args
env > env
cat <&3 > out &
cat <&4 > err &
echo ready >&5
exec 5>&-
wait
""")
    logger.chmod(0o755)
    spawned: list[LoggerChild] = []

    def spawn(argv: list[str], **kwargs: object) -> LoggerChild:
        spawned.append(LoggerChild(subprocess.Popen(argv, close_fds=True, **kwargs)))
        return spawned[-1]

    io = ProcessIO(LABEL, "", f"binary://{logger}?tag=web&verbose", "", spawn=spawn,
                   env={"CONTAINER_ID": "c1", "CONTAINER_NAMESPACE": "ns1"})
    # Set up means ready: the logger has run up to its readiness write.
    assert (tmp_path / "args").read_text() == "tag web verbose\n"
    env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines())
    assert (env["CONTAINER_ID"], env["CONTAINER_NAMESPACE"]) == ("c1", "ns1")
    assert "PYSHIM_TEST_PRIVATE" not in env
    _, w_out, w_err = inherit(io)
    io.started()
    assert w_out is not None and w_err is not None
    payload = os.urandom(1 << 20)
    write_all(w_out, payload)
    write_all(w_err, b"to stderr\n")
    close_all([w_out, w_err])
    deadline = time.monotonic() + DEADLINE
    while (tmp_path / "out").stat().st_size < len(payload) or \
            (tmp_path / "err").stat().st_size < 10:
        assert time.monotonic() < deadline, "the logger never got all the output"
        time.sleep(0.01)
    assert (tmp_path / "out").read_bytes() == payload
    assert (tmp_path / "err").read_bytes() == b"to stderr\n"
    [child] = spawned
    io.close()  # stops the logger
    assert child.popen.returncode is not None
