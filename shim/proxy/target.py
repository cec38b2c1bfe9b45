"""Which shim the proxy stands in front of, and what it keeps about it in the bundle.

The target is named, most specific first, by
  1. the OCI annotation TARGET_ANNOTATION on the container: a runtime name only
     (`io.containerd.runc.v2`), looked up like containerd looks up a shim, because an
     annotation may come from whoever writes a pod spec, and must not name a program;
  2. TARGET_ENV in containerd's environment: a runtime name or an absolute path;
  3. DEFAULT_TARGET.
`start` writes what it learnt (target binary, the target's own address, the proxy's sockets)
to STATE_FILE in the bundle, because `delete` must run the same target's `delete`, maybe
after containerd, the proxy and the target have all been restarted or killed.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

from shim.binary.address import parse_json
from shim.proxy import PROXY_BINARY, PROXY_RUNTIME

DEFAULT_TARGET = "io.containerd.runc.v2"
TARGET_ENV = "PYSHIM_PROXY_TARGET"
TARGET_ANNOTATION = "io.pyshimproxy.target"
STATE_FILE = "pyshimproxy.json"


class TargetError(Exception):
    pass


class Target(NamedTuple):
    runtime: str  # as configured: a runtime name or a path
    binary: str  # absolute path of the shim executable


def binary_name(runtime: str) -> str:
    """`io.containerd.runc.v2` -> `containerd-shim-runc-v2` (containerd's rule)."""
    parts = runtime.split(".")
    if len(parts) < 2 or not all(parts[-2:]):
        raise TargetError(f"invalid runtime name {runtime!r}")
    return f"containerd-shim-{parts[-2]}-{parts[-1]}"


def configured(annotations: dict[str, str], environ: dict[str, str]) -> str:
    """The target runtime (or path) the configuration asks for, annotation first."""
    value = annotations.get(TARGET_ANNOTATION, "")
    if value:
        if "/" in value:
            raise TargetError(f"annotation {TARGET_ANNOTATION}={value!r}: a runtime name, "
                              f"not a path (paths only in {TARGET_ENV})")
        return value
    return environ.get(TARGET_ENV, "") or DEFAULT_TARGET


def resolve(runtime: str, containerd_binary: str = "", path: str | None = None) -> Target:
    """Find the target's executable the way containerd finds a shim: an absolute path as it
    is; a runtime name on PATH, then beside the containerd executable."""
    if runtime.startswith("/"):
        candidates = [runtime]
    else:
        name = binary_name(runtime)
        dirs = (os.environ.get("PATH", os.defpath) if path is None else path).split(os.pathsep)
        if containerd_binary:
            dirs.append(os.path.dirname(containerd_binary))
        candidates = [os.path.join(d or ".", name) for d in dirs]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            binary = os.path.abspath(candidate)
            if os.path.basename(binary) == PROXY_BINARY:
                raise TargetError(f"target {runtime!r} is the proxy itself ({PROXY_RUNTIME})")
            return Target(runtime, binary)
    raise TargetError(f"target shim {runtime!r} not found (looked for {candidates[0] if runtime.startswith('/') else binary_name(runtime)} "
                      f"on PATH and beside {containerd_binary or 'containerd'})")


def annotations_of(bundle: str) -> dict[str, str]:
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = parse_json(f.read())
    except (OSError, ValueError):
        return {}
    found = spec.get("annotations") if isinstance(spec, dict) else None
    return {k: v for k, v in found.items() if isinstance(v, str)} if isinstance(found, dict) else {}


# -- the target's `start` output --------------------------------------------------------------

class StartOutput(NamedTuple):
    """What a shim's `start` printed: a plain address, or JSON {"version", "address", "protocol"}."""

    address: str
    document: dict | None  # the JSON form, None for a plain address

    def with_address(self, address: str) -> str:
        """The same answer, pointing at `address` (so containerd sees the same version)."""
        if self.document is None:
            return address
        return json.dumps({**self.document, "address": address})


def parse_start_output(output: bytes) -> StartOutput:
    text = output.decode(errors="replace").strip()
    if text.startswith("{"):
        try:
            document = json.loads(text)
        except ValueError:
            document = None
        if isinstance(document, dict) and isinstance(document.get("address"), str):
            return StartOutput(document["address"], document)
    if not text.startswith("unix://") or any(c.isspace() for c in text):
        raise TargetError(f"the target's start printed no unix:// address: {text!r}")
    return StartOutput(text, None)


# -- the state file ----------------------------------------------------------------------------

class State(NamedTuple):
    target_runtime: str
    target_binary: str
    target_address: str  # unix://… of the target's task socket
    proxy_address: str  # unix://… of the proxy's task socket (also in <bundle>/address)
    events_socket: str  # the TTRPC_ADDRESS the target got (a path)


def write_state(bundle: str, state: State) -> None:
    tmp = os.path.join(bundle, f".{STATE_FILE}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(state._asdict(), indent=1).encode())
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(bundle, STATE_FILE))


def read_state(bundle: str) -> State | None:
    try:
        with open(os.path.join(bundle, STATE_FILE), "rb") as f:
            data = json.loads(f.read())
        return State(**{k: str(data[k]) for k in State._fields})
    except (OSError, ValueError, KeyError, TypeError):
        return None
