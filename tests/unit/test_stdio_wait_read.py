"""ProcessIO.wait_read: Delete waits until the client has read what an output FIFO holds
(containerd's client from 1.7 on closes its readers once Delete returns), bounded."""
import os
import threading
import time

from shim.runtime.stdio import ProcessIO


def fifo_io(tmp_path):
    """A ProcessIO whose stdout is a FIFO the test reads as the client; (io, client fd, the
    process's write end)."""
    path = tmp_path / "stdout"
    os.mkfifo(path)
    client = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    io = ProcessIO("test", "", str(path), "")
    _, out, _ = io.runc_stdio
    return io, client, out


def written(io, out, data):
    os.write(out, data)
    io.started()  # closes the process's end (runc's copy, here the only one): EOF
    assert io.wait_drained(5)


def test_returns_at_once_when_the_client_has_read_everything(tmp_path):
    io, client, out = fifo_io(tmp_path)
    try:
        written(io, out, b"hello\n")
        time.sleep(0.05)
        assert os.read(client, 100) == b"hello\n"
        start = time.monotonic()
        assert io.wait_read(timeout=2, stall=1)
        assert time.monotonic() - start < 0.5
    finally:
        io.close()
        os.close(client)


def test_waits_for_a_client_that_reads_late(tmp_path):
    io, client, out = fifo_io(tmp_path)
    got = []
    try:
        written(io, out, b"late\n")
        reader = threading.Timer(0.15, lambda: got.append(os.read(client, 100)))
        start = time.monotonic()
        reader.start()
        assert io.wait_read(timeout=2, stall=1)
        assert time.monotonic() - start >= 0.1  # it waited for the read
        reader.join()
        assert got == [b"late\n"]
    finally:
        io.close()
        os.close(client)


def test_gives_up_when_nobody_reads(tmp_path):
    io, client, out = fifo_io(tmp_path)
    try:
        written(io, out, b"unread\n")
        start = time.monotonic()
        assert not io.wait_read(timeout=2, stall=0.2)
        assert 0.15 < time.monotonic() - start < 1.0
    finally:
        io.close()
        os.close(client)
