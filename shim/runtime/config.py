"""Which runtime binary runs a container, and how: the runc options of containerd.

Kept apart from shim/runtime/runc.py, and free of imports, because the `delete` action, which
containerd waits for after every container, needs it and nothing else of runc. For the
same reason the options are saved in the bundle as plain `key=value` lines, not JSON.
"""

from __future__ import annotations

import os

DEFAULT_ROOT = "/run/containerd/runc"
OPTIONS_FILE = "runc-options"  # in the bundle: lets the `delete` action find runc again

# field -> default; the type of the default is the field's type
_DEFAULTS: dict[str, str | bool | int] = {
    "binary": "runc", "root": DEFAULT_ROOT, "systemd_cgroup": False, "no_pivot_root": False,
    "no_new_keyring": False, "criu_path": "",
    "io_uid": -1, "io_gid": -1,  # owner of the container's stdio pipes (-1: the shim's)
}


class RuncConfig:
    """containerd.runc.v1.Options as far as the shim uses them. Immutable."""

    __slots__ = tuple(_DEFAULTS)
    _fields = tuple(_DEFAULTS)

    binary: str
    root: str
    systemd_cgroup: bool
    no_pivot_root: bool
    no_new_keyring: bool
    criu_path: str
    io_uid: int
    io_gid: int

    def __init__(self, **fields: str | bool | int) -> None:
        unknown = set(fields) - set(_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown runc option(s): {', '.join(sorted(unknown))}")
        for name, default in _DEFAULTS.items():
            value = fields.get(name, default)
            if type(value) is not type(default):
                raise TypeError(f"runc option {name} must be {type(default).__name__}")
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("RuncConfig is immutable")

    def _asdict(self) -> dict[str, str | bool | int]:
        return {name: getattr(self, name) for name in self._fields}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RuncConfig) and self._asdict() == other._asdict()

    def __hash__(self) -> int:
        return hash(tuple(self._asdict().items()))

    def __repr__(self) -> str:
        changed = ", ".join(f"{k}={v!r}" for k, v in self._asdict().items() if v != _DEFAULTS[k])
        return f"RuncConfig({changed})"

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
        lines = []
        for name, value in self._asdict().items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            if "\n" in text:
                raise ValueError(f"runc option {name} contains a newline")
            lines.append(f"{name}={text}\n")
        path = os.path.join(bundle, OPTIONS_FILE)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(lines)

    @classmethod
    def load(cls, bundle: str) -> RuncConfig:
        """The config saved by Create, or the defaults when there is none."""
        fields: dict[str, str | bool | int] = {}
        try:
            with open(os.path.join(bundle, OPTIONS_FILE)) as f:
                for line in f:
                    name, sep, text = line.rstrip("\n").partition("=")
                    default = _DEFAULTS.get(name)
                    if not sep or default is None:
                        continue
                    if isinstance(default, bool):
                        fields[name] = text == "true"
                    elif isinstance(default, int):
                        fields[name] = int(text)
                    else:
                        fields[name] = text
        except (OSError, ValueError):
            return cls()
        return cls(**fields)
