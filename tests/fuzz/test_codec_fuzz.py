"""The sans-IO codec (shim/ttrpc/codec.py) on arbitrary input: bytes in any split give frames,
oversize reports or one framing error, never another exception, and never more buffered than
one frame; valid streams come out exactly as they went in, however they are cut."""
import struct

from hypothesis import example, given
from hypothesis import strategies as st

from shim.ttrpc import Code, TTRPCError, codec
from shim.ttrpc.codec import HEADER_SIZE, Decoder, Frame, FrameTooLarge, FramingError

SMALL_MAX = 64  # a decoder with a small frame limit, so that oversize frames are cheap to make


def chunks(data, cuts):
    """`data` cut at the (sorted, deduplicated) offsets `cuts`."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points + [len(data)]:
        out.append(data[last:p])
        last = p
    return out


def feed_all(decoder, pieces):
    events = []
    for piece in pieces:
        got = decoder.feed(piece)
        assert decoder.buffered <= HEADER_SIZE + decoder.max_data_size  # bounded, whatever came
        events += got
    return events


@given(st.binary(max_size=2000), st.lists(st.integers(0, 4000), max_size=8),
       st.sampled_from([SMALL_MAX, codec.MAX_DATA_SIZE]))
@example(b"\x00\x00\x00\x00\x00\x00\x00\x01\x99\x00", [], SMALL_MAX)  # unknown type
@example(struct.pack(">IIBB", 0xFFFFFFFF, 1, 1, 0) + b"x" * 100, [3, 11], SMALL_MAX)  # 4 GiB declared
@example(b"\x00\x00\x00", [1, 2], codec.MAX_DATA_SIZE)  # half a header
def test_any_bytes_in_any_split_frame_or_fail_cleanly(data, cuts, limit):
    decoder = Decoder(limit)
    events = feed_all(decoder, chunks(data, cuts))
    for i, ev in enumerate(events):
        assert isinstance(ev, (Frame, FrameTooLarge, FramingError))
        if isinstance(ev, FramingError):
            assert i == len(events) - 1  # always the last one
            assert decoder.feed(b"\x00" * 20) == []  # and the decoder stays broken
        if isinstance(ev, Frame):
            assert len(ev.data) <= limit and ev.type in (codec.REQUEST, codec.RESPONSE, codec.DATA)
        if isinstance(ev, FrameTooLarge):
            assert ev.length > limit
    # the same bytes in one piece give the same events
    assert Decoder(limit).feed(data) == events


frames = st.tuples(
    st.integers(0, (1 << 32) - 1),  # stream id
    st.sampled_from([codec.REQUEST, codec.RESPONSE, codec.DATA]),
    st.integers(0, 255),  # flags
    st.one_of(st.binary(max_size=SMALL_MAX), st.integers(SMALL_MAX + 1, 300)),  # data, or an oversize length
)


@given(st.lists(frames, max_size=12), st.lists(st.integers(0, 10000), max_size=12))
def test_valid_streams_decode_exactly_however_they_are_cut(items, cuts):
    stream, expected = b"", []
    for sid, mtype, flags, data in items:
        if isinstance(data, int):  # oversize: declared and sent, then dropped by the decoder
            stream += struct.pack(">IIBB", data, sid, mtype, flags) + b"\xaa" * data
            expected.append(FrameTooLarge(sid, mtype, data))
        else:
            stream += struct.pack(">IIBB", len(data), sid, mtype, flags) + data
            expected.append(Frame(sid, mtype, flags, data))
    decoder = Decoder(SMALL_MAX)
    assert feed_all(decoder, chunks(stream, cuts)) == expected
    assert decoder.buffered == 0 and decoder.between_frames


@given(st.binary(max_size=600))
@example(b"\x0a\xff\xff\xff\xff\x0f")
@example(b"\x2a\x02\x0a")  # metadata with a cut key
def test_request_decoding_gives_a_request_or_invalid_argument(data):
    try:
        req = codec.decode_request(data)
    except TTRPCError as exc:
        assert exc.code == Code.INVALID_ARGUMENT and exc.message.startswith("unmarshal request error: ")
    else:
        assert isinstance(req.service, str) and isinstance(req.payload, bytes)


@given(st.binary(max_size=600))
def test_response_decoding_gives_a_response_or_internal(data):
    try:
        codec.decode_response(data)
    except TTRPCError as exc:
        assert exc.code == Code.INTERNAL


@given(st.integers(1, (1 << 32) - 1), st.binary(max_size=200), st.integers(0, 16), st.text(max_size=100))
def test_responses_round_trip(sid, payload, code, message):
    ok = codec.encode_response(sid, payload)
    failed = codec.encode_response(sid, error=TTRPCError(code, message)) if code else None
    for frame, want_error in ((ok, False), (failed, True)):
        if frame is None:
            continue
        [ev] = Decoder().feed(frame)
        resp = codec.decode_response(ev.data)
        assert ev.stream_id == sid and ev.type == codec.RESPONSE
        if want_error:
            assert (resp.status.code, resp.status.message, resp.payload) == (code, message, b"")
        else:
            assert resp.payload == payload and not resp.HasField("status")
