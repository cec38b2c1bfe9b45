"""The process lifecycle as data: which operation each state allows and where it leads.

Init and exec processes share one table (as containerd's runc shim does with its init
states); an exec differs only in what its operations do, not in when they are legal.
Anything not in the table is refused with FailedPrecondition naming the state, so a
caller learns why ("cannot start a running process") rather than a bare error.
"""

from __future__ import annotations

import enum

from shim.ttrpc import Code, TTRPCError


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"


# (state, operation) -> next state. An operation that keeps the state maps to it.
# "exit" is not a request but the reaper reporting the process gone; "pause_failed" and
# "resume_failed" undo a pause or resume whose runc call failed.
TRANSITIONS: dict[tuple[State, str], State] = {
    (State.CREATED, "start"): State.RUNNING,
    (State.CREATED, "kill"): State.CREATED,
    (State.CREATED, "delete"): State.DELETED,
    (State.CREATED, "exec"): State.CREATED,
    (State.CREATED, "update"): State.CREATED,
    (State.CREATED, "exit"): State.STOPPED,
    (State.RUNNING, "kill"): State.RUNNING,
    (State.RUNNING, "pause"): State.PAUSING,
    (State.RUNNING, "exec"): State.RUNNING,
    (State.RUNNING, "update"): State.RUNNING,
    (State.RUNNING, "checkpoint"): State.RUNNING,
    (State.RUNNING, "exit"): State.STOPPED,
    (State.RUNNING, "resume_failed"): State.PAUSED,
    (State.PAUSING, "paused"): State.PAUSED,
    (State.PAUSING, "pause_failed"): State.RUNNING,
    (State.PAUSING, "kill"): State.PAUSING,
    (State.PAUSING, "exit"): State.STOPPED,
    (State.PAUSED, "resume"): State.RUNNING,
    (State.PAUSED, "kill"): State.PAUSED,
    (State.PAUSED, "update"): State.PAUSED,
    (State.PAUSED, "checkpoint"): State.PAUSED,
    (State.PAUSED, "exit"): State.STOPPED,
    (State.STOPPED, "kill"): State.STOPPED,
    (State.STOPPED, "delete"): State.DELETED,
}


def next_state(state: State, op: str) -> State:
    """The state after `op`, or FailedPrecondition when `op` is illegal in `state`."""
    try:
        return TRANSITIONS[(state, op)]
    except KeyError:
        if state is State.DELETED:
            raise TTRPCError(Code.NOT_FOUND, "process already deleted") from None
        raise TTRPCError(
            Code.FAILED_PRECONDITION, f"cannot {op} a {state.value} process"
        ) from None


class Lifecycle:
    """The current state of one process; callers hold the process's lock around it."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = State.CREATED

    def check(self, op: str) -> None:
        next_state(self.state, op)

    def apply(self, op: str) -> State:
        self.state = next_state(self.state, op)
        return self.state
