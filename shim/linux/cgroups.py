"""A container's cgroup, found from its init pid, and its metrics for Stats.

Two layouts, as containerd's runc shim sees them:
  * cgroup v2 (unified): `/sys/fs/cgroup` itself is a cgroup2 mount; one directory.
  * cgroup v1 (and hybrid, where a cgroup2 mount sits beside the v1 ones): one directory
    per controller, each under that controller's own mount point.
The numbers follow containerd/cgroups (cgroup1 and cgroup2 packages) so `ctr task metrics`
shows what it shows with the runc shim. Where that library errors out on a missing file,
this module leaves the number out: Stats should answer with what exists.
Every file is opened and read once per call; nothing here starts a process.
"""

from __future__ import annotations

import errno
import os
from typing import Callable, Mapping, Sequence

from google.protobuf.any_pb2 import Any

from shim.api import cgroups_v1_pb2 as v1
from shim.api import cgroups_v2_pb2 as v2

V1_TYPE_URL = "io.containerd.cgroups.v1.Metrics"
V2_TYPE_URL = "io.containerd.cgroups.v2.Metrics"

CGROUP_ROOT = "/sys/fs/cgroup"
MAX_UINT64 = (1 << 64) - 1
MAX_UINT32 = (1 << 32) - 1
# cpuacct.stat counts in USER_HZ ticks; USER_HZ is 100 on Linux whatever CONFIG_HZ is
# (a fixed ABI), and containerd hard-codes the same value.
USER_HZ = 100
NS_PER_SEC = 1_000_000_000

# Errors that mean "this file or controller is not there": skipped, never reported.
# ENODEV/EOPNOTSUPP come from *.pressure when PSI is disabled at boot.
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENODEV, errno.EOPNOTSUPP, errno.ENOTSUP})
_READ_SIZE = 65536

# v1 controllers that metrics() reads; `exists` looks only at these, because a
# container may share other hierarchies (name=systemd at "/", say) with the host.
_V1_STAT_CONTROLLERS = ("pids", "cpu", "cpuacct", "memory", "blkio", "hugetlb", "rdma")


def _read(path: str) -> str | None:
    """The whole file, or None when it (or its controller) does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in _ABSENT:
            return None
        raise
    try:
        data = os.read(fd, _READ_SIZE)
        # cgroup files fit one read; loop only for the rare big one (many devices).
        if len(data) == _READ_SIZE:
            chunks = [data]
            while chunk := os.read(fd, _READ_SIZE):
                chunks.append(chunk)
            data = b"".join(chunks)
    except OSError as e:
        if e.errno in _ABSENT:
            return None
        raise
    finally:
        os.close(fd)
    return data.decode("utf-8", "replace")


def _uint(text: str, max_value: int) -> int | None:
    """A counter or limit: "max" is `max_value`, negatives clamp to 0 (as containerd)."""
    text = text.strip()
    if text == "max":
        return max_value
    try:
        v = int(text)
    except ValueError:
        return None
    return min(max(v, 0), MAX_UINT64)


def _read_uint(path: str, max_value: int) -> int | None:
    text = _read(path)
    return None if text is None else _uint(text, max_value)


def _read_kv(path: str) -> dict[str, int] | None:
    """A flat-keyed file ("key value" lines); unparsable lines are skipped."""
    text = _read(path)
    if text is None:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            v = _uint(parts[1], MAX_UINT64)
            if v is not None:
                out[parts[0]] = v
    return out


# ---------------------------------------------------------------------------
# discovery


def unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        esc = field[i + 1:i + 4]
        if field[i] == "\\" and len(esc) == 3 and all(c in "01234567" for c in esc):
            out.append(chr(int(esc, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


class Mount:
    """One cgroup or cgroup2 line of /proc/self/mountinfo."""

    __slots__ = ("root", "mount_point", "fstype", "options")

    def __init__(self, root: str, mount_point: str, fstype: str, options: frozenset[str]) -> None:
        self.root = root
        self.mount_point = mount_point
        self.fstype = fstype
        self.options = options

    def path_for(self, cgroup_path: str) -> str:
        """Where cgroup `cgroup_path` (as /proc/<pid>/cgroup names it) lives on this mount."""
        rel = cgroup_path
        # A mount of a sub-tree (a container's own view, cgroup namespaces) has root != "/":
        # /proc/<pid>/cgroup names paths from the hierarchy's root, the mount shows them
        # from its own root.
        if self.root != "/" and (rel == self.root or rel.startswith(self.root + "/")):
            rel = rel[len(self.root):]
        return os.path.normpath(os.path.join(self.mount_point, rel.lstrip("/")))


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts, in mount order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 4:
            continue
        fstype = fields[sep + 1]
        if fstype not in ("cgroup", "cgroup2"):
            # Still record what sits on the cgroup root: a tmpfs there means v1/hybrid.
            if unescape_mountinfo(fields[4]) != CGROUP_ROOT:
                continue
        mounts.append(Mount(
            root=unescape_mountinfo(fields[3]),
            mount_point=unescape_mountinfo(fields[4]),
            fstype=fstype,
            options=frozenset(fields[sep + 3].split(",")),
        ))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup as {controller: path}; the unified ("0::") line is under ""."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            out[""] = path
            continue
        for name in controllers.split(","):
            out[name] = path
    return out


def is_unified(mounts: Sequence[Mount], root: str = CGROUP_ROOT) -> bool:
    """Whether `root` is a cgroup2 mount (the last mount on it wins: it hides the others)."""
    fstype = None
    for m in mounts:
        if m.mount_point == root:
            fstype = m.fstype
    return fstype == "cgroup2"


# ---------------------------------------------------------------------------
# hugetlb page sizes


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


# ---------------------------------------------------------------------------
# the cgroup


class Cgroup:
    """One container's cgroup: a v2 directory, or v1 directories by controller name.

    Construct directly with a path (tests point these at sample trees), or with
    `for_pid`. `hugepage_sizes` defaults to the kernel's; `partitions` is where v1
    blkio looks up device names.
    """

    def __init__(
        self,
        *,
        v2_path: str | None = None,
        v1_paths: Mapping[str, str] | None = None,
        hugepage_sizes: Sequence[str] | None = None,
        partitions: str = "/proc/partitions",
    ) -> None:
        if (v2_path is None) == (v1_paths is None):
            raise ValueError("exactly one of v2_path and v1_paths is needed")
        self.v2_path = v2_path
        self.v1_paths: dict[str, str] = dict(v1_paths or {})
        self._hugepage_sizes = tuple(hugepage_sizes) if hugepage_sizes is not None else None
        self._partitions = partitions

    @property
    def version(self) -> int:
        return 2 if self.v2_path is not None else 1

    @property
    def memory_path(self) -> str | None:
        """The directory the OOM watcher watches: v1 memory controller, or the v2 dir."""
        if self.v2_path is not None:
            return self.v2_path
        return self.v1_paths.get("memory")

    def __repr__(self) -> str:
        if self.v2_path is not None:
            return f"Cgroup(v2_path={self.v2_path!r})"
        return f"Cgroup(v1_paths={self.v1_paths!r})"

    @classmethod
    def for_pid(cls, pid: int) -> Cgroup:
        """The cgroup of `pid` as this process sees the cgroup mounts."""
        proc_cgroup = _read(f"/proc/{pid}/cgroup")
        if proc_cgroup is None:
            raise ProcessLookupError(errno.ESRCH, f"no process {pid}")
        mountinfo = _read("/proc/self/mountinfo") or ""
        return cls.from_proc(proc_cgroup, mountinfo)

    @classmethod
    def from_proc(
        cls,
        proc_cgroup: str,
        mountinfo: str,
        *,
        hugepage_sizes: Sequence[str] | None = None,
        partitions: str = "/proc/partitions",
    ) -> Cgroup:
        """From the text of /proc/<pid>/cgroup and /proc/self/mountinfo."""
        paths = parse_proc_cgroup(proc_cgroup)
        mounts = parse_mountinfo(mountinfo)
        if is_unified(mounts):
            if "" not in paths:
                raise ValueError("no unified (0::) entry in /proc/<pid>/cgroup")
            mount = next(m for m in reversed(mounts) if m.mount_point == CGROUP_ROOT)
            return cls(v2_path=mount.path_for(paths[""]),
                       hugepage_sizes=hugepage_sizes, partitions=partitions)
        v1_paths = {}
        for controller, path in paths.items():
            if not controller:
                continue  # the hybrid cgroup2 mount: containerd reports v1 here
            # The first mount whose options name the controller: "cpu,cpuacct" combined
            # mounts and "name=systemd" both appear in the super options that way.
            mount = next(
                (m for m in mounts if m.fstype == "cgroup" and controller in m.options), None
            )
            if mount is not None:
                v1_paths[controller] = mount.path_for(path)
        return cls(v1_paths=v1_paths, hugepage_sizes=hugepage_sizes, partitions=partitions)

    def exists(self) -> bool:
        if self.v2_path is not None:
            return os.path.isdir(self.v2_path)
        dirs = [p for c, p in self.v1_paths.items() if c in _V1_STAT_CONTROLLERS]
        dirs = dirs or list(self.v1_paths.values())
        # As containerd's checkExists: runc removes all of them on delete, so one
        # missing means the cgroup is (being) deleted.
        return bool(dirs) and all(os.path.isdir(p) for p in dirs)

    def metrics(self) -> Any:
        """Stats as containerd expects them; FileNotFoundError when the cgroup is gone."""
        if not self.exists():
            raise FileNotFoundError(errno.ENOENT, "cgroup does not exist", repr(self))
        if self.v2_path is not None:
            return Any(type_url=V2_TYPE_URL, value=self._v2_metrics().SerializeToString())
        return Any(type_url=V1_TYPE_URL, value=self._v1_metrics().SerializeToString())

    def hugepage_sizes(self) -> tuple[str, ...]:
        if self._hugepage_sizes is None:
            return system_hugepage_sizes()
        return self._hugepage_sizes

    # -- v1 -----------------------------------------------------------------

    def _v1_metrics(self) -> v1.Metrics:
        m = v1.Metrics()
        # containerd always sends cpu with both parts, even without the controllers.
        m.cpu.usage.SetInParent()
        m.cpu.throttling.SetInParent()
        p = self.v1_paths
        if "pids" in p:
            _v1_pids(p["pids"], m)
        if "cpuacct" in p:
            _v1_cpuacct(p["cpuacct"], m)
        if "cpu" in p:
            _v1_cpu(p["cpu"], m)
        if "memory" in p:
            _v1_memory(p["memory"], m)
        if "blkio" in p:
            _v1_blkio(p["blkio"], self._partitions, m)
        if "hugetlb" in p:
            _v1_hugetlb(p["hugetlb"], self.hugepage_sizes(), m)
        if "rdma" in p:
            _rdma(p["rdma"], m.rdma)
        return m

    # -- v2 -----------------------------------------------------------------

    def _v2_metrics(self) -> v2.Metrics:
        d = self.v2_path
        assert d is not None
        m = v2.Metrics()
        _v2_pids(d, m)
        _v2_cpu(d, m)
        _v2_memory(d, m)
        _v2_memory_events(d, m)
        _v2_io(d, m)
        _rdma(d, m.rdma)
        _v2_hugetlb(d, self.hugepage_sizes(), m)
        return m


# ---------------------------------------------------------------------------
# v1 controllers (containerd/cgroups cgroup1/*.go); "max" reads as 0 there


def _v1_uint(path: str) -> int | None:
    return _read_uint(path, 0)


def _v1_pids(d: str, m: v1.Metrics) -> None:
    current = _v1_uint(os.path.join(d, "pids.current"))
    limit = _v1_uint(os.path.join(d, "pids.max"))
    if current is None and limit is None:
        return
    m.pids.SetInParent()
    m.pids.current = current or 0
    m.pids.limit = limit or 0  # "max" (no limit) is 0, as containerd's cgroup1 reports it


def _v1_cpuacct(d: str, m: v1.Metrics) -> None:
    usage = m.cpu.usage
    total = _v1_uint(os.path.join(d, "cpuacct.usage"))
    if total is not None:
        usage.total = total
    percpu = _read(os.path.join(d, "cpuacct.usage_percpu"))
    if percpu is not None:
        usage.per_cpu.extend(v for v in (_uint(f, 0) for f in percpu.split()) if v is not None)
    stat = _read_kv(os.path.join(d, "cpuacct.stat"))
    if stat:
        usage.user = stat.get("user", 0) * NS_PER_SEC // USER_HZ
        usage.kernel = stat.get("system", 0) * NS_PER_SEC // USER_HZ


def _v1_cpu(d: str, m: v1.Metrics) -> None:
    stat = _read_kv(os.path.join(d, "cpu.stat"))
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


def _v1_memory(d: str, m: v1.Metrics) -> None:
    stat = _read_kv(os.path.join(d, "memory.stat"))
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
                v = _v1_uint(os.path.join(d, prefix + suffix))
                if v is not None:
                    setattr(entry, field, v)
    oom = _read_kv(os.path.join(d, "memory.oom_control"))
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
    text = _read(partitions) or ""
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


def _v1_blkio(d: str, partitions: str, m: v1.Metrics) -> None:
    files = {}
    if os.path.exists(os.path.join(d, "blkio.io_serviced_recursive")):
        for suffix, field in _V1_BLKIO_CFQ:
            text = _read(os.path.join(d, "blkio." + suffix))
            if text:
                files[field] = _blkio_lines(text)
    if not any(files.values()):
        files = {}
        for suffix, field in _V1_BLKIO_THROTTLE:
            text = _read(os.path.join(d, "blkio." + suffix))
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


def _v1_hugetlb(d: str, sizes: Sequence[str], m: v1.Metrics) -> None:
    for size in sizes:
        usage = _v1_uint(os.path.join(d, f"hugetlb.{size}.usage_in_bytes"))
        if usage is None:
            continue
        mx = _v1_uint(os.path.join(d, f"hugetlb.{size}.max_usage_in_bytes"))
        failcnt = _v1_uint(os.path.join(d, f"hugetlb.{size}.failcnt"))
        m.hugetlb.add(usage=usage, max=mx or 0, failcnt=failcnt or 0, pagesize=size)


def _rdma_entries(text: str, add: Callable[[], v1.RdmaEntry | v2.RdmaEntry]) -> None:
    """"mlx4_0 hca_handle=2 hca_object=2000" lines; "max" is the maximum uint32."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 3:
            continue
        e = add()
        e.device = fields[0]
        for kv in fields[1:]:
            key, _, value = kv.partition("=")
            v = _uint(value, MAX_UINT32)
            if v is None:
                continue
            if key == "hca_handle":
                e.hca_handles = min(v, MAX_UINT32)
            elif key == "hca_object":
                e.hca_objects = min(v, MAX_UINT32)


def _rdma(d: str, stat: v1.RdmaStat | v2.RdmaStat) -> None:
    current = _read(os.path.join(d, "rdma.current"))
    limit = _read(os.path.join(d, "rdma.max"))
    if current is None and limit is None:
        return
    stat.SetInParent()
    _rdma_entries(current or "", stat.current.add)
    _rdma_entries(limit or "", stat.limit.add)


# ---------------------------------------------------------------------------
# v2 (containerd/cgroups cgroup2/manager.go); "max" reads as the maximum uint64


def _v2_uint(path: str) -> int | None:
    return _read_uint(path, MAX_UINT64)


def _psi(path: str) -> v2.PSIStats | None:
    """"some avg10=0.00 avg60=0.00 avg300=0.00 total=0" (and "full ...") lines."""
    text = _read(path)
    if text is None:
        return None
    psi = v2.PSIStats()
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


def _v2_pids(d: str, m: v2.Metrics) -> None:
    current = _v2_uint(os.path.join(d, "pids.current"))
    limit = _v2_uint(os.path.join(d, "pids.max"))
    if current is None and limit is None:
        return
    m.pids.SetInParent()
    m.pids.current = current or 0
    m.pids.limit = limit or 0


_V2_CPU_STAT = ("usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled",
                "throttled_usec", "nr_bursts", "burst_usec")


def _v2_cpu(d: str, m: v2.Metrics) -> None:
    stat = _read_kv(os.path.join(d, "cpu.stat"))
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


def _v2_memory(d: str, m: v2.Metrics) -> None:
    stat = _read_kv(os.path.join(d, "memory.stat"))
    values = {f: _v2_uint(os.path.join(d, name)) for f, name in _V2_MEMORY_FILES}
    psi = _psi(os.path.join(d, "memory.pressure"))
    if stat is None and psi is None and all(v is None for v in values.values()):
        return
    mem = m.memory
    mem.SetInParent()
    for key, value in (stat or {}).items():
        if key in _V2_MEMORY_STAT:
            setattr(mem, key, value)
    for field, value in values.items():
        if value is not None:
            setattr(mem, field, value)
    if psi is not None:
        mem.psi.CopyFrom(psi)


_V2_MEMORY_EVENTS = ("low", "high", "max", "oom", "oom_kill", "oom_group_kill")


def _v2_memory_events(d: str, m: v2.Metrics) -> None:
    events = _read_kv(os.path.join(d, "memory.events"))
    if not events:
        return  # containerd leaves the field out for an empty or missing file
    m.memory_events.SetInParent()
    for key in _V2_MEMORY_EVENTS:
        if key in events:
            setattr(m.memory_events, key, events[key])


_V2_IO_KEYS = frozenset(("rbytes", "wbytes", "rios", "wios"))


def _v2_io(d: str, m: v2.Metrics) -> None:
    text = _read(os.path.join(d, "io.stat"))
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
            entry = v2.IOEntry(major=int(major), minor=int(minor))
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


def _v2_hugetlb(d: str, sizes: Sequence[str], m: v2.Metrics) -> None:
    for size in sizes:
        current = _v2_uint(os.path.join(d, f"hugetlb.{size}.current"))
        if current is None:
            continue  # controller not enabled for this cgroup
        mx = _v2_uint(os.path.join(d, f"hugetlb.{size}.max"))
        events = _read_kv(os.path.join(d, f"hugetlb.{size}.events")) or {}
        m.hugetlb.add(current=current, max=mx or 0, pagesize=size, failcnt=events.get("max", 0))
