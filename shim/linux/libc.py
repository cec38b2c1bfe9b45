"""The C library, for the calls Python's os module lacks: mount, prctl, inotify, madvise.

One handle for the whole process, loaded on first use (the `delete` action usually
needs none) with the prototypes of the calls pyshim makes. The zygote loads it before
it forks, so its daemons share it rather than each building its own.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # as typing's, without importing typing: `delete` imports this module
if TYPE_CHECKING:
    import ctypes

_handle = None


def libc() -> ctypes.CDLL:
    global _handle
    if _handle is None:
        import ctypes
        c = ctypes.CDLL(None, use_errno=True)
        c.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                            ctypes.c_ulong, ctypes.c_char_p]
        c.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        c.inotify_init1.argtypes = [ctypes.c_int]
        c.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        c.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        c.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _handle = c
    return _handle


def check(result: int, what: str) -> int:
    """A C call's result; OSError(errno, "what: reason") when it reports failure."""
    if result < 0:
        import ctypes
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result
