"""cgroup v1 metrics (as containerd/cgroups cgroup1/*.go computes them); "max" reads as 0."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from shim.api import cgroups_v1_pb2 as pb
from shim.linux.cgroups.files import read, read_kv, read_uint, rdma, uint

# cpuacct.stat counts in USER_HZ ticks; USER_HZ is 100 on Linux whatever CONFIG_HZ is
# (a fixed ABI), and containerd hard-codes the same value.
USER_HZ = 100
NS_PER_SEC = 1_000_000_000


def metrics(p: Mapping[str, str], partitions: str, hugepage_sizes: Sequence[str]) -> pb.Metrics:
    """The v1 Metrics of a cgroup given as {controller: directory}."""
    m = pb.Metrics()
    # containerd always sends cpu with both parts, even without the controllers.
    m.cpu.usage.SetInParent()
    m.cpu.throttling.SetInParent()
    if "pids" in p:
        _pids(p["pids"], m)
    if "cpuacct" in p:
        _cpuacct(p["cpuacct"], m)
    if "cpu" in p:
        _cpu(p["cpu"], m)
    if "memory" in p:
        _memory(p["memory"], m)
    if "blkio" in p:
        _blkio(p["blkio"], partitions, m)
    if "hugetlb" in p:
        _hugetlb(p["hugetlb"], hugepage_sizes, m)
    if "rdma" in p:
        rdma(p["rdma"], m.rdma)
    return m


def _uint(path: str) -> int | None:
    return read_uint(path, 0)


def _pids(d: str, m: pb.Metrics) -> None:
    current = _uint(os.path.join(d, "pids.current"))
    limit = _uint(os.path.join(d, "pids.max"))
    if current is None and limit is None:
        return
    m.pids.SetInParent()
    m.pids.current = current or 0
    m.pids.limit = limit or 0  # "max" (no limit) is 0, as containerd's cgroup1 reports it


def _cpuacct(d: str, m: pb.Metrics) -> None:
    usage = m.cpu.usage
    total = _uint(os.path.join(d, "cpuacct.usage"))
    if total is not None:
        usage.total = total
    percpu = read(os.path.join(d, "cpuacct.usage_percpu"))
    if percpu is not None:
        usage.per_cpu.extend(v for v in (uint(f, 0) for f in percpu.split()) if v is not None)
    stat = read_kv(os.path.join(d, "cpuacct.stat"))
    if stat:
        usage.user = stat.get("user", 0) * NS_PER_SEC // USER_HZ
        usage.kernel = stat.get("system", 0) * NS_PER_SEC // USER_HZ


def _cpu(d: str, m: pb.Metrics) -> None:
    stat = read_kv(os.path.join(d, "cpu.stat"))
    if stat:
        t = m.cpu.throttling
        t.periods = stat.get("nr_periods", 0)
        t.throttled_periods = stat.get("nr_throttled", 0)
        t.throttled_time = stat.get("throttled_time", 0)


# memory.stat key -> MemoryStat field; the total_* keys map to total_<field>.
_V1_MEMORY_STAT = {
    "cache": "cache",
    "rss": "rss",
    "rss_huge": "rss_huge",
    "mapped_file": "mapped_file",
    "dirty": "dirty",
    "writeback": "writeback",
    "pgpgin": "pg_pg_in",
    "pgpgout": "pg_pg_out",
    "pgfault": "pg_fault",
    "pgmajfault": "pg_maj_fault",
    "inactive_anon": "inactive_anon",
    "active_anon": "active_anon",
    "inactive_file": "inactive_file",
    "active_file": "active_file",
    "unevictable": "unevictable",
}
_V1_MEMORY_STAT.update({"total_" + k: "total_" + f for k, f in list(_V1_MEMORY_STAT.items())})
_V1_MEMORY_STAT["hierarchical_memory_limit"] = "hierarchical_memory_limit"
_V1_MEMORY_STAT["hierarchical_memsw_limit"] = "hierarchical_swap_limit"

# MemoryStat entry -> file prefix: usage, swap (memsw), kernel (kmem), kernel_tcp.
_V1_MEMORY_ENTRIES = (
    ("usage", "memory."),
    ("swap", "memory.memsw."),
    ("kernel", "memory.kmem."),
    ("kernel_tcp", "memory.kmem.tcp."),
)
_V1_MEMORY_ENTRY_FILES = (
    ("usage", "usage_in_bytes"),
    ("max", "max_usage_in_bytes"),
    ("failcnt", "failcnt"),
    ("limit", "limit_in_bytes"),
)


def _memory(d: str, m: pb.Metrics) -> None:
    stat = read_kv(os.path.join(d, "memory.stat"))
    if stat is not None:
        mem = m.memory
        for key, value in stat.items():
            field = _V1_MEMORY_STAT.get(key)
            if field is not None:
                setattr(mem, field, value)
        # containerd sends all four entries, zero when the files are absent (no swap
        # accounting; kmem limits are gone from newer kernels).
        for entry_name, prefix in _V1_MEMORY_ENTRIES:
            entry = getattr(mem, entry_name)
            entry.SetInParent()
            for field, suffix in _V1_MEMORY_ENTRY_FILES:
                v = _uint(os.path.join(d, prefix + suffix))
                if v is not None:
                    setattr(entry, field, v)
    oom = read_kv(os.path.join(d, "memory.oom_control"))
    if oom is not None:
        o = m.memory_oom_control
        o.SetInParent()
        o.oom_kill_disable = oom.get("oom_kill_disable", 0)
        o.under_oom = oom.get("under_oom", 0)
        o.oom_kill = oom.get("oom_kill", 0)


# blkio file suffix -> BlkIOStat field. The cfq files first; containerd falls back to
# the two throttle files (non-recursive, as it does) when the cfq ones hold nothing:
# with cfq gone (blk-mq) only blkio.throttle.* and blkio.bfq.* exist.
_V1_BLKIO_CFQ = (
    ("sectors_recursive", "sectors_recursive"),
    ("io_service_bytes_recursive", "io_service_bytes_recursive"),
    ("io_serviced_recursive", "io_serviced_recursive"),
    ("io_queued_recursive", "io_queued_recursive"),
    ("io_service_time_recursive", "io_service_time_recursive"),
    ("io_wait_time_recursive", "io_wait_time_recursive"),
    ("io_merged_recursive", "io_merged_recursive"),
    ("time_recursive", "io_time_recursive"),
)
_V1_BLKIO_THROTTLE = (
    ("throttle.io_serviced", "io_serviced_recursive"),
    ("throttle.io_service_bytes", "io_service_bytes_recursive"),
)


def _blkio_lines(text: str) -> list[tuple[int, int, str, int]]:
    """"8:0 Read 4096" or "8:0 4096" lines as (major, minor, op, value); "Total" skipped."""
    out = []
    for line in text.splitlines():
        fields = line.replace(":", " ").split()
        if len(fields) not in (3, 4):
            continue
        try:
            major, minor, value = int(fields[0]), int(fields[1]), int(fields[-1])
        except ValueError:
            continue
        out.append((major, minor, fields[2] if len(fields) == 4 else "", value))
    return out


def _devices(partitions: str) -> dict[tuple[int, int], str]:
    """(major, minor) -> /dev/<name> from /proc/partitions (two header lines)."""
    text = read(partitions) or ""
    devices: dict[tuple[int, int], str] = {}
    for line in text.splitlines()[2:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        try:
            key = (int(fields[0]), int(fields[1]))
        except ValueError:
            continue
        devices.setdefault(key, "/dev/" + fields[3])
    return devices


def _blkio(d: str, partitions: str, m: pb.Metrics) -> None:
    files = {}
    if os.path.exists(os.path.join(d, "blkio.io_serviced_recursive")):
        for suffix, field in _V1_BLKIO_CFQ:
            text = read(os.path.join(d, "blkio." + suffix))
            if text:
                files[field] = _blkio_lines(text)
    if not any(files.values()):
        files = {}
        for suffix, field in _V1_BLKIO_THROTTLE:
            text = read(os.path.join(d, "blkio." + suffix))
            if text:
                files[field] = _blkio_lines(text)
    m.blkio.SetInParent()
    if not any(files.values()):
        return
    devices = _devices(partitions)
    for field, lines in files.items():
        entries = getattr(m.blkio, field)
        for major, minor, op, value in lines:
            entries.add(op=op, device=devices.get((major, minor), ""),
                        major=major, minor=minor, value=value)


def _hugetlb(d: str, sizes: Sequence[str], m: pb.Metrics) -> None:
    for size in sizes:
        usage = _uint(os.path.join(d, f"hugetlb.{size}.usage_in_bytes"))
        if usage is None:
            continue
        mx = _uint(os.path.join(d, f"hugetlb.{size}.max_usage_in_bytes"))
        failcnt = _uint(os.path.join(d, f"hugetlb.{size}.failcnt"))
        m.hugetlb.add(usage=usage, max=mx or 0, failcnt=failcnt or 0, pagesize=size)

