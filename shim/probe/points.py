"""Where failpoints and traces are asked for: the annotations, the points, their types.

Annotations of a container's config.json, read at Create:

    io.containerd.runtime.v2.shim.failpoint.<Method>   containerd's own: evaluated when the
        Task call <Method> arrives, before it runs (types off, error, panic, delay)
    io.pyshim.failpoint.<point>                        pyshim's own points (POINTS below)
    io.pyshim.trace                                    trace this container to a file in
        the trace directory (see `trace_path`)

A failpoint applies to the calls, runc commands, events, exits and stdio of the
container whose annotations name it (its execs included).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from .failpoints import CONTAINERD_TYPES, Failpoint, FailpointError, parse

CONTAINERD_PREFIX = "io.containerd.runtime.v2.shim.failpoint."
PYSHIM_PREFIX = "io.pyshim.failpoint."
TRACE_ANNOTATION = "io.pyshim.trace"
TRACE_ENV = "PYSHIM_TRACE"          # containerd's environment: trace every shim to this file
TRACE_DIR_ENV = "PYSHIM_TRACE_DIR"  # where io.pyshim.trace may write
DEFAULT_TRACE_DIR = "/run/pyshim/trace"
# What must occur in config.json for it to be worth parsing at Create (a byte search).
MARKERS = (b'"io.pyshim.', b'"' + CONTAINERD_PREFIX.encode())

TASK_METHODS = ("State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint",
                "Kill", "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect",
                "Shutdown")
RUNC_VERBS = ("create", "start", "exec", "kill", "delete", "pause", "resume", "update", "ps",
              "checkpoint", "restore")
EVENT_TOPICS = ("create", "start", "exit", "delete", "exec-added", "exec-started", "paused",
                "resumed", "oom", "checkpointed")
STDIO_STREAMS = ("stdin", "stdout", "stderr")

_CRASH = frozenset({"off", "delay", "hang", "kill", "panic"})
_CALL = _CRASH | {"error"}
# point -> the types it accepts
POINTS: dict[str, frozenset[str]] = {
    **{f"{m}.{when}": _CALL for m in TASK_METHODS for when in ("before", "after")},
    **{f"runc.{v}.{when}": _CALL for v in RUNC_VERBS for when in ("before", "after")},
    **{f"event.{t}": _CRASH | {"drop", "dup"} for t in EVENT_TOPICS},
    "exit": _CRASH,
    **{f"stdio.{s}": _CRASH | {"stop", "close"} for s in STDIO_STREAMS},
}


class ProbeConfigError(ValueError):
    """An annotation pyshim cannot honour; the message names it (InvalidArgument at Create)."""


def failpoints(annotations: Mapping[str, str]) -> dict[str, Failpoint]:
    """point -> failpoint for every failpoint annotation. containerd's `<Method>` is the
    point named `<Method>` (evaluated before `<Method>.before`)."""
    found: dict[str, Failpoint] = {}
    for key, value in annotations.items():
        if key.startswith(CONTAINERD_PREFIX):
            point = key[len(CONTAINERD_PREFIX):]
            if point not in TASK_METHODS:
                raise ProbeConfigError(f"annotation {key}: {point!r} is not a Task method "
                                       f"(one of {', '.join(TASK_METHODS)})")
            types = CONTAINERD_TYPES
        elif key.startswith(PYSHIM_PREFIX):
            point = key[len(PYSHIM_PREFIX):]
            types = POINTS.get(point)  # type: ignore[assignment]
            if types is None:
                raise ProbeConfigError(f"annotation {key}: unknown failpoint {point!r} "
                                       "(see the README's failpoint table)")
        else:
            continue
        if not isinstance(value, str):
            raise ProbeConfigError(f"annotation {key}: value must be a string")
        try:
            found[point] = parse(key, value, types)
        except FailpointError as e:
            raise ProbeConfigError(f"annotation {e}") from None
    return found


def check_annotations(annotations: Mapping[str, str]) -> None:
    """Refuse an io.pyshim.* annotation that is neither a failpoint nor the trace."""
    for key in annotations:
        if key.startswith("io.pyshim.") and key != TRACE_ANNOTATION \
                and not key.startswith(PYSHIM_PREFIX):
            raise ProbeConfigError(f"annotation {key}: unknown pyshim annotation "
                                   f"(expected {TRACE_ANNOTATION} or {PYSHIM_PREFIX}<point>)")


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def trace_path(value: str, trace_dir: str) -> str:
    """Where io.pyshim.trace=`value` writes: a file directly in `trace_dir`.

    The annotation is request data (on Kubernetes, a pod's author may set it), so it may
    only name a file in a directory the node's administrator made for traces: `value` is
    a file name, or an absolute path whose directory is `trace_dir`; `trace_dir` must be
    a real directory (no symlink) owned by the shim's user and writable by nobody else.
    The file itself is opened without following a symlink.
    """
    name = os.path.basename(value) if os.path.isabs(value) and \
        os.path.normpath(os.path.dirname(value)) == os.path.normpath(trace_dir) else value
    if not _NAME.fullmatch(name):
        raise ProbeConfigError(f"annotation {TRACE_ANNOTATION}: {value!r} must be a file name "
                               f"in the trace directory {trace_dir}")
    try:
        st = os.lstat(trace_dir)
    except OSError as e:
        raise ProbeConfigError(f"annotation {TRACE_ANNOTATION}: trace directory {trace_dir}: "
                               f"{e.strerror} (set {TRACE_DIR_ENV} or create it, mode 0700)") from None
    import stat
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ProbeConfigError(f"annotation {TRACE_ANNOTATION}: trace directory {trace_dir} must "
                               "be a directory owned by the shim's user, writable by it alone")
    return os.path.join(trace_dir, name)


def read_annotations(config_json: str) -> dict[str, str] | None:
    """The annotations of a bundle's config.json, or None when it has none of pyshim's
    or containerd's failpoint annotations (decided by a byte search, without parsing)."""
    try:
        with open(config_json, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if not any(m in data for m in MARKERS):
        return None
    import json
    try:
        annotations = json.loads(data).get("annotations") or {}
    except (ValueError, AttributeError):
        return None
    if not isinstance(annotations, dict):
        return None
    return {k: v for k, v in annotations.items()
            if k.startswith(("io.pyshim.", CONTAINERD_PREFIX))}
