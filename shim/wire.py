"""Hand-made protobuf encoding for the two hot paths that must not import protobuf.

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
