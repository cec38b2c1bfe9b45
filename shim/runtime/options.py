"""Runtime options: what containerd sends in `start`'s stdin and in Create.

containerd sends `containerd.runc.v1.Options` to runtimes it recognises as runc-like
and the legacy `containerd.linux.runc.CreateOptions` to every other runtime name (so
to this one, from ctr and the Go client); CRI sends `runtimeoptions.v1.Options` for a
runtime whose options are a free-form table. Unknown types are logged, never fatal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shim.runtime.config import DEFAULT_ROOT, RuncConfig

if TYPE_CHECKING:
    from shim.api.bootstrap_pb2 import BootstrapParams

log = logging.getLogger("shim.runtime.options")

RUNC_OPTIONS = "containerd.runc.v1.Options"
CREATE_OPTIONS = "containerd.linux.runc.CreateOptions"
RUNTIME_OPTIONS = "runtimeoptions.v1.Options"


@dataclass(frozen=True)
class Options:
    runc: RuncConfig
    shim_cgroup: str = ""
    trace: str = ""      # PyshimTrace: the shim's trace file (README: tracing)
    trace_dir: str = ""  # PyshimTraceDir: where io.pyshim.trace annotations may write


DEFAULT = Options(RuncConfig())  # for no options, or options of a type we do not know


def decode(type_url: str, value: bytes, context: str) -> Options:
    """Options from an Any's parts; defaults for an empty or unknown Any."""
    name = type_url.rsplit("/", 1)[-1]
    if name == RUNC_OPTIONS:
        from shim.api.runc_options_pb2 import Options as Pb
        o = Pb.FromString(value)
        return Options(RuncConfig(
            binary=o.binary_name or "runc", root=o.root or DEFAULT_ROOT,
            systemd_cgroup=o.systemd_cgroup, no_pivot_root=o.no_pivot_root,
            no_new_keyring=o.no_new_keyring, criu_path=o.criu_path,
            io_uid=o.io_uid or -1, io_gid=o.io_gid or -1), o.shim_cgroup)
    if name == CREATE_OPTIONS:
        from shim.api.runctypes_pb2 import CreateOptions
        c = CreateOptions.FromString(value)
        return Options(RuncConfig(
            no_pivot_root=c.no_pivot_root, no_new_keyring=c.no_new_keyring,
            io_uid=c.io_uid or -1, io_gid=c.io_gid or -1), c.shim_cgroup)
    if name == RUNTIME_OPTIONS:
        from shim.api.runtimeoptions_pb2 import Options as TableOptions
        r = TableOptions.FromString(value)
        return from_table(_load_table(r.config_body, r.config_path, context), context)
    if name:
        log.info("%s: ignoring runtime options of type %s", context, name)
    return DEFAULT


# pyshim's own keys of the options table -> Options fields (strings)
PYSHIM_KEYS = {"PyshimTrace": "trace", "PyshimTraceDir": "trace_dir"}
# The keys of CRI's options table (the runc shim's TOML names) -> RuncConfig fields.
TABLE_KEYS = {"BinaryName": "binary", "Root": "root", "SystemdCgroup": "systemd_cgroup",
              "NoPivotRoot": "no_pivot_root", "NoNewKeyring": "no_new_keyring",
              "CriuPath": "criu_path", "IoUid": "io_uid", "IoGid": "io_gid"}


def _load_table(body: bytes, path: str, context: str) -> dict:
    """The options table: containerd 1.7+ sends it as TOML in config_body; a ConfigPath
    names a TOML file holding it."""
    import tomllib
    try:
        if body:
            return tomllib.loads(body.decode())
        if path:
            with open(path, "rb") as f:
                return tomllib.load(f)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        log.warning("%s: runtime options %s unreadable: %s", context, path or "body", e)
    return {}


def from_table(table: dict, context: str) -> Options:
    fields = {}
    for key, value in table.items():
        if key in TABLE_KEYS:
            fields[TABLE_KEYS[key]] = value
        elif key not in ("TypeUrl", "ConfigPath", "ShimCgroup", *PYSHIM_KEYS):
            log.info("%s: ignoring unknown runtime option %s", context, key)
    try:
        config = RuncConfig(**fields)
    except TypeError as e:
        log.warning("%s: bad runtime options: %s", context, e)
        config = RuncConfig()
    own = {field: str(table[key]) for key, field in PYSHIM_KEYS.items() if key in table}
    return Options(config, str(table.get("ShimCgroup", "")), **own)


def decode_any_bytes(data: bytes, context: str) -> Options:
    """Options from a serialized google.protobuf.Any (start's stdin)."""
    if not data:
        return DEFAULT
    from google.protobuf.any_pb2 import Any
    from google.protobuf.message import DecodeError
    try:
        a = Any.FromString(data)
    except DecodeError:
        log.warning("%s: runtime options on stdin are not a protobuf Any; ignored", context)
        return DEFAULT
    return decode(a.type_url, a.value, context)


def bootstrap_params(data: bytes) -> BootstrapParams:
    from shim.api.bootstrap_pb2 import BootstrapParams
    return BootstrapParams.FromString(data)


def from_start_stdin(data: bytes, namespace: str, cid: str) -> Options:
    """The options `start` got on stdin: an Any (containerd up to 2.2) or, from 2.3,
    BootstrapParams with the options inside `extensions`."""
    context = f"start {cid}"
    if not data:
        return DEFAULT
    from google.protobuf.message import DecodeError
    try:
        params = bootstrap_params(data)
    except DecodeError:
        params = None
    if params is not None and params.instance_id == cid and params.namespace == namespace:
        for ext in params.extensions:
            found = decode(ext.value.type_url, ext.value.value, context)
            if found != DEFAULT:
                return found
        return DEFAULT
    return decode_any_bytes(data, context)
