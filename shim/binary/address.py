"""Where a shim listens, and how containerd finds it again.

The socket is a file (never an abstract socket: those are reachable from the whole
network namespace) with owner-only permissions, named like containerd's runc shim names
its own: a hash of (containerd address, namespace, group). Containers of one group (a
pod) therefore meet at the same address, and a second `start` for the group finds the
shim that already serves it.
"""

from __future__ import annotations

import errno
import os

# `start` runs for every container and only needs raw sockets: the `socket` module's
# wrappers (enum, selectors) and OpenSSL's hashlib would double its import time.
import _socket

try:
    from _sha256 import sha256  # type: ignore[import-not-found]
except ImportError:  # Python 3.12+: _sha2
    from hashlib import sha256

SOCKET_DIR = "/run/containerd/s"
GROUP_ANNOTATIONS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")


def group_id(bundle: str, cid: str) -> str:
    """The group a container's shim serves: the first grouping annotation, else its id."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            data = f.read()
    except OSError:
        return cid
    if not any(key.encode() in data for key in GROUP_ANNOTATIONS):
        return cid  # the common case, without parsing the whole spec
    try:
        annotations = parse_json(data).get("annotations") or {}  # type: ignore[attr-defined]
    except (ValueError, AttributeError):
        return cid
    for key in GROUP_ANNOTATIONS:
        value = annotations.get(key)
        if isinstance(value, str) and value:
            return value
    return cid


def parse_json(data: bytes) -> object:
    """JSON as json.loads parses it, by the same C scanner, without importing the json
    module: its import (with `re`'s) took every CRI container's `start` about 5 ms."""
    text = data.decode()
    try:
        from _json import make_scanner
    except ImportError:  # an interpreter without the C accelerator
        import json
        return json.loads(text)

    class Options:  # what json.JSONDecoder hands its scanner
        strict = True
        object_hook = object_pairs_hook = None
        parse_float = parse_constant = float
        parse_int = int

    start = len(text) - len(text.lstrip())
    try:
        value, end = make_scanner(Options())(text, start)  # type: ignore[arg-type]
    except StopIteration as e:
        raise ValueError(f"invalid JSON at offset {e.value}") from None
    if text[end:].strip():
        raise ValueError(f"extra data after JSON at offset {end}")
    return value


def socket_path(containerd_address: str, namespace: str, group: str,
                socket_dir: str = SOCKET_DIR) -> str:
    digest = sha256(os.path.join(containerd_address, namespace, group).encode())
    return os.path.join(socket_dir, digest.hexdigest())


def listen(path: str) -> _socket.socket | None:
    """Listen on `path`; None when a live shim already listens there."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        try:
            sock.bind(path)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            if is_live(path):
                sock.close()
                return None
            os.unlink(path)  # left by a shim that died
            sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(listen_backlog())
    except BaseException:
        sock.close()
        raise
    return sock


def listen_backlog() -> int:
    """The kernel's somaxconn, as Go's listeners use (containerd-shim-runc-v2's too).

    A burst of connections waits in this queue until the server accepts them; a
    client connecting with a timeout (a non-blocking connect) gets EAGAIN once it is
    full. 128 was filled by 200 connections opened in bursts faster than accepted.
    """
    try:
        with open("/proc/sys/net/core/somaxconn", "rb") as f:
            return max(128, min(int(f.read()), 65535))
    except (OSError, ValueError):
        return 4096  # the kernel's default since Linux 5.4; it caps the value anyway


def is_live(path: str, kind: int = _socket.SOCK_STREAM) -> bool:
    probe = _socket.socket(_socket.AF_UNIX, kind | _socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def write_address_file(bundle: str, address: str) -> None:
    """<bundle>/address, written atomically: containerd reads it to reconnect."""
    tmp = os.path.join(bundle, ".address.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, address.encode())
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(bundle, "address"))
