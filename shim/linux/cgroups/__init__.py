"""cgroups: where they are mounted (mountinfo), a container's cgroup (cgroup), and its
Stats metrics for v1 and v2 (metrics_v1, metrics_v2), over the file readers both share
(files)."""

from shim.linux.cgroups.cgroup import V1_TYPE_URL, V2_TYPE_URL, Cgroup
from shim.linux.cgroups.files import MAX_UINT32, MAX_UINT64, hugepage_size_name, system_hugepage_sizes
from shim.linux.cgroups.mountinfo import (CGROUP_ROOT, Mount, is_unified, parse_mountinfo,
                                          parse_proc_cgroup, unescape_mountinfo)

__all__ = ["CGROUP_ROOT", "MAX_UINT32", "MAX_UINT64", "V1_TYPE_URL", "V2_TYPE_URL", "Cgroup",
           "Mount", "hugepage_size_name", "is_unified", "parse_mountinfo", "parse_proc_cgroup",
           "system_hugepage_sizes", "unescape_mountinfo"]
