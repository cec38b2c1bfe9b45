"""The process lifecycle as data: which operation each state allows and where it leads.

There is one table per kind of process: a container's init and an exec differ in what
they may do (an exec cannot be paused, updated or checkpointed; killing an exec that has
exited is NotFound, as containerd expects). An operation that is not in the table is
refused with a domain error naming the process and its state ("cannot start container
c1: it is running"), so the caller learns why.

Operations that call runc (pause, resume, ...) are checked first, run, and only then
applied, as containerd's runc shim does: a failed runc call leaves the state as it was,
so there is nothing to undo.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from shim.task.errors import FailedPrecondition, NotFound, TaskError


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"


class Op(enum.Enum):
    START = "start"
    KILL = "kill"
    EXEC = "exec"            # add an exec to the container (init only)
    UPDATE = "update"
    PAUSE = "pause"
    RESUME = "resume"
    CHECKPOINT = "checkpoint"
    RESIZE = "resize"
    DELETE = "delete"
    EXIT = "exit"            # not a request: the reaper reports the process gone


@dataclass(frozen=True)
class Refuse:
    """A table entry that refuses with an error of its own instead of FailedPrecondition."""
    error: type[TaskError]
    reason: str


Table = dict[tuple[State, Op], State | Refuse]

CREATED, RUNNING, PAUSED, STOPPED, DELETED = State

INIT: Table = {
    (CREATED, Op.START): RUNNING,
    (CREATED, Op.KILL): CREATED,
    (CREATED, Op.EXEC): CREATED,
    (CREATED, Op.UPDATE): CREATED,
    (CREATED, Op.RESIZE): CREATED,
    (CREATED, Op.DELETE): DELETED,
    (CREATED, Op.EXIT): STOPPED,
    (RUNNING, Op.KILL): RUNNING,
    (RUNNING, Op.EXEC): RUNNING,
    (RUNNING, Op.UPDATE): RUNNING,
    (RUNNING, Op.PAUSE): PAUSED,
    (RUNNING, Op.CHECKPOINT): RUNNING,
    (RUNNING, Op.RESIZE): RUNNING,
    (RUNNING, Op.EXIT): STOPPED,
    (PAUSED, Op.RESUME): RUNNING,
    (PAUSED, Op.KILL): PAUSED,
    (PAUSED, Op.UPDATE): PAUSED,
    (PAUSED, Op.CHECKPOINT): PAUSED,
    (PAUSED, Op.RESIZE): PAUSED,
    (PAUSED, Op.EXIT): STOPPED,
    (STOPPED, Op.KILL): STOPPED,
    # `ctr run -t` sends its first resize after Start: an init that has exited by then
    # must not make it print an error.
    (STOPPED, Op.RESIZE): STOPPED,
    (STOPPED, Op.DELETE): DELETED,
}

EXEC: Table = {
    (CREATED, Op.START): RUNNING,
    (CREATED, Op.KILL): Refuse(FailedPrecondition, "process not created"),
    (CREATED, Op.RESIZE): CREATED,
    (CREATED, Op.DELETE): DELETED,
    (RUNNING, Op.KILL): RUNNING,
    (RUNNING, Op.RESIZE): RUNNING,
    (RUNNING, Op.EXIT): STOPPED,
    (STOPPED, Op.KILL): Refuse(NotFound, "process already finished"),
    (STOPPED, Op.DELETE): DELETED,
}


def next_state(table: Table, state: State, op: Op, name: str) -> State:
    """The state after `op`, or the domain error that refuses it; `name` is the process
    as messages name it ('container c1', 'exec e1 in container c1')."""
    to = table.get((state, op))
    if isinstance(to, State):
        return to
    if isinstance(to, Refuse):
        raise to.error(f"{name}: {to.reason}")
    if state is DELETED:
        raise NotFound(f"{name}: already deleted")
    raise FailedPrecondition(f"cannot {op.value} {name}: it is {state.value}")


class Lifecycle:
    """The current state of one process; callers hold the process's lock around it."""

    __slots__ = ("state", "table", "name")

    def __init__(self, table: Table, name: str) -> None:
        self.state = CREATED
        self.table = table
        self.name = name

    def check(self, op: Op) -> None:
        next_state(self.table, self.state, op, self.name)

    def apply(self, op: Op) -> State:
        self.state = next_state(self.table, self.state, op, self.name)
        return self.state
