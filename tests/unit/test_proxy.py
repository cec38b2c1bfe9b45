"""The proxy's pure parts: which target, the target's `start` output, the proxy's failpoint annotations."""
import json
import os

import pytest

from shim.probe.failpoints import FailpointError, Term
from shim.proxy import perturb, target
from shim.proxy.target import TargetError


def test_the_annotation_names_a_runtime_and_wins_over_the_environment():
    env = {target.TARGET_ENV: "/opt/shims/containerd-shim-x-v1"}
    assert target.configured({}, {}) == "io.containerd.runc.v2"
    assert target.configured({}, env) == env[target.TARGET_ENV]
    assert target.configured({target.TARGET_ANNOTATION: "io.containerd.pyshim.v1"}, env) == "io.containerd.pyshim.v1"
    with pytest.raises(TargetError, match="not a path"):
        target.configured({target.TARGET_ANNOTATION: "/bin/sh"}, env)


def test_targets_are_found_like_containerd_finds_shims(tmp_path):
    shim = tmp_path / "containerd-shim-x-v1"
    shim.write_text("#!/bin/sh\n")
    shim.chmod(0o755)
    assert target.resolve("io.containerd.x.v1", path=str(tmp_path)).binary == str(shim)
    assert target.resolve("io.containerd.x.v1", containerd_binary=str(tmp_path / "containerd"), path="").binary == str(shim)
    assert target.resolve(str(shim)).binary == str(shim)
    with pytest.raises(TargetError, match="not found"):
        target.resolve("io.containerd.y.v1", path=str(tmp_path))
    proxy = tmp_path / "containerd-shim-pyshimproxy-v1"
    proxy.write_text("")
    proxy.chmod(0o755)
    with pytest.raises(TargetError, match="the proxy itself"):
        target.resolve("io.containerd.pyshimproxy.v1", path=str(tmp_path))


def test_start_output_keeps_its_form_with_the_proxys_address():
    plain = target.parse_start_output(b"unix:///run/containerd/s/abc\n")
    assert (plain.address, plain.with_address("unix:///p")) == ("unix:///run/containerd/s/abc", "unix:///p")
    v3 = target.parse_start_output(b'{"version":3,"address":"unix:///run/containerd/s/abc","protocol":"ttrpc"}')
    assert v3.address == "unix:///run/containerd/s/abc"
    assert json.loads(v3.with_address("unix:///p")) == {"version": 3, "address": "unix:///p", "protocol": "ttrpc"}
    for bad in (b"", b"/run/containerd/s/abc", b"unix:///a b", b"time=... level=error"):
        with pytest.raises(TargetError):
            target.parse_start_output(bad)


def test_state_file_round_trip(tmp_path):
    state = target.State("io.containerd.runc.v2", "/usr/bin/containerd-shim-runc-v2", "unix:///t", "unix:///p", "/e")
    target.write_state(str(tmp_path), state)
    assert target.read_state(str(tmp_path)) == state
    assert os.stat(tmp_path / target.STATE_FILE).st_mode & 0o777 == 0o600
    assert target.read_state(str(tmp_path / "missing")) is None


CD, PY, PX = perturb.CONTAINERD_PREFIX, perturb.PYSHIM_PREFIX, perturb.PROXY_PREFIX


def test_failpoint_annotations_of_the_proxy():
    armed = perturb.failpoints({CD + "Start": "1*error(please retry)", PY + "Create.after": "1*kill",
                                PY + "runc.start.before": "1*hang", PX + "event.exit": "1*drop",
                                "other": "x"}, target_evaluates_pyshim_points=False)
    assert sorted(armed) == ["Create.after", "Start", "event.exit"]  # runc points are pyshim's alone
    assert armed["Start"].evaluate() == Term("error", "please retry") and armed["Start"].evaluate() is None
    assert armed["event.exit"].evaluate() == Term("drop")


def test_in_front_of_pyshim_only_the_proxys_own_annotations_count():
    armed = perturb.failpoints({CD + "Start": "1*error(x)", PX + "Start.before": "1*delay(5)"},
                               target_evaluates_pyshim_points=True)
    assert list(armed) == ["Start"] and armed["Start"].evaluate() == Term("delay", 5)


@pytest.mark.parametrize("annotations,message", [
    ({CD + "Start": "1*explode"}, "invalid type"),
    ({CD + "Strat": "1*off"}, "not a Task method"),
    ({CD + "Start": "1*drop"}, "not accepted"),  # containerd's own types only
    ({PX + "Start.during": "1*off"}, "no failpoint"),
    ({PX + "event.exit": "1*delay(soon)"}, "whole number"),
])
def test_malformed_failpoints_name_their_annotation(annotations, message):
    with pytest.raises(FailpointError, match=message) as info:
        perturb.failpoints(annotations, target_evaluates_pyshim_points=False)
    assert next(iter(annotations)) in str(info.value)


def test_the_listener_of_a_socket_is_found(tmp_path):
    """The target to kill is the process holding the listening socket (here a child of ours)."""
    import subprocess
    import sys
    import time
    path = str(tmp_path / "s")
    child = subprocess.Popen([sys.executable, "-c", "import socket, time\n"
                              f"s = socket.socket(socket.AF_UNIX); s.bind({path!r}); s.listen(); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path) or not perturb.listener_pids(path):
            assert time.monotonic() < deadline, "the child never listened"
            time.sleep(0.02)
        assert perturb.listener_pids(path) == [child.pid]
        assert perturb.listener_pids(str(tmp_path / "none")) == []
    finally:
        child.kill()
        child.wait()
