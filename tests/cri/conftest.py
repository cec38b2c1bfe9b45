"""Fixtures of the CRI tests (tests/cri/harness.py). Nothing is started unless a test asks:

    cri_containerd  session   CriContainerd: a private containerd with CRI, pause and busybox images in k8s.io
    cri             function  cri_containerd.cri (CriClient); fails the test at teardown if it left a pod
                              sandbox, container, process, mount, runc state, shim socket or cgroup
    pod             function  pod(name) -> Pod: a running host-network pod sandbox with the handler under test

The runtime under test is $PYSHIM_TEST_RUNTIME (tests/e2e/harness.py), reached through its CRI runtime
handler: `pyshim` for io.containerd.pyshim.v1, `runc` for io.containerd.runc.v2 (for comparison).
On a failure, the containerd log lines written during the test are added to the report.
"""
import re
from dataclasses import dataclass

import pytest

from cri import client
from cri.harness import CriContainerd
from e2e import harness

@pytest.fixture(scope="session")
def cri_containerd():
    yield from harness.session_containerd(CriContainerd, "pyshim-cri-")


@pytest.fixture
def cri(request, cri_containerd):
    harness.watch_log(request.node, cri_containerd)  # the root conftest reports its log
    yield cri_containerd.cri
    cri_containerd.check_leaks()


@dataclass
class Pod:
    id: str
    config: object  # the PodSandboxConfig it was run with (CreateContainer wants it again)
    log_directory: object  # Path

    def log(self, name):
        """The text of container `name`'s CRI log file."""
        return (self.log_directory / f"{name}.log").read_text()


@pytest.fixture
def pod(request, cri_containerd, cri):
    """pod(name="…") runs a host-network pod sandbox with the handler under test."""
    def run(name=None):
        name = name or re.sub(r"[^a-z0-9]+", "-", request.node.name.removeprefix("test_").lower()).strip("-")[:40]
        log_directory = cri_containerd.pod_log_directory(f"{name}-{len(cri.sandbox_ids)}")
        config = client.host_network_pod(name, log_directory=log_directory,
                                         cgroup_parent=cri_containerd.cgroup_parent,
                                         uid=f"{name}-{len(cri.sandbox_ids)}")
        return Pod(cri.run_pod_sandbox(config, cri_containerd.handler), config, log_directory)
    return run
