"""`containerd-shim-pyshim-v1 -info`: what containerd 2.x's introspection API reports.

containerd runs it with the runtime options (a protobuf Any, possibly empty) on stdin
and reads a `containerd.types.RuntimeInfo` from stdout: the runtime's name and version,
the options echoed back, and the features of the OCI runtime those options select (the
JSON of `runc features`, or crun's), which containerd checks e.g. for idmap mounts.
"""

from __future__ import annotations

import subprocess

# typeurl's name for runtime-spec's features.Features (a JSON-encoded Go struct)
FEATURES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"


def runtime_info(stdin: bytes, name: str, version: str) -> bytes:
    """The serialized RuntimeInfo for options `stdin`; raises ValueError for bad input."""
    from google.protobuf.any_pb2 import Any
    from google.protobuf.message import DecodeError

    from shim.runtime import options
    from shim.api.introspection_pb2 import RuntimeInfo, RuntimeVersion
    from shim.runtime.config import RuncConfig

    info = RuntimeInfo(name=name, version=RuntimeVersion(version=version))
    config = RuncConfig()
    if stdin:
        try:
            given = Any.FromString(stdin)
        except DecodeError:
            raise ValueError("runtime options on stdin are not a protobuf Any") from None
        info.options.CopyFrom(given)
        config = options.decode(given.type_url, given.value, "info").runc
    features = _features(config.binary)
    if features:
        info.features.CopyFrom(Any(type_url=FEATURES_TYPE_URL, value=features))
    return info.SerializeToString()


def _features(binary: str) -> bytes:
    """`<binary> features` (runc >= 1.1, crun >= 1.4); empty when it has none."""
    try:
        result = subprocess.run([binary, "features"], stdin=subprocess.DEVNULL,
                                capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return b""
    return result.stdout if result.returncode == 0 else b""
