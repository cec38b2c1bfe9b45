"""What the task service refuses or fails at, as domain errors, and their one mapping to
ttrpc status codes.

Errors are raised where they happen, with a message that names the container, exec and
operation; the RPC boundary (`TaskService.methods`) turns them into ttrpc statuses with
`to_status`, so no handler builds a transport error itself.
"""

from __future__ import annotations

from typing import ClassVar

from shim.ttrpc import Code, TTRPCError


class TaskError(Exception):
    """A request that cannot be carried out; `code` is what containerd is told."""

    code: ClassVar[Code] = Code.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(TaskError):
    code = Code.NOT_FOUND


class AlreadyExists(TaskError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(TaskError):
    """Legal in another state: the message names the state it is in."""
    code = Code.FAILED_PRECONDITION


class InvalidArgument(TaskError):
    code = Code.INVALID_ARGUMENT


class RuntimeFailed(TaskError):
    """runc, or the system beneath it, could not do what was asked (containerd's Unknown)."""
    code = Code.UNKNOWN


# containerd's errdefs words a class's errors "<cause>: <class>"; containerd 1.x strips and
# re-adds that suffix when it passes an error on, 2.x passes the message as it is, so the
# shim words them that way itself (ctr then shows "…: process already finished: not found").
_CLASS_TEXT = {Code.NOT_FOUND: "not found", Code.ALREADY_EXISTS: "already exists"}


def to_status(e: TaskError) -> TTRPCError:
    message = e.message
    suffix = _CLASS_TEXT.get(e.code)
    if suffix and not message.endswith(suffix):
        message = f"{message}: {suffix}"
    return TTRPCError(e.code, message)
