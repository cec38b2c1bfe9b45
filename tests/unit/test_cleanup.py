"""The `delete` action's reply, encoded by hand, must be what protobuf would encode."""

import subprocess
import sys

import pytest

from shim.api.task_pb2 import DeleteResponse
from shim.binary.wire import delete_response


@pytest.mark.parametrize("pid,status,ns", [
    (14827, 137, 1_795_825_596_761_348_609), (0, 137, 1_700_000_000_000_000_000),
    (1, 0, 5), (2**32 - 1, 255, 1_000_000_000)])
def test_delete_response_matches_protobuf(pid, status, ns):
    got = delete_response(pid, status, ns)
    seconds, nanos = divmod(ns, 10**9)
    want = DeleteResponse(pid=pid, exit_status=status)
    want.exited_at.seconds, want.exited_at.nanos = seconds, nanos
    assert got == want.SerializeToString()
    parsed = DeleteResponse.FromString(got)
    assert (parsed.pid, parsed.exit_status, parsed.exited_at.seconds) == (pid, status, seconds)


def test_delete_of_an_unknown_bundle_is_idempotent(tmp_path):
    argv = [sys.executable, "-m", "shim.binary.cli", "-namespace", "default", "-address", "/x",
            "-id", "gone", "-bundle", str(tmp_path), "delete"]
    for _ in range(2):
        result = subprocess.run(argv, capture_output=True, cwd=tmp_path, timeout=30)
        assert result.returncode == 0, result.stderr
        reply = DeleteResponse.FromString(result.stdout)
        assert (reply.pid, reply.exit_status) == (0, 137)
        assert reply.exited_at.seconds > 0


def test_bootstrap_params_are_told_from_an_any():
    from google.protobuf.any_pb2 import Any

    from shim.api.bootstrap_pb2 import BootstrapParams
    from shim.api.runc_options_pb2 import Options
    from shim.binary.wire import is_bootstrap_params

    params = BootstrapParams(instance_id="c1", namespace="default", containerd_version="2.3.0")
    params.extensions.add().value.CopyFrom(Any(type_url="containerd.runc.v1.Options",
                                               value=Options(binary_name="crun").SerializeToString()))
    assert is_bootstrap_params(params.SerializeToString(), "default", "c1")
    assert not is_bootstrap_params(params.SerializeToString(), "other", "c1")
    options = Any(type_url="containerd.runc.v1.Options", value=b"")
    assert not is_bootstrap_params(options.SerializeToString(), "default", "c1")
    assert not is_bootstrap_params(b"", "default", "c1")
    long_id = "x" * 200  # multi-byte length prefix
    long_params = BootstrapParams(instance_id=long_id, namespace="default")
    assert is_bootstrap_params(long_params.SerializeToString(), "default", long_id)


@pytest.mark.parametrize("socket_dir", [None, "", "/run/containerd/s2", "/run/" + "x" * 300])
def test_start_reads_socket_dir_as_protobuf_does(socket_dir):
    # `start` reads BootstrapParams.socket_dir by hand (shim/binary/wire.py), without protobuf.
    from google.protobuf.any_pb2 import Any

    from shim.api.bootstrap_pb2 import BootstrapParams, Extension, LOG_LEVEL_DEBUG
    from shim.api.runc_options_pb2 import Options
    from shim.binary.wire import bootstrap_socket_dir
    params = BootstrapParams(instance_id="c1", namespace="default", log_level=LOG_LEVEL_DEBUG,
                             containerd_version="2.3.0", containerd_binary="/usr/bin/containerd",
                             extensions=[Extension(value=Any(type_url="x", value=Options(
                                 binary_name="/run/socket_dir/decoy").SerializeToString()))])
    if socket_dir is not None:
        params.socket_dir = socket_dir
    data = params.SerializeToString()
    assert bootstrap_socket_dir(data) == BootstrapParams.FromString(data).socket_dir


def test_start_refuses_a_truncated_bootstrap_params():
    from shim.api.bootstrap_pb2 import BootstrapParams
    from shim.binary.wire import bootstrap_socket_dir
    data = BootstrapParams(instance_id="c1", namespace="default", socket_dir="/run/x").SerializeToString()
    with pytest.raises(ValueError):
        bootstrap_socket_dir(data[:-2])
