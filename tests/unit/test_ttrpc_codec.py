"""Sans-IO framing: no sockets here."""

import struct

import pytest
from google.protobuf import wrappers_pb2

from shim.ttrpc import Code, TTRPCError, codec
from shim.ttrpc.codec import (
    DATA,
    MAX_DATA_SIZE,
    REQUEST,
    RESPONSE,
    DataTooLarge,
    Decoder,
    Frame,
    FrameTooLarge,
    FramingError,
    encode_frame,
)
from shim.ttrpc.errors import error_from_status, status_from_error


def header(length: int, sid: int, mtype: int = REQUEST, flags: int = 0) -> bytes:
    return struct.pack(">IIBB", length, sid, mtype, flags)


def test_header_layout_is_big_endian():
    assert encode_frame(0x01020304, RESPONSE, 0x05, b"xy") == b"\x00\x00\x00\x02\x01\x02\x03\x04\x02\x05xy"


def test_round_trip():
    wire = encode_frame(7, REQUEST, 0, b"hello")
    assert Decoder().feed(wire) == [Frame(7, REQUEST, 0, b"hello")]


def test_split_one_byte_at_a_time():
    wire = encode_frame(3, RESPONSE, 0, b"payload") + encode_frame(5, DATA, 1, b"")
    dec = Decoder()
    events = []
    for i in range(len(wire)):
        events += dec.feed(wire[i : i + 1])
    assert events == [Frame(3, RESPONSE, 0, b"payload"), Frame(5, DATA, 1, b"")]
    assert dec.buffered == 0


def test_coalesced_frames_in_one_feed():
    frames = [Frame(sid, REQUEST, 0, bytes([sid]) * sid) for sid in (1, 3, 5, 7)]
    wire = b"".join(encode_frame(*f) for f in frames)
    assert Decoder().feed(wire) == frames


def test_coalesced_with_trailing_partial_frame():
    wire = encode_frame(1, REQUEST, 0, b"a") + encode_frame(3, REQUEST, 0, b"bcd")
    dec = Decoder()
    assert dec.feed(wire[:-2]) == [Frame(1, REQUEST, 0, b"a")]
    assert dec.feed(wire[-2:]) == [Frame(3, REQUEST, 0, b"bcd")]


def test_zero_length_frames():
    wire = encode_frame(1, RESPONSE, 0) * 3
    assert Decoder().feed(wire) == [Frame(1, RESPONSE, 0, b"")] * 3


def test_zero_length_frame_completes_with_its_header():
    dec = Decoder()
    wire = encode_frame(9, RESPONSE, 0)
    assert dec.feed(wire[:9]) == []
    assert dec.feed(wire[9:]) == [Frame(9, RESPONSE, 0, b"")]


def test_header_only_partial_input():
    dec = Decoder()
    assert dec.feed(header(5, 1)[:4]) == []
    assert dec.buffered == 4
    assert dec.feed(header(5, 1)[4:]) == []  # header complete, data missing
    assert dec.feed(b"ab") == []
    assert dec.feed(b"cde") == [Frame(1, REQUEST, 0, b"abcde")]


def test_max_size_frame_is_accepted():
    data = b"x" * MAX_DATA_SIZE
    assert Decoder().feed(encode_frame(1, REQUEST, 0, data)) == [Frame(1, REQUEST, 0, data)]


def test_oversize_frame_discarded_across_feeds_then_decoding_resumes():
    length = MAX_DATA_SIZE + 1
    dec = Decoder()
    assert dec.feed(header(length, 3)[:6]) == []
    assert dec.feed(header(length, 3)[6:] + b"z" * 1000) == [FrameTooLarge(3, REQUEST, length)]
    remaining = length - 1000
    chunk = b"z" * 65536
    while remaining > len(chunk):
        assert dec.feed(chunk) == []
        assert dec.buffered == 0  # dropped, not held
        remaining -= len(chunk)
    tail = b"z" * remaining + encode_frame(5, REQUEST, 0, b"next")
    assert dec.feed(tail) == [Frame(5, REQUEST, 0, b"next")]


def test_huge_declared_length_does_not_allocate():
    dec = Decoder()
    assert dec.feed(header(0xFFFFFFFF, 1) + b"abc") == [FrameTooLarge(1, REQUEST, 0xFFFFFFFF)]
    assert dec.buffered == 0
    assert dec.feed(b"\0" * 4096) == []


def test_small_limit_is_configurable():
    dec = Decoder(max_data_size=4)
    wire = encode_frame(1, REQUEST, 0, b"12345") + encode_frame(3, REQUEST, 0, b"1234")
    assert dec.feed(wire) == [FrameTooLarge(1, REQUEST, 5), Frame(3, REQUEST, 0, b"1234")]


def test_unknown_message_type_is_a_framing_error_and_ends_decoding():
    dec = Decoder()
    events = dec.feed(
        encode_frame(1, REQUEST, 0, b"ok") + header(0, 3, mtype=0x7F) + encode_frame(5, REQUEST, 0)
    )
    assert events[0] == Frame(1, REQUEST, 0, b"ok")
    assert isinstance(events[1], FramingError) and "0x7f" in events[1].reason
    assert len(events) == 2
    assert dec.feed(encode_frame(7, REQUEST, 0)) == []


def test_encode_refuses_oversize_data():
    with pytest.raises(DataTooLarge, match="message length 4194305 exceed maximum message size of 4194304"):
        encode_frame(1, REQUEST, 0, b"x" * (MAX_DATA_SIZE + 1))


def test_request_round_trip():
    payload = wrappers_pb2.StringValue(value="hi").SerializeToString()
    wire = codec.encode_request(
        1, "svc.v1.S", "M", payload, timeout_nano=5_000_000_000, metadata=[("k", "a"), ("k", "b")]
    )
    (frame,) = Decoder().feed(wire)
    assert (frame.stream_id, frame.type, frame.flags) == (1, REQUEST, 0)
    req = codec.decode_request(frame.data)
    assert (req.service, req.method, req.payload, req.timeout_nano) == (
        "svc.v1.S",
        "M",
        payload,
        5_000_000_000,
    )
    assert [(kv.key, kv.value) for kv in req.metadata] == [("k", "a"), ("k", "b")]


def test_undecodable_request():
    with pytest.raises(TTRPCError) as info:
        codec.decode_request(b"\xff\xff\xff")
    assert info.value.code == Code.INVALID_ARGUMENT
    assert info.value.message.startswith("unmarshal request error: ")


def test_success_response_with_empty_payload_is_a_zero_length_frame():
    assert codec.encode_response(5) == encode_frame(5, RESPONSE, 0, b"")


def test_success_response_carries_only_payload():
    (frame,) = Decoder().feed(codec.encode_response(5, b"\x08\x01"))
    resp = codec.decode_response(frame.data)
    assert not resp.HasField("status")
    assert resp.payload == b"\x08\x01"


def test_error_response_carries_only_status():
    (frame,) = Decoder().feed(
        codec.encode_response(5, b"ignored", error=TTRPCError(Code.NOT_FOUND, "x: not found"))
    )
    resp = codec.decode_response(frame.data)
    assert resp.payload == b""
    assert (resp.status.code, resp.status.message) == (5, "x: not found")


def test_status_round_trip():
    exc = TTRPCError(Code.FAILED_PRECONDITION, "no")
    back = error_from_status(status_from_error(exc))
    assert (back.code, back.message, str(back)) == (Code.FAILED_PRECONDITION, "no", "no")
    assert error_from_status(status_from_error(TTRPCError(Code.OK))) is None


def test_unknown_code_maps_to_unknown():
    assert TTRPCError(99, "future").code is Code.UNKNOWN
