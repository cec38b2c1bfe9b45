"""Hand-made protobuf for the two hot paths that must not import protobuf.

containerd runs the shim binary twice per container (`start`, `delete`) and waits for
both; importing protobuf costs more than everything else those runs do. The generated
modules stay the reference: tests check these bytes against them.
"""

from __future__ import annotations


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if not n:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def varint_field(number: int, value: int) -> bytes:
    """A varint field; proto3 leaves zero values out."""
    return b"" if value == 0 else varint(number << 3) + varint(value)


def bytes_field(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def delete_response(pid: int, exit_status: int, when_ns: int) -> bytes:
    """containerd.task.v2.DeleteResponse {1 pid, 2 exit_status, 3 exited_at Timestamp}."""
    seconds, nanos = divmod(when_ns, 1_000_000_000)
    timestamp = varint_field(1, seconds) + varint_field(2, nanos)
    return varint_field(1, pid) + varint_field(2, exit_status) + bytes_field(3, timestamp)


def is_bootstrap_params(data: bytes, namespace: str, cid: str) -> bool:
    """containerd 2.3 sends `start` a BootstrapParams (field 1 = id, field 2 = namespace)
    where older versions send an Any (field 1 = type URL): tell them apart."""
    return data.startswith(bytes_field(1, cid.encode()) + bytes_field(2, namespace.encode()))


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def string_field(data: bytes, number: int) -> str:
    """The value of length-delimited field `number` of a message, as protobuf reads it
    (the last occurrence wins); "" when absent. ValueError on bytes that are no message."""
    found = ""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        kind = key & 7
        if kind == 0:
            _, pos = _read_varint(data, pos)
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        elif kind == 2:
            length, pos = _read_varint(data, pos)
            if key >> 3 == number:
                found = data[pos:pos + length].decode()
            pos += length
        else:
            raise ValueError(f"unsupported wire type {kind}")
        if pos > len(data):
            raise ValueError("truncated field")
    return found


def bootstrap_socket_dir(data: bytes) -> str:
    """BootstrapParams.socket_dir (field 9), which `start` needs from containerd 2.3+."""
    return string_field(data, 9)
