"""shim/binary/prefork.py: the zygote's heaps are packed before it forks daemons.

Each check runs in a fresh interpreter, so that the filling does not stay in pytest's.
"""

import os
import subprocess
import sys

import pytest

# Frees every other block of a run of allocations, so each allocator has free slots
# between used ones, as a zygote's heap has after its imports.
FRAGMENT = """
import ctypes, re, sys
from shim.binary import prefork
big = [bytearray(1500 + i % 700) for i in range(400)]      # malloc'd (over 512 bytes)
small = [bytes(100 + i % 300) for i in range(20000)]        # pymalloc'd
del big[::2], small[::2]

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def malloc_free_below_top():
    m = libc.mallinfo2()
    return m.fordblks - m.keepcost
"""


def run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", FRAGMENT + code], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_malloc_free_chunks_are_taken():
    before, after = map(int, run("""
before = malloc_free_below_top()
prefork._fill_malloc()
print(before, malloc_free_below_top())
""").split())
    assert before > 100_000  # the freed bytearrays
    assert after < 64  # what is left is smaller than any chunk worth taking


def test_pymalloc_free_blocks_are_filled():
    # After the filling, only fresh pools that later allocations started have free
    # blocks (their untouched pages cost nothing to share).
    before, after = map(int, run("""
import os
def free_bytes():
    r, w = os.pipe(); saved = os.dup(2); os.dup2(w, 2)
    sys._debugmallocstats()
    os.dup2(saved, 2); os.close(w)
    stats = os.fdopen(r).read()
    return int(re.search(r"bytes in available blocks\\s+=\\s+([\\d,]+)", stats)[1].replace(",", ""))
before = free_bytes()
prefork._fill_pymalloc()
print(before, free_bytes())
""").split())
    assert before > 500_000  # the freed bytes objects
    assert after < 100_000


def test_no_statistics_no_filling():
    # A C library without mallinfo2 (musl, glibc before 2.33): nothing taken, no error.
    out = run("""
real = ctypes.CDLL
class NoStats:
    def __init__(self, *a, **k): self._lib = real(*a, **k)
    def __getattr__(self, name):
        if name == "mallinfo2":
            raise AttributeError(name)
        return getattr(self._lib, name)
ctypes.CDLL = NoStats
held = len(prefork._held)
prefork._fill_malloc()
print(len(prefork._held) - held)
""")
    assert out.strip() == "0"


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/ksm"), reason="kernel without KSM")
def test_private_writable_memory_is_offered_to_ksm():
    out = run("""
marked = prefork.mark_mergeable()
flags = {}
name = None
for line in open("/proc/self/smaps"):
    fields = line.split()
    if "-" in fields[0] and not fields[0].endswith(":"):
        name = fields[5] if len(fields) > 5 else "anon"
        perms = fields[1]
    elif fields[0] == "VmFlags:":
        flags.setdefault((name, perms), set()).update(fields[1:])
print(marked)
print(int("mg" in flags.get(("[heap]", "rw-p"), ())))
print(int(any("mg" in f for (n, p), f in flags.items() if n.startswith("[stack"))))
print(int(any("mg" in f for (n, p), f in flags.items() if not p.startswith("rw"))))
""")
    marked, heap, stack, readonly = map(int, out.split())
    assert marked > 0
    assert heap == 1  # the interpreter's own heap is offered
    assert stack == 0 and readonly == 0  # stacks and code are not
