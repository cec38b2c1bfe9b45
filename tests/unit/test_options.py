"""Decoding of the runtime options containerd sends."""

from google.protobuf.any_pb2 import Any

from shim.runtime import options
from shim.api.runc_options_pb2 import Options as RuncOptions
from shim.api.runctypes_pb2 import CreateOptions
from shim.api.runtimeoptions_pb2 import Options as RuntimeOptions
from shim.runtime.config import RuncConfig


def test_runc_options():
    o = RuncOptions(binary_name="crun", root="/run/x", systemd_cgroup=True, shim_cgroup="/s",
                    io_uid=7, io_gid=8, no_pivot_root=True)
    got = options.decode("containerd.runc.v1.Options", o.SerializeToString(), "t")
    assert got.runc == RuncConfig(binary="crun", root="/run/x", systemd_cgroup=True,
                                  no_pivot_root=True, io_uid=7, io_gid=8)
    assert got.shim_cgroup == "/s"


def test_legacy_create_options():
    c = CreateOptions(shim_cgroup="/containerd/shim", no_new_keyring=True)
    got = options.decode("containerd.linux.runc.CreateOptions", c.SerializeToString(), "t")
    assert got.shim_cgroup == "/containerd/shim"
    assert got.runc.no_new_keyring and got.runc.binary == "runc"


def test_runtimeoptions_config_body_and_path(tmp_path):
    body = b'BinaryName = "crun"\nSystemdCgroup = true\nShimCgroup = "/k"\n'
    r = RuntimeOptions(config_body=body)
    got = options.decode("runtimeoptions.v1.Options", r.SerializeToString(), "t")
    assert got.runc.binary == "crun" and got.runc.systemd_cgroup and got.shim_cgroup == "/k"
    f = tmp_path / "pyshim.toml"
    f.write_bytes(b'Root = "/run/other"\n')
    r = RuntimeOptions(config_path=str(f))
    assert options.decode("runtimeoptions.v1.Options", r.SerializeToString(), "t").runc.root \
        == "/run/other"


def test_unknown_and_garbage_options_fall_back_to_defaults():
    assert options.decode("example.com/Unknown", b"\x01\x02", "t").runc == RuncConfig()
    assert options.decode_any_bytes(b"\xff\xff\xff", "t").runc == RuncConfig()
    bad_toml = RuntimeOptions(config_body=b"this is = = not toml")
    assert options.decode("runtimeoptions.v1.Options", bad_toml.SerializeToString(),
                          "t").runc == RuncConfig()


def test_any_on_stdin():
    o = RuncOptions(binary_name="crun")
    data = Any(type_url="containerd.runc.v1.Options", value=o.SerializeToString())
    assert options.decode_any_bytes(data.SerializeToString(), "t").runc.binary == "crun"


def test_runc_config_round_trips_through_the_bundle(tmp_path):
    config = RuncConfig(binary="crun", root="/run/x y", systemd_cgroup=True, io_uid=1000)
    config.save(str(tmp_path))
    assert RuncConfig.load(str(tmp_path)) == config
    assert RuncConfig.load(str(tmp_path / "missing")) == RuncConfig()


def test_runc_config_is_checked_and_immutable():
    import pytest
    with pytest.raises(TypeError):
        RuncConfig(binray="crun")
    with pytest.raises(TypeError):
        RuncConfig(systemd_cgroup="yes")
    with pytest.raises(AttributeError):
        RuncConfig().binary = "crun"


def test_pyshim_trace_keys_in_the_options_table():
    body = b'PyshimTrace = "/var/log/pyshim.jsonl"\nPyshimTraceDir = "/run/t"\nBinaryName = "crun"\n'
    got = options.decode("runtimeoptions.v1.Options", RuntimeOptions(config_body=body).SerializeToString(), "t")
    assert (got.trace, got.trace_dir, got.runc.binary) == ("/var/log/pyshim.jsonl", "/run/t", "crun")
    assert options.DEFAULT.trace == ""
