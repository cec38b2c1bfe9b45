"""Logging to the bundle's `log` FIFO, which containerd copies into its own log.

Lines use logrus' text format (time=… level=… msg=…), as containerd's own shims do, so
they read the same in containerd's output. containerd holds the FIFO open while it
runs; while it is down nobody drains it, so writes are non-blocking and a full or
reader-less FIFO drops lines instead of stalling the shim.
"""

from __future__ import annotations

import logging
import os
import time

from shim import RUNTIME

LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
          logging.ERROR: "error", logging.CRITICAL: "fatal"}


def _quote(value: str) -> str:
    if value and all(c.isalnum() or c in "-._/:@" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogrusFormatter(logging.Formatter):
    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__()
        self.set_fields(fields)

    def set_fields(self, fields: dict[str, str]) -> None:
        self._suffix = "".join(f" {k}={_quote(v)}" for k, v in fields.items() if v)

    def format(self, record: logging.LogRecord) -> str:
        t = record.created
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%09dZ" % (
            int((t % 1) * 1e9))
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        level = LEVELS.get(record.levelno, "info")
        return f"time={stamp!s} level={level} msg={_quote(msg)}{self._suffix}\n"


class FDHandler(logging.Handler):
    """Writes whole lines to a non-blocking fd, dropping what does not fit."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self.fd, self.format(record).encode(errors="replace"))
        except OSError:
            pass  # FIFO full (containerd down) or gone: never stall the shim


def open_log_fifo(path: str = "log") -> int | None:
    """Open the bundle's log FIFO for writing without blocking; None if unavailable."""
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None


def setup(debug: bool, **fields: str) -> None:
    """Log to fd 2 (the daemon puts the log FIFO there, or /dev/null).

    Called again, as in a daemon forked from the zygote (which set logging up before
    it forked), it only changes the fields and the level: building the logging
    objects in each daemon would copy the pages of logging's code and state.
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, FDHandler)), None)
    fields = {"runtime": RUNTIME, **fields}
    if handler is None:
        handler = FDHandler(2)
        handler.setFormatter(LogrusFormatter(fields))
        root.handlers[:] = [handler]
    else:
        assert isinstance(handler.formatter, LogrusFormatter)
        handler.formatter.set_fields(fields)
    level = logging.DEBUG if debug else logging.INFO
    if root.level != level:  # setLevel clears every logger's cache: not for nothing
        root.setLevel(level)


def report(level: str, msg: str, fd: int | None = None, **fields: str) -> None:
    """One line to the bundle's log FIFO (`fd`, else `log` in the working directory) from
    a process that has not set logging up: `start`, `delete`, a zygote starting."""
    record = logging.LogRecord("shim", logging.getLevelName(level.upper()), "", 0, msg, None, None)
    line = LogrusFormatter({"runtime": RUNTIME, **fields}).format(record).encode(errors="replace")
    own = fd is None
    if fd is None:
        fd = open_log_fifo()
        if fd is None:
            return
    try:
        os.write(fd, line)
    except OSError:
        pass
    finally:
        if own:
            os.close(fd)
