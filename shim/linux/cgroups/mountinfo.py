"""Where cgroups are mounted: /proc/self/mountinfo and /proc/<pid>/cgroup parsed.

Two layouts, as containerd's runc shim sees them:
  * cgroup v2 (unified): `/sys/fs/cgroup` itself is a cgroup2 mount; one directory.
  * cgroup v1 (and hybrid, where a cgroup2 mount sits beside the v1 ones): one directory
    per controller, each under that controller's own mount point.
"""

from __future__ import annotations

import os
from typing import Sequence

CGROUP_ROOT = "/sys/fs/cgroup"


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

