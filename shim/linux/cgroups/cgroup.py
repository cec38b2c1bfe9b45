"""A container's cgroup, found from its init pid, and its metrics for Stats.

The numbers follow containerd/cgroups (cgroup1 and cgroup2 packages) so `ctr task metrics`
shows what it shows with the runc shim. Where that library errors out on a missing file,
this package leaves the number out: Stats should answer with what exists.
"""

from __future__ import annotations

import errno
import os
from typing import Mapping, Sequence

from google.protobuf.any_pb2 import Any

from shim.linux.cgroups import metrics_v1, metrics_v2
from shim.linux.cgroups.files import read, system_hugepage_sizes
from shim.linux.cgroups.mountinfo import CGROUP_ROOT, is_unified, parse_mountinfo, parse_proc_cgroup

V1_TYPE_URL = "io.containerd.cgroups.v1.Metrics"
V2_TYPE_URL = "io.containerd.cgroups.v2.Metrics"

# v1 controllers that metrics() reads; `exists` looks only at these, because a
# container may share other hierarchies (name=systemd at "/", say) with the host.
_V1_STAT_CONTROLLERS = ("pids", "cpu", "cpuacct", "memory", "blkio", "hugetlb", "rdma")


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
        proc_cgroup = read(f"/proc/{pid}/cgroup")
        if proc_cgroup is None:
            raise ProcessLookupError(errno.ESRCH, f"no process {pid}")
        mountinfo = read("/proc/self/mountinfo") or ""
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
            found = next(
                (m for m in mounts if m.fstype == "cgroup" and controller in m.options), None
            )
            if found is not None:
                v1_paths[controller] = found.path_for(path)
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
            return Any(type_url=V2_TYPE_URL,
                       value=metrics_v2.metrics(self.v2_path, self.hugepage_sizes()).SerializeToString())
        return Any(type_url=V1_TYPE_URL, value=metrics_v1.metrics(
            self.v1_paths, self._partitions, self.hugepage_sizes()).SerializeToString())

    def hugepage_sizes(self) -> tuple[str, ...]:
        if self._hugepage_sizes is None:
            return system_hugepage_sizes()
        return self._hugepage_sizes
