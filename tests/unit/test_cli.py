"""Flag parsing (Go `flag` syntax) and the socket address convention."""

import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest

from shim.binary import address
from shim.binary.cli import UsageError, parse


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


@pytest.mark.parametrize("doc", [
    b'{"annotations": {"io.kubernetes.cri.sandbox-id": "p\\u00e9d\\n"}, "n": [1, 2.5, -3e2, true, null]}',
    b'  \n{"a": {"b": [{}, [], "x\\"y"]}, "c": NaN, "d": -Infinity}\n',
    '{"snow": "\u2603", "big": 123456789012345678901234567890}'.encode(),
])
def test_parse_json_is_json_loads(doc):
    assert repr(address.parse_json(doc)) == repr(json.loads(doc))


@pytest.mark.parametrize("doc", [b'{"a": 1', b'{"a": 1} x', b'', b'{"a": }', b'\xff'])
def test_parse_json_refuses_what_json_refuses(doc):
    with pytest.raises(ValueError):
        json.loads(doc)
    with pytest.raises(ValueError):
        address.parse_json(doc)


def test_start_does_not_import_json_for_a_pod(tmp_path):
    # The grouping annotation is found without the json module (and re) in `start`'s path.
    (tmp_path / "config.json").write_text(json.dumps(
        {"annotations": {"io.kubernetes.cri.sandbox-id": "pod1"}, "process": {"args": ["x"]}}))
    code = (f"import sys; sys.path[:0] = {sys.path!r}; from shim.binary import address; "
            f"print(address.group_id({str(tmp_path)!r}, 'c1'), 'json' in sys.modules, 're' in sys.modules)")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.split() == ["pod1", "False", "False"], out.stderr
