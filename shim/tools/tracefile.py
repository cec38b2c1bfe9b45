"""Reading a trace (shim/probe/trace.py's format): every line checked, errors naming file and line.

A tool that misreads a trace silently would draw wrong conclusions about a shim, so a line
that is not a JSON object, has a kind the format does not know, or lacks a key its kind
must have is an error, as is a file with no record at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

KINDS = ("call", "runc", "event", "exit", "stdio", "phase", "failpoint")
SOURCES = ("pyshim", "proxy")
COMMON = {"ts": (int, float), "wall": (int, float), "pid": int, "src": str, "kind": str}
# kind -> key -> accepted types
REQUIRED: dict[str, dict[str, Any]] = {
    "call": {"service": str, "method": str, "code": int, "duration": (int, float)},
    "runc": {"argv": list, "duration": (int, float), "exit_status": int},
    "event": {"topic": str, "ok": bool},
    "exit": {"proc_pid": int, "status": int},
    "stdio": {"stream": str, "phase": str},
    "phase": {"name": str},
    "failpoint": {"point": str, "action": str},
}

Record = dict[str, Any]


class TraceError(Exception):
    """A trace that cannot be read; str() names the file and line."""


def load(path: str) -> list[Record]:
    """The records of the trace at `path`, in the file's order."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror}") from None
    return parse(data.decode("utf-8", errors="replace").splitlines(), path)


def parse(lines: Iterable[str], name: str = "<trace>") -> list[Record]:
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        records.append(check(line, name, number))
    if not records:
        raise TraceError(f"{name}: empty trace: no records")
    return records


def check(line: str, name: str, number: int) -> Record:
    where = f"{name}:{number}"
    try:
        rec = json.loads(line)
    except ValueError as e:
        raise TraceError(f"{where}: not JSON: {e}") from None
    if not isinstance(rec, dict):
        raise TraceError(f"{where}: a record must be a JSON object, not {type(rec).__name__}")
    _keys(rec, COMMON, where)
    if "id" not in rec or not (rec["id"] is None or isinstance(rec["id"], str)):
        raise TraceError(f"{where}: missing key 'id' (a container id or null)")
    kind = rec["kind"]
    if kind not in REQUIRED:
        raise TraceError(f"{where}: unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    if rec["src"] not in SOURCES:
        raise TraceError(f"{where}: unknown src {rec['src']!r} (expected {' or '.join(SOURCES)})")
    _keys(rec, REQUIRED[kind], where, kind)
    return rec


def _keys(rec: Record, wanted: dict[str, Any], where: str, kind: str = "") -> None:
    for key, types in wanted.items():
        if key not in rec:
            raise TraceError(f"{where}: {kind + ' ' if kind else ''}record without key {key!r}")
        value = rec[key]
        if isinstance(value, bool) and types is not bool and bool not in (types if isinstance(types, tuple) else (types,)):
            raise TraceError(f"{where}: key {key!r} must be {_name(types)}, not a boolean")
        if not isinstance(value, types):
            raise TraceError(f"{where}: key {key!r} must be {_name(types)}, not {type(value).__name__}")


def _name(types: Any) -> str:
    if isinstance(types, tuple):
        return "a number"
    return {str: "a string", int: "an integer", list: "a list", bool: "a boolean"}.get(types, str(types))


# -- views on the records ----------------------------------------------------------------------


def containers(records: list[Record]) -> list[str]:
    """Container ids, in the order of their first record."""
    seen: dict[str, float] = {}
    for r in records:
        cid = r.get("id")
        if cid and (cid not in seen or r["ts"] < seen[cid]):
            seen[cid] = r["ts"]
    return sorted(seen, key=seen.__getitem__)


def calls(records: list[Record], cid: str | None = None, src: str | None = None) -> list[Record]:
    """Call records (of container `cid`, of source `src`) in the order the calls began."""
    return sorted((r for r in records if r["kind"] == "call" and (cid is None or r.get("id") == cid)
                   and (src is None or r["src"] == src)), key=lambda r: r["ts"])


def sources(records: list[Record]) -> list[str]:
    return [s for s in SOURCES if any(r["src"] == s for r in records)]


def call_label(r: Record) -> str:
    """`Start`, or `Start(exec1)` for a call about an exec."""
    return f"{r['method']}({r['exec_id']})" if r.get("exec_id") else r["method"]


RUNC_VERBS = frozenset({"create", "start", "run", "exec", "kill", "delete", "pause", "resume", "update",
                        "ps", "state", "events", "checkpoint", "restore", "list", "features"})


def runc_verb(argv: list) -> str:
    """`create` of `runc --root … --log-format json create --bundle … id` (flag values are no verb)."""
    return next((a for a in argv[1:] if a in RUNC_VERBS), "runc")
