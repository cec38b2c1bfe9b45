"""Helpers for the unit tests that create real cgroup v1 groups on this host."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from shim.linux.cgroups import is_unified, parse_mountinfo


def v1_mount_points() -> dict[str, str]:
    """controller -> mount point of its (whole) v1 hierarchy; empty on a unified host."""
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    if is_unified(mounts):
        return {}
    out: dict[str, str] = {}
    for m in mounts:
        if m.fstype == "cgroup" and m.root == "/":
            for opt in m.options:
                out.setdefault(opt, m.mount_point)
    return out


def live_v1_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    if "memory" not in v1_mount_points():
        return "needs a cgroup v1 memory controller (this host is not cgroup v1)"
    return None


live_v1 = pytest.mark.skipif(live_v1_skip_reason() is not None, reason=live_v1_skip_reason() or "")


def rmdir_retry(path: str) -> None:
    # rmdir says EBUSY for a moment after the last task left.
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)
    os.rmdir(path)
