"""Which runtime binary runs a container, and how: the runc options of containerd.

Kept apart from shim/runc.py (and free of heavy imports) because the `delete` action,
which containerd waits for after every container, needs it and nothing else of runc.
"""

from __future__ import annotations

import json
import os
from collections import namedtuple

DEFAULT_ROOT = "/run/containerd/runc"
OPTIONS_FILE = "options.json"  # in the bundle: lets the `delete` action find runc again

_Fields = namedtuple("_Fields", ["binary", "root", "systemd_cgroup", "no_pivot_root",
                                 "no_new_keyring", "criu_path", "io_uid", "io_gid"],
                     defaults=["runc", DEFAULT_ROOT, False, False, False, "", -1, -1])


class RuncConfig(_Fields):
    """containerd.runc.v1.Options as far as the shim uses them (io_uid/io_gid -1: the
    shim's own ids for the container's stdio pipes)."""

    __slots__ = ()

    def command(self, namespace: str, bundle: str, *args: str) -> list[str]:
        """A full runc command line: global flags, then `args`."""
        argv = [self.binary, "--root", os.path.join(self.root, namespace),
                "--log", os.path.join(bundle, "log.json"), "--log-format", "json"]
        if self.criu_path:
            argv += ["--criu", self.criu_path]
        if self.systemd_cgroup:
            argv.append("--systemd-cgroup")
        return argv + list(args)

    def save(self, bundle: str) -> None:
        path = os.path.join(bundle, OPTIONS_FILE)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._asdict(), f)

    @classmethod
    def load(cls, bundle: str) -> "RuncConfig":
        """The config saved by Create, or the defaults when there is none."""
        try:
            with open(os.path.join(bundle, OPTIONS_FILE)) as f:
                data = json.load(f)
            return cls(**{k: v for k, v in data.items() if k in cls._fields})
        except (OSError, ValueError, TypeError, AttributeError):
            return cls()
