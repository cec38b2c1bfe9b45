"""cgroup v2 metrics (as containerd/cgroups cgroup2/manager.go computes them); "max"
reads as the maximum uint64."""

from __future__ import annotations

import os
from typing import Sequence

from shim.api import cgroups_v2_pb2 as pb
from shim.linux.cgroups.files import MAX_UINT64, read, read_kv, read_uint, rdma

def metrics(d: str, hugepage_sizes: Sequence[str]) -> pb.Metrics:
    """The v2 Metrics of the cgroup directory `d`."""
    m = pb.Metrics()
    _pids(d, m)
    _cpu(d, m)
    _memory(d, m)
    _memory_events(d, m)
    _io(d, m)
    rdma(d, m.rdma)
    _hugetlb(d, hugepage_sizes, m)
    return m


def _uint(path: str) -> int | None:
    return read_uint(path, MAX_UINT64)


def _psi(path: str) -> pb.PSIStats | None:
    """"some avg10=0.00 avg60=0.00 avg300=0.00 total=0" (and "full ...") lines."""
    text = read(path)
    if text is None:
        return None
    psi = pb.PSIStats()
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0] not in ("some", "full"):
            continue
        data = getattr(psi, fields[0])
        data.SetInParent()
        for kv in fields[1:]:
            key, _, value = kv.partition("=")
            try:
                if key == "total":
                    data.total = int(value)
                elif key in ("avg10", "avg60", "avg300"):
                    setattr(data, key, float(value))
            except ValueError:
                continue
    return psi


def _pids(d: str, m: pb.Metrics) -> None:
    current = _uint(os.path.join(d, "pids.current"))
    limit = _uint(os.path.join(d, "pids.max"))
    if current is None and limit is None:
        return
    m.pids.SetInParent()
    m.pids.current = current or 0
    m.pids.limit = limit or 0


_V2_CPU_STAT = ("usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled",
                "throttled_usec", "nr_bursts", "burst_usec")


def _cpu(d: str, m: pb.Metrics) -> None:
    stat = read_kv(os.path.join(d, "cpu.stat"))
    psi = _psi(os.path.join(d, "cpu.pressure"))
    if stat is None and psi is None:
        return
    m.cpu.SetInParent()
    for key in _V2_CPU_STAT:
        if stat and key in stat:
            setattr(m.cpu, key, stat[key])
    if psi is not None:
        m.cpu.psi.CopyFrom(psi)


# memory.stat keys copied as they are: v2 MemoryStat names its fields after them.
_V2_MEMORY_STAT = frozenset((
    "anon", "file", "kernel_stack", "slab", "sock", "shmem", "file_mapped", "file_dirty",
    "file_writeback", "anon_thp", "inactive_anon", "active_anon", "inactive_file",
    "active_file", "unevictable", "slab_reclaimable", "slab_unreclaimable", "pgfault",
    "pgmajfault", "workingset_refault", "workingset_activate", "workingset_nodereclaim",
    "pgrefill", "pgscan", "pgsteal", "pgactivate", "pgdeactivate", "pglazyfree",
    "pglazyfreed", "thp_fault_alloc", "thp_collapse_alloc", "workingset_refault_anon",
    "workingset_refault_file", "workingset_activate_anon", "workingset_activate_file",
))
# MemoryStat field -> single-value file.
_V2_MEMORY_FILES = (
    ("usage", "memory.current"),
    ("usage_limit", "memory.max"),
    ("max_usage", "memory.peak"),
    ("swap_usage", "memory.swap.current"),
    ("swap_limit", "memory.swap.max"),
    ("swap_max_usage", "memory.swap.peak"),
)


def _memory(d: str, m: pb.Metrics) -> None:
    stat = read_kv(os.path.join(d, "memory.stat"))
    values = {f: _uint(os.path.join(d, name)) for f, name in _V2_MEMORY_FILES}
    psi = _psi(os.path.join(d, "memory.pressure"))
    if stat is None and psi is None and all(v is None for v in values.values()):
        return
    mem = m.memory
    mem.SetInParent()
    for key, value in (stat or {}).items():
        if key in _V2_MEMORY_STAT:
            setattr(mem, key, value)
    for field, number in values.items():
        if number is not None:
            setattr(mem, field, number)
    if psi is not None:
        mem.psi.CopyFrom(psi)


_V2_MEMORY_EVENTS = ("low", "high", "max", "oom", "oom_kill", "oom_group_kill")


def _memory_events(d: str, m: pb.Metrics) -> None:
    events = read_kv(os.path.join(d, "memory.events"))
    if not events:
        return  # containerd leaves the field out for an empty or missing file
    m.memory_events.SetInParent()
    for key in _V2_MEMORY_EVENTS:
        if key in events:
            setattr(m.memory_events, key, events[key])


_V2_IO_KEYS = frozenset(("rbytes", "wbytes", "rios", "wios"))


def _io(d: str, m: pb.Metrics) -> None:
    text = read(os.path.join(d, "io.stat"))
    psi = _psi(os.path.join(d, "io.pressure"))
    if text is None and psi is None:
        return
    m.io.SetInParent()
    for line in (text or "").splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        major, sep, minor = fields[0].partition(":")
        if not sep:
            continue
        try:
            entry = pb.IOEntry(major=int(major), minor=int(minor))
        except ValueError:
            continue
        for kv in fields[1:]:
            key, _, value = kv.partition("=")
            if key in _V2_IO_KEYS:
                try:
                    setattr(entry, key, int(value))
                except ValueError:
                    pass
        m.io.usage.append(entry)
    if psi is not None:
        m.io.psi.CopyFrom(psi)


def _hugetlb(d: str, sizes: Sequence[str], m: pb.Metrics) -> None:
    for size in sizes:
        current = _uint(os.path.join(d, f"hugetlb.{size}.current"))
        if current is None:
            continue  # controller not enabled for this cgroup
        mx = _uint(os.path.join(d, f"hugetlb.{size}.max"))
        events = read_kv(os.path.join(d, f"hugetlb.{size}.events")) or {}
        m.hugetlb.add(current=current, max=mx or 0, pagesize=size, failcnt=events.get("max", 0))
