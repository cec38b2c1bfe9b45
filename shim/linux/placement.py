"""Where the shim daemon runs: the cgroup containerd asks for, and its OOM score.

The daemon places itself first thing (daemon.serve), before it answers containerd, as
containerd's runc shim does: the shim belongs in ShimCgroup when one is configured,
and its oom_score_adj is containerd's plus one, so that under memory pressure the
kernel picks a shim before containerd. Lowering a score needs CAP_SYS_RESOURCE;
without it the failure is a warning, not an error.
"""

from __future__ import annotations

import logging
import os

from shim.linux.cgroups import CGROUP_ROOT, parse_mountinfo

log = logging.getLogger("shim.linux.placement")

OOM_SCORE_MAX = 1000


def _hierarchies(root: str = CGROUP_ROOT) -> list[str]:
    """The cgroup mount points: the root itself on a unified (v2) host, else each v1
    controller hierarchy mounted under it."""
    try:
        with open("/proc/self/mountinfo") as f:
            text = f.read()
    except OSError:
        return []
    return [m.mount_point for m in parse_mountinfo(text)
            if m.fstype in ("cgroup", "cgroup2") and m.mount_point.startswith(root)]


def join_cgroup(pid: int, path: str) -> None:
    """Move `pid` into cgroup `path` in every hierarchy where that cgroup exists."""
    joined = False
    for mountpoint in _hierarchies():
        procs = os.path.join(mountpoint, path.lstrip("/"), "cgroup.procs")
        if not os.path.exists(procs):
            continue
        try:
            with open(procs, "w") as f:
                f.write(str(pid))
            joined = True
        except OSError as e:
            log.warning("moving the shim (pid %d) to %s: %s", pid, procs, e)
    if not joined:
        log.warning("shim cgroup %s does not exist; the shim stays where it is", path)


def adjust_oom_score(pid: int, parent: int) -> None:
    try:
        with open(f"/proc/{parent}/oom_score_adj") as f:
            score = min(int(f.read().strip()) + 1, OOM_SCORE_MAX)
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(score))
    except (OSError, ValueError) as e:
        log.warning("setting the shim's oom_score_adj: %s", e)
