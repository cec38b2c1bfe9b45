"""`ctr` on a terminal: for `ctr run -t` and `ctr task exec -t`, which need a console of their own.

The test creates a pty, gives ctr the slave as stdin, stdout and stderr (ctr puts it in raw mode
and forwards its size to the container), and reads everything ctr writes from the master.

    with PtyCtr(containerd, "task", "exec", "-t", "--exec-id", "e1", cid, "sh") as term:
        term.expect(rb"# ")
        term.write(b"exit 3\n")
        assert term.wait() == 3
"""
import fcntl
import os
import re
import signal
import struct
import subprocess
import termios
import threading
import time

# Shell code that waits until the terminal has a size (`stty size` prints nothing on a 0x0 one):
# ctr sends the size after Start, and a ResizePty for an exec that already exited fails (with
# either shim), which ctr prints as an error on the terminal.
WAIT_FOR_SIZE = 'while [ -z "$(stty size 2>/dev/null)" ]; do sleep 0.01; done;'


def set_size(fd, rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class PtyCtr:
    def __init__(self, containerd, *args, rows=24, cols=80):
        self.master, slave = os.openpty()
        set_size(slave, rows, cols)
        # ctr's raw mode keeps output processing on: without ONLCR the test reads exactly the
        # bytes the container's own terminal produced.
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.ONLCR
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        try:
            # A session of its own: signals meant for pytest do not reach ctr, and the resize
            # test delivers SIGWINCH itself (the pty is not ctr's controlling terminal).
            self.proc = subprocess.Popen(containerd.ctr_argv(*args), stdin=slave, stdout=slave, stderr=slave,
                                         env=containerd.environ(), start_new_session=True)
        except BaseException:
            os.close(self.master)
            raise
        finally:
            os.close(slave)  # ctr holds the only slave fds: the master reads EIO once ctr is gone
        self._output = bytearray()
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 1 << 16)
            except OSError:  # EIO: every slave fd is closed
                data = b""
            with self._changed:
                if not data:
                    self._eof = True
                else:
                    self._output += data
                self._changed.notify_all()
            if not data:
                return

    @property
    def output(self):
        with self._changed:
            return bytes(self._output)

    def write(self, data):
        os.write(self.master, data)

    def expect(self, pattern, timeout=30.0, start=0):
        """Wait until the output (from offset `start`) matches the regex `pattern` (bytes); the match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = regex.search(self._output, start)
                if match:
                    return match
                if self._eof:
                    raise AssertionError(f"ctr's terminal closed before {pattern!r}; output: {self._tail()!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {pattern!r} on ctr's terminal within {timeout}s; "
                                         f"output: {self._tail()!r}")
                self._changed.wait(left)

    def _tail(self):
        return bytes(self._output[-2000:])

    def resize(self, rows, cols):
        """Resize ctr's terminal, and tell ctr the way a terminal emulator does (SIGWINCH)."""
        set_size(self.master, rows, cols)
        self.proc.send_signal(signal.SIGWINCH)

    def wait(self, timeout=60.0):
        """ctr's exit status, once it exited and its terminal has been read to the end."""
        rc = self.proc.wait(timeout)
        self._reader.join(timeout)
        return rc

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        os.close(self.master)
