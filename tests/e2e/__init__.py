"""End-to-end tests: real containerd, real runc, real containers (see harness.py)."""
