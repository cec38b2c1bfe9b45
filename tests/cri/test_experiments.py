"""Worked experiment (c) of the README through CRI (scripts/experiments.py start-fails)."""
import sys
from pathlib import Path

from e2e import harness

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import experiments  # noqa: E402


def test_c_a_pod_whose_start_fails_once(tmp_path):
    found = experiments.start_fails(tmp_path, harness.settings()["containerd"])
    first, retry = found["attempts"]
    assert "please retry" in first["start_error"]
    assert (first["state"], first["reason"]) == ("CONTAINER_EXITED", "StartError")
    # the count is per container, and each retry of the kubelet is a new container: it fails too
    assert "please retry" in retry["start_error"]
    assert [p for _, p, _ in found["fired"]] == ["Start", "Start"]
    assert found["without_failpoint"] == "CONTAINER_RUNNING" and found["sandbox"] == "SANDBOX_READY"
