"""Packing a warmed interpreter's heaps before it forks shim daemons.

A forked daemon shares the zygote's pages until one of them writes to a page; then
the writer gets a copy of the whole page. An allocator that finds a free slot in a
shared page hands it out first, so a daemon's first small objects and buffers each
cost a copied page, and unlinking a slot from a free list writes to its neighbours'
pages too. `pack` uses up those slots in the zygote with blocks nobody touches
again: a daemon's new objects then go to fresh pages of its own, densely.

Two allocators matter: CPython's object allocator (pymalloc, objects up to 512
bytes) and the C library's malloc (everything larger: code objects, dict tables,
buffers). Filling pymalloc's blocks took an idle daemon's private memory from 3.3 to
3.1 MiB; taking malloc's free chunks took a running container's daemon from 4.7 to
4.35 MiB (its heap's share: 1.2 -> 0.75 MiB). Anything unexpected (another C
library, no statistics) skips the filling.

What the daemons do copy is mostly the same in each of them (the same code warms
up, the same objects change), and a page copied only to count references and count
them back ends as it was. The kernel's same-page merging (KSM) can fold such pages
back together; `mark_mergeable` offers the zygote's memory to it, which forked
daemons inherit. It is opt-in (PYSHIM_KSM=1 in containerd's environment) and
does nothing unless the node runs ksmd (/sys/kernel/mm/ksm/run = 1): merging costs
ksmd's CPU time, and merged pages are a timing side channel between processes that
share them. Containers never inherit it: marks belong to memory areas, and runc's
exec starts with none.
"""

from __future__ import annotations

import os
import re
import sys

from shim.linux.libc import libc

_held: list[object] = []  # the fillers: kept alive, never touched again

KSM_ENV = "PYSHIM_KSM"
MADV_MERGEABLE = 12

TCACHE_MAX = 1032   # glibc's largest size served from its per-thread cache
TCACHE_COUNT = 7    # chunks per size in that cache


M_ARENA_MAX = -8  # <malloc.h>


def pack() -> None:
    _one_malloc_arena()
    _fill_pymalloc()
    _fill_malloc()


def _one_malloc_arena() -> None:
    """One malloc arena for all of a daemon's threads: glibc gives each new thread an
    arena of its own (up to 8 per CPU), each a mapping with pages of its own; a daemon's
    ten-odd threads allocate little, and share the main heap's free chunks instead.
    Set in the zygote, inherited by every daemon it forks."""
    try:
        libc().mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass  # not glibc


def mark_mergeable() -> int:
    """Offer this process's private writable memory to KSM; returns how many areas
    were marked (0 where the kernel has no KSM)."""
    madvise = libc().madvise
    marked = 0
    with open("/proc/self/maps") as f:
        areas = f.read().splitlines()
    for line in areas:
        fields = line.split()
        name = fields[5] if len(fields) > 5 else ""
        if fields[1].startswith("rw") and fields[1][3] == "p" and not name.startswith("[st") \
                and name not in ("[vvar]", "[vdso]", "[vsyscall]"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if madvise(start, end - start, MADV_MERGEABLE) == 0:
                marked += 1
    return marked


def _fill_pymalloc() -> None:
    """Fill the free blocks of pymalloc's partly used pools with bytes objects."""
    r, w = os.pipe()
    saved = os.dup(2)
    try:
        os.dup2(w, 2)  # _debugmallocstats writes to the C stderr
        sys._debugmallocstats()
    except (AttributeError, OSError):
        return
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(w)
    with os.fdopen(r, "rb") as f:
        stats = f.read().decode(errors="replace")
    # "class   size   num pools   blocks in use  avail blocks" rows
    rows = re.findall(r"^\s*\d+\s+(\d+)\s+\d+\s+\d+\s+(\d+)\s*$", stats, re.M)
    _held.append((f, rows))  # freed, the parse's own objects would leave new free blocks
    for size, avail in rows:
        length = int(size) - 33  # a bytes object of this length fills one block exactly
        for i in range(int(avail)):
            if length > 0:
                _held.append(bytes(length))
            elif size == "32":  # floats (24 bytes) live in the 32-byte class
                _held.append(i + 0.5)


def _fill_malloc() -> None:
    """Take glibc malloc's free chunks below the top of the heap (and its cache).

    mallinfo2 tells how much is free below the top chunk; a chunk that comes out of
    the top (the top shrinks, or the heap grows) was not a free slot, and goes back.
    """
    import ctypes

    try:
        c = libc()
        mallinfo2, malloc, free = c.mallinfo2, c.malloc, c.free
    except (OSError, AttributeError):
        return  # not glibc 2.33 or later

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    mallinfo2.restype = MallInfo2
    malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    free.argtypes = [ctypes.c_void_p]

    def take(size: int) -> bool:
        """Hold a chunk of `size` bytes if one is free below the top."""
        before = mallinfo2()
        chunk = malloc(size)
        after = mallinfo2()
        if not chunk:
            return False
        if after.keepcost < before.keepcost or after.arena != before.arena:
            free(chunk)
            return False
        _held.append(chunk)
        return True

    # The cache first: it hides its chunks from mallinfo2, and malloc serves it first.
    for size in range(24, TCACHE_MAX + 1, 16):
        for _ in range(TCACHE_COUNT + 1):
            if not take(size):
                break
    size = 1 << 20
    while size >= 32:
        info = mallinfo2()
        if info.fordblks - info.keepcost < size or not take(size - 16):
            size //= 2
