"""A hostile local client's moves against a ttrpc socket, for the live shim's tests
(test_ttrpc_hostile.py) and the server's own (unit/test_ttrpc_bounds.py)."""
import socket
import struct

from shim.ttrpc import codec
from shim.ttrpc.codec import REQUEST


def connect(path, timeout=5.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def send_quietly(sock, data):
    try:
        sock.sendall(data)
    except OSError:
        pass  # the server hung up on us: allowed


def hostile_prelude(path):
    """A few malformed frames and a half-sent header; the half-open connection is returned."""
    for garbage in (b"\xff" * 32,
                    struct.pack(">IIBB", 5, 1, 0x09, 0) + b"hello",  # unknown message type
                    codec.encode_frame(2, REQUEST, 0, b"\xff\xff")):  # even stream id, bad protobuf
        s = connect(path)
        send_quietly(s, garbage)
        s.close()
    half = connect(path)
    half.sendall(b"\x00\x00\x00")
    return half


def connect_bursts(path, total=200, burst=20):
    """(connections that got EAGAIN, bursts with any): each connect with a 5 s timeout, which makes
    the socket non-blocking, so a full listen backlog fails it at once with EAGAIN."""
    refused = bursts = 0
    for _ in range(total // burst):
        socks, hit = [], 0
        for _ in range(burst):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(path)
            except BlockingIOError:
                hit += 1
            socks.append(s)
        for s in socks:
            s.close()
        refused += hit
        bursts += hit > 0
    return refused, bursts
