"""inotify: the constants and the event records, and a watch on a tree of source files.

The OOM watcher follows cgroup v2's memory.events with it; the zygote follows its own
installed code, so that it never forks a daemon from older code than containerd runs.
"""

from __future__ import annotations

import os
import struct

from shim.linux.libc import check, libc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_IGNORED = 0x00008000
IN_CLOEXEC = os.O_CLOEXEC
IN_NONBLOCK = os.O_NONBLOCK
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; `len` bytes of name follow

# What changing, adding or removing a file of a directory (or the directory) reports.
CHANGES = (IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
           | IN_DELETE_SELF | IN_MOVE_SELF)


def init() -> int:
    """A new inotify fd, non-blocking and close-on-exec."""
    return check(libc().inotify_init1(IN_CLOEXEC | IN_NONBLOCK), "inotify_init1")


def add_watch(fd: int, path: str, mask: int) -> int:
    return check(libc().inotify_add_watch(fd, os.fsencode(path), mask),
                 f"inotify_add_watch {path}")


def events(data: bytes) -> Iterator[tuple[int, int, str]]:
    """(wd, mask, name) of each record in what a read of an inotify fd returned."""
    offset = 0
    while offset + EVENT.size <= len(data):
        wd, mask, _, name_len = EVENT.unpack_from(data, offset)
        offset += EVENT.size
        name = data[offset:offset + name_len].rstrip(b"\0").decode(errors="replace")
        offset += name_len
        yield wd, mask, name


def watch_sources(root: str) -> int:
    """An inotify fd that becomes readable when a file below `root` (or one of its
    directories) is changed, added or removed; `sources_changed` tells whether a source
    file was among them."""
    fd = init()
    try:
        for directory, subdirs, _ in os.walk(root):
            subdirs[:] = [d for d in subdirs if d != "__pycache__"]
            add_watch(fd, directory, CHANGES)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sources_changed(fd: int, suffix: str = ".py") -> bool:
    """Whether what `fd` (from watch_sources) has to report includes a source file, or a
    watched directory itself (bytecode written beside the sources is no change)."""
    changed = False
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return changed
        for _, mask, name in events(data):
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF) or name.endswith(suffix):
                changed = True
