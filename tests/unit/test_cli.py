"""Flag parsing (Go `flag` syntax) and the socket address convention."""

import hashlib
import os
import stat

import pytest

from shim import address
from shim.cli import UsageError, parse


def test_start_argv_of_containerd():
    flags, args = parse(["-namespace", "default", "-address", "/run/c.sock",
                         "-publish-binary", "/usr/bin/containerd", "-id", "c1", "-debug", "start"])
    assert flags == {"namespace": "default", "address": "/run/c.sock",
                     "publish-binary": "/usr/bin/containerd", "id": "c1", "debug": True}
    assert args == ["start"]


def test_equals_and_double_dash_forms():
    flags, args = parse(["--id=c1", "-debug=false", "-bundle=/b", "delete"])
    assert flags == {"id": "c1", "debug": False, "bundle": "/b"}
    assert args == ["delete"]


@pytest.mark.parametrize("argv", [["-nope", "start"], ["-id"]])
def test_bad_flags(argv):
    with pytest.raises(UsageError):
        parse(argv)


def test_socket_path_matches_runc_v2_convention():
    path = address.socket_path("/run/containerd/containerd.sock", "default", "c1")
    digest = hashlib.sha256(b"/run/containerd/containerd.sock/default/c1").hexdigest()
    assert path == f"/run/containerd/s/{digest}"


def test_group_id_from_annotations(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"annotations": {"io.kubernetes.cri.sandbox-id": "pod1"}}')
    assert address.group_id(str(tmp_path), "c1") == "pod1"
    (tmp_path / "config.json").write_text('{"annotations": {}}')
    assert address.group_id(str(tmp_path), "c1") == "c1"


def test_listen_is_owner_only_and_detects_a_live_shim(tmp_path):
    path = str(tmp_path / "s" / "sock")
    sock = address.listen(path)
    assert sock is not None
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert address.listen(path) is None  # a live listener: join it
    finally:
        sock.close()
    again = address.listen(path)  # stale socket file: replaced
    assert again is not None
    again.close()
