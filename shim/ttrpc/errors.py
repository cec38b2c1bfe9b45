"""Status codes (gRPC numbering) and the exception that carries one (ttrpc.md §10-§11)."""

from __future__ import annotations

import enum
from collections.abc import Iterable

from google.protobuf.any_pb2 import Any

from .ttrpc_pb2 import Status

__all__ = ["Code", "TTRPCError", "status_from_error", "error_from_status"]


class Code(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    CANCELED = 1  # alias: Go's spelling
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def _missing_(cls, value: object) -> Code | None:
        # A code from a newer peer: containerd maps unknown codes to Unknown too.
        return cls.UNKNOWN if isinstance(value, int) else None


class TTRPCError(Exception):
    """An RPC failure with a status. str(exc) is the status message.

    Raised by handlers to choose the status sent; raised by Client.call with the
    status received.
    """

    def __init__(self, code: int, message: str = "", details: Iterable[Any] = ()) -> None:
        super().__init__(message)
        self.code = Code(code)
        self.message = message
        self.details = tuple(details)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r})"

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:  # keep picklable despite the extra __init__ arguments
        return (type(self), (self.code, self.message, self.details))


def status_from_error(exc: TTRPCError) -> Status:
    st = Status(code=int(exc.code), message=exc.message)
    st.details.extend(exc.details)
    return st


def error_from_status(status: Status) -> TTRPCError | None:
    """The error a status stands for, or None for OK."""
    if status.code == Code.OK:
        return None
    return TTRPCError(status.code, status.message, status.details)
