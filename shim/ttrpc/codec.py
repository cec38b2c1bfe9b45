"""Sans-IO ttrpc framing: bytes in, events out; frames and messages to bytes.

Wire format (ttrpc.md §2-§5): a 10-byte big-endian header (data length u32,
stream id u32, message type u8, flags u8) followed by the data. Nothing here
touches a socket, so the server, the client and the tests share one decoder.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from google.protobuf.message import DecodeError

from .errors import Code, TTRPCError, status_from_error
from .ttrpc_pb2 import KeyValue, Request, Response

__all__ = [
    "HEADER_SIZE",
    "MAX_DATA_SIZE",
    "REQUEST",
    "RESPONSE",
    "DATA",
    "FLAG_REMOTE_CLOSED",
    "FLAG_REMOTE_OPEN",
    "FLAG_NO_DATA",
    "Frame",
    "FrameTooLarge",
    "FramingError",
    "Event",
    "Decoder",
    "DataTooLarge",
    "encode_frame",
    "encode_request",
    "encode_response",
    "decode_request",
    "decode_response",
    "too_large_error",
    "too_large_message",
]

HEADER_SIZE = 10
MAX_DATA_SIZE = 4 << 20  # messageLengthMax in containerd/ttrpc

REQUEST = 0x01
RESPONSE = 0x02
DATA = 0x03  # streaming only (ttrpc >= 1.2); never sent by this package
_KNOWN_TYPES = frozenset((REQUEST, RESPONSE, DATA))

FLAG_REMOTE_CLOSED = 0x01
FLAG_REMOTE_OPEN = 0x02
FLAG_NO_DATA = 0x04

_HEADER = struct.Struct(">IIBB")


# Events are NamedTuples rather than dataclasses: immutable, pattern-matchable,
# and free to import (the daemon imports this module at start-up).


class Frame(NamedTuple):
    """A complete frame."""

    stream_id: int
    type: int
    flags: int
    data: bytes


class FrameTooLarge(NamedTuple):
    """A frame whose declared length exceeds the limit; its data is being discarded."""

    stream_id: int
    type: int
    length: int


class FramingError(NamedTuple):
    """The input cannot be framed (unknown message type): the stream is garbage.

    Always the last event; the decoder ignores all further input.
    """

    reason: str


Event = Frame | FrameTooLarge | FramingError


class DataTooLarge(ValueError):
    """Refusal to encode a frame whose data exceeds MAX_DATA_SIZE."""

    def __init__(self, length: int) -> None:
        super().__init__(too_large_message(length))
        self.length = length


def too_large_message(length: int) -> str:
    # Text of containerd/ttrpc's OversizedMessageErr.
    return f"message length {length} exceed maximum message size of {MAX_DATA_SIZE}"


def too_large_error(length: int) -> TTRPCError:
    return TTRPCError(Code.RESOURCE_EXHAUSTED, too_large_message(length))


class Decoder:
    """Incremental frame decoder: feed() bytes as they arrive, get events back.

    Split and coalesced reads are both fine. Memory is bounded by one frame of
    max_data_size: an oversize frame is reported as soon as its header is
    complete and its data is dropped as it arrives, never buffered.
    """

    __slots__ = ("max_data_size", "_buf", "_header", "_discard", "_broken")

    def __init__(self, max_data_size: int = MAX_DATA_SIZE) -> None:
        self.max_data_size = max_data_size
        self._buf = bytearray()  # partial header, then partial data
        self._header: tuple[int, int, int, int] | None = None  # of the frame being read
        self._discard = 0  # bytes of an oversize frame still to drop
        self._broken = False

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (0 between frames)."""
        return len(self._buf) + (HEADER_SIZE if self._header else 0)

    @property
    def between_frames(self) -> bool:
        """True when no frame has been begun: nothing held and nothing being discarded."""
        return not self._buf and self._header is None and not self._discard

    def feed(self, data: bytes) -> list[Event]:
        if self._broken:
            return []
        events: list[Event] = []
        view = memoryview(data)
        pos, end = 0, len(view)
        buf = self._buf
        while True:
            if self._discard:
                n = min(self._discard, end - pos)
                self._discard -= n
                pos += n
                if self._discard:
                    break
            if self._header is None:
                take = min(HEADER_SIZE - len(buf), end - pos)
                buf += view[pos : pos + take]
                pos += take
                if len(buf) < HEADER_SIZE:
                    break
                header = _HEADER.unpack(buf)
                buf.clear()
                length, stream_id, mtype, _ = header
                if mtype not in _KNOWN_TYPES:
                    # Go's reader skips unknown types, but then any byte stream
                    # "frames"; treating it as garbage lets the server hang up.
                    self._broken = True
                    events.append(FramingError(f"unknown message type {mtype:#x} on stream {stream_id}"))
                    break
                if length > self.max_data_size:
                    self._discard = length
                    events.append(FrameTooLarge(stream_id, mtype, length))
                    continue
                self._header = header
            length, stream_id, mtype, flags = self._header
            if not buf and end - pos >= length:  # whole frame in this chunk: one copy
                payload = bytes(view[pos : pos + length])
                pos += length
            else:
                take = min(length - len(buf), end - pos)
                buf += view[pos : pos + take]
                pos += take
                if len(buf) < length:
                    break
                payload = bytes(buf)
                buf.clear()  # releases the allocation: idle connections hold nothing
            self._header = None
            events.append(Frame(stream_id, mtype, flags, payload))
        return events


def encode_frame(stream_id: int, mtype: int, flags: int, data: bytes = b"") -> bytes:
    if len(data) > MAX_DATA_SIZE:
        raise DataTooLarge(len(data))
    return _HEADER.pack(len(data), stream_id, mtype, flags) + data


def encode_request(
    stream_id: int,
    service: str,
    method: str,
    payload: bytes,
    *,
    timeout_nano: int = 0,
    metadata: list[tuple[str, str]] | None = None,
) -> bytes:
    req = Request(service=service, method=method, payload=payload, timeout_nano=timeout_nano)
    if metadata:
        req.metadata.extend(KeyValue(key=k, value=v) for k, v in metadata)
    return encode_frame(stream_id, REQUEST, 0, req.SerializeToString())


def decode_request(data: bytes) -> Request:
    """Parse a Request frame's data; raises TTRPCError(InvalidArgument) like Go's server."""
    req = Request()
    try:
        req.ParseFromString(data)
    except DecodeError as exc:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}") from None
    return req


def encode_response(stream_id: int, payload: bytes = b"", error: TTRPCError | None = None) -> bytes:
    """A Response frame: payload only on success (empty payload -> 0-byte frame), status only on error."""
    resp = Response()
    if error is not None:
        resp.status.CopyFrom(status_from_error(error))
    elif payload:
        resp.payload = payload
    return encode_frame(stream_id, RESPONSE, 0, resp.SerializeToString())


def decode_response(data: bytes) -> Response:
    """Parse a Response frame's data; raises TTRPCError(Internal) if undecodable."""
    resp = Response()
    try:
        resp.ParseFromString(data)
    except DecodeError as exc:
        raise TTRPCError(Code.INTERNAL, f"ttrpc: error unmarshalling response: {exc}") from None
    return resp
