"""Reading cgroup files: the whole file or None when it is not there, counters and
limits, flat-keyed files; and what both versions' metrics share (hugetlb page sizes,
rdma). Every file is opened and read once per call; nothing here starts a process."""

from __future__ import annotations

import errno
import os
from typing import Callable

from shim.api import cgroups_v1_pb2 as v1
from shim.api import cgroups_v2_pb2 as v2

MAX_UINT64 = (1 << 64) - 1
MAX_UINT32 = (1 << 32) - 1

# Errors that mean "this file or controller is not there": skipped, never reported.
# ENODEV/EOPNOTSUPP come from *.pressure when PSI is disabled at boot.
ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENODEV, errno.EOPNOTSUPP, errno.ENOTSUP})
READ_SIZE = 65536


def read(path: str) -> str | None:
    """The whole file, or None when it (or its controller) does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in ABSENT:
            return None
        raise
    try:
        data = os.read(fd, READ_SIZE)
        # cgroup files fit one read; loop only for the rare big one (many devices).
        if len(data) == READ_SIZE:
            chunks = [data]
            while chunk := os.read(fd, READ_SIZE):
                chunks.append(chunk)
            data = b"".join(chunks)
    except OSError as e:
        if e.errno in ABSENT:
            return None
        raise
    finally:
        os.close(fd)
    return data.decode("utf-8", "replace")


def uint(text: str, max_value: int) -> int | None:
    """A counter or limit: "max" is `max_value`, negatives clamp to 0 (as containerd)."""
    text = text.strip()
    if text == "max":
        return max_value
    try:
        v = int(text)
    except ValueError:
        return None
    return min(max(v, 0), MAX_UINT64)


def read_uint(path: str, max_value: int) -> int | None:
    text = read(path)
    return None if text is None else uint(text, max_value)


def read_kv(path: str) -> dict[str, int] | None:
    """A flat-keyed file ("key value" lines); unparsable lines are skipped."""
    text = read(path)
    if text is None:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            v = uint(parts[1], MAX_UINT64)
            if v is not None:
                out[parts[0]] = v
    return out



_hugepage_sizes: tuple[str, ...] | None = None


def hugepage_size_name(kib: int) -> str:
    """The kernel's name in hugetlb.<size>.* files: 2048 kB -> "2MB", 1048576 kB -> "1GB"."""
    if kib >= 1 << 20:
        return f"{kib >> 20}GB"
    if kib >= 1 << 10:
        return f"{kib >> 10}MB"
    return f"{kib}KB"


def system_hugepage_sizes(sysfs_dir: str = "/sys/kernel/mm/hugepages") -> tuple[str, ...]:
    """Page sizes the kernel supports, smallest first; read once (they never change)."""
    global _hugepage_sizes
    if _hugepage_sizes is None:
        try:
            names = os.listdir(sysfs_dir)
        except OSError:
            names = []
        kibs = []
        for name in names:
            if name.startswith("hugepages-") and name.endswith("kB"):
                try:
                    kibs.append(int(name[len("hugepages-"):-2]))
                except ValueError:
                    pass
        _hugepage_sizes = tuple(hugepage_size_name(k) for k in sorted(kibs))
    return _hugepage_sizes



def rdma_entries(text: str, add: Callable[[], v1.RdmaEntry | v2.RdmaEntry]) -> None:
    """"mlx4_0 hca_handle=2 hca_object=2000" lines; "max" is the maximum uint32."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 3:
            continue
        e = add()
        e.device = fields[0]
        for kv in fields[1:]:
            key, _, value = kv.partition("=")
            v = uint(value, MAX_UINT32)
            if v is None:
                continue
            if key == "hca_handle":
                e.hca_handles = min(v, MAX_UINT32)
            elif key == "hca_object":
                e.hca_objects = min(v, MAX_UINT32)


def rdma(d: str, stat: v1.RdmaStat | v2.RdmaStat) -> None:
    current = read(os.path.join(d, "rdma.current"))
    limit = read(os.path.join(d, "rdma.max"))
    if current is None and limit is None:
        return
    stat.SetInParent()
    rdma_entries(current or "", stat.current.add)
    rdma_entries(limit or "", stat.limit.add)

