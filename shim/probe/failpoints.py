"""Failpoints: containerd's failpoint grammar, and the points where pyshim evaluates it.

A failpoint's value is a list of terms (containerd's `internal/failpoint` grammar):

    <count>*<type>[(arg)][-><more terms>]

Each evaluation fires the first term whose count is not used up, and uses one of its
count; once every count is used up the failpoint does nothing. `1*off->1*error(oops)`
lets the first call through and fails the second. A count of 0 never fires. The count
is required, the argument of `error` and `panic` runs to the first `)` and must not be
empty, `delay` takes whole milliseconds, and `off` takes no argument. Nothing is trimmed:
`1*error(x) ` (a trailing space) is malformed, as it is for containerd.

The types, with the meaning containerd gives them:

    off         nothing happens (the term only uses up its count)
    error(msg)  the operation fails with `msg` (a Task call: status Unknown, message msg)
    panic(msg)  the shim dies at once, as an unrecovered Go panic ends a Go shim: the
                message is logged and the process exits with status 2, no reply sent
    delay(ms)   sleep ms milliseconds, then go on

and pyshim's own, accepted only by pyshim's points (`io.pyshim.failpoint.<point>`):

    hang        block forever (the caller's deadline, or a kill, ends it)
    kill[(ms)]  SIGKILL the shim itself, at once or after ms milliseconds (without
                blocking: a reply or event in flight still goes out)
    drop        (events) the event is never forwarded
    dup         (events) the event is forwarded twice
    stop[(n)]   (stdio) stop copying this stream (after n bytes; the pipe is left
                open, so a writer blocks once it is full)
    close[(n)]  (stdio) close this stream early (after n bytes): the container's end
                sees EPIPE (output) or end of file (stdin)

Which point accepts which types is the table POINT_TYPES; the annotations and points
themselves are read by shim/probe/control.py. A malformed value raises FailpointError
naming the annotation, which the shim reports at Create as InvalidArgument.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

__all__ = ["Term", "Failpoint", "FailpointError", "parse", "CONTAINERD_TYPES", "PYSHIM_TYPES"]

CONTAINERD_TYPES = frozenset({"off", "error", "panic", "delay"})
PYSHIM_TYPES = CONTAINERD_TYPES | {"hang", "kill", "drop", "dup", "stop", "close"}

# type -> how its argument is given: "none" (no parentheses), "text" (required, up to
# the first ')'), "int" (required whole number), "opt-int" (optional whole number)
_ARG = {"off": "none", "error": "text", "panic": "text", "delay": "int", "hang": "none",
        "kill": "opt-int", "drop": "none", "dup": "none", "stop": "opt-int", "close": "opt-int"}

_COUNT = re.compile(r"[0-9]+")
_NAME = re.compile(r"[a-z]+")
_INT = re.compile(r"[0-9]+\)")


class FailpointError(ValueError):
    """A failpoint value that does not parse, or a type the point does not accept."""


@dataclass(frozen=True)
class Term:
    """One term as it fires: its type and argument (text for error/panic, an int for
    delay/kill (milliseconds) and stop/close (bytes), None when not given)."""

    type: str
    arg: str | int | None = None

    def __str__(self) -> str:
        return self.type if self.arg is None else f"{self.type}({self.arg})"


class Failpoint:
    """A parsed failpoint value; `evaluate` is safe from any thread."""

    __slots__ = ("name", "_terms", "_counts", "_lock")

    def __init__(self, name: str, terms: list[tuple[int, Term]]) -> None:
        self.name = name
        self._terms = [t for _, t in terms]
        self._counts = [c for c, _ in terms]
        self._lock = threading.Lock()

    def evaluate(self) -> Term | None:
        """The term that fires now (its count used by one), or None."""
        with self._lock:
            for i, count in enumerate(self._counts):
                if count > 0:
                    self._counts[i] = count - 1
                    return self._terms[i]
        return None

    def __str__(self) -> str:
        """The current state in the grammar (what is left of each count)."""
        with self._lock:
            return "->".join(f"{c}*{t}" for c, t in zip(self._counts, self._terms, strict=True))

    def __repr__(self) -> str:
        return f"Failpoint({self.name!r}, {str(self)!r})"


def parse(name: str, value: str, types: frozenset[str] = CONTAINERD_TYPES) -> Failpoint:
    """Parse `value`; `name` (the annotation) and the accepted `types` go into errors."""
    terms: list[tuple[int, Term]] = []
    pos = 0
    while True:
        pos, count, term = _parse_term(name, value, pos, types)
        terms.append((count, term))
        if pos == len(value):
            return Failpoint(name, terms)
        if not value.startswith("->", pos):
            raise FailpointError(f"{name}: invalid cascading terms at {value[pos:]!r} in {value!r}")
        pos += 2


def _parse_term(name: str, value: str, pos: int, types: frozenset[str]) -> tuple[int, int, Term]:
    m = _COUNT.match(value, pos)
    if m is None or not value.startswith("*", m.end()):
        raise FailpointError(f"{name}: expected <count>* at {value[pos:]!r} in {value!r}")
    count = int(m.group())
    pos = m.end() + 1
    m = _NAME.match(value, pos)
    kind = m.group() if m else ""
    if kind not in _ARG:
        raise FailpointError(f"{name}: invalid type at {value[pos:]!r} in {value!r}")
    if kind not in types:
        raise FailpointError(f"{name}: type {kind} is not accepted here "
                             f"(accepted: {', '.join(sorted(types))})")
    pos = m.end()  # type: ignore[union-attr]
    how = _ARG[kind]
    has_paren = value.startswith("(", pos)
    if how == "none" or (how == "opt-int" and not has_paren):
        return pos, count, Term(kind)
    if not has_paren:
        raise FailpointError(f"{name}: {kind} needs an argument in parentheses in {value!r}")
    pos += 1
    if how == "text":
        end = value.find(")", pos)
        if end <= pos:
            raise FailpointError(f"{name}: invalid argument for {kind} type in {value!r}")
        return end + 1, count, Term(kind, value[pos:end])
    m = _INT.match(value, pos)
    if m is None:
        raise FailpointError(f"{name}: {kind} takes a whole number, e.g. {kind}(100), in {value!r}")
    return m.end(), count, Term(kind, int(m.group()[:-1]))
