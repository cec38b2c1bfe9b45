"""The README's worked experiments (scripts/experiments.py), run for real, their findings checked.

Each experiment starts containerds of its own (the session's containerd is not used), and each
of those checks for leaks when it stops, as the session's does.
"""
import os
import sys
from pathlib import Path

import pytest

from e2e import harness

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import experiments  # noqa: E402

RUN_RM = ["Create", "Connect", "Connect", "Start", "Wait", "State", "State", "Delete", "Shutdown"]


@pytest.mark.skipif(os.environ.get("CONTAINERD_BIN") is not None or not experiments.DEFAULT_B.exists(),
                    reason="compares the containerd on PATH (1.6) with .work/containerd-2.1: the matrix's first run")
def test_a_ctr_run_rm_call_sequence_on_1_6_and_2_1(tmp_path):
    found = experiments.callseq(tmp_path)
    assert sorted(found["a"]) == sorted(RUN_RM) and sorted(found["b"]) == sorted(RUN_RM), found["text"]
    assert found["services"] == {"a": ["containerd.task.v2.Task"], "b": ["containerd.task.v3.Task"]}
    assert (tmp_path / "callseq.txt").read_text() == found["text"]
    assert (tmp_path / "callseq-a.svg").read_text().startswith("<svg")


def test_b_runc_v2_and_pyshim_through_the_proxy(tmp_path):
    found = experiments.shims(tmp_path, harness.settings()["containerd"], runs=1)
    assert {cid: name for cid, name in found["targets"].items()} == {
        "runc-0": "containerd-shim-runc-v2", "pyshim-0": "containerd-shim-pyshim-v1",
        "runc-exec": "containerd-shim-runc-v2", "pyshim-exec": "containerd-shim-pyshim-v1"}
    assert found["runc"][0] == found["pyshim"][0] == "Create"
    assert found["runc"][-2:] == found["pyshim"][-2:] == ["Delete", "Shutdown"]
    assert "calls of runc-exec (a) and pyshim-exec (b)" in found["text"]


def test_d_the_shim_dies_right_after_create(tmp_path):
    found = experiments.dies_after_create(tmp_path, harness.settings()["containerd"])
    assert found["ctr_rc"] != 0 and "closed" in found["ctr_stderr"]
    assert found["task_after"] is None  # containerd reports the task gone ...
    assert found["container_after"]  # (the container record stays, for `ctr container rm`)
    assert found["exit_event"]["exit_status"] == 137  # ... with the status of the proxy's `delete`
    assert found["delete_event"] is not None
    assert found["leaks"] == []
    # whatever containerd sent next (Connect or Start, by timing) found the shim gone
    assert found["calls"][0] == ("Create", "OK")
    assert all(code == "UNAVAILABLE" for _, code in found["calls"][1:]), found["calls"]
    assert "target-delete" in found["phases"]
