"""The tracing proxy (`io.containerd.pyshimproxy.v1`) in front of containerd's own shim.

A containerd of this module's own runs with PYSHIM_TRACE in its environment (the proxy's
trace switch), and the proxy's target is `io.containerd.runc.v2` (its default). Every test is
leak-checked afterwards, including the proxy's own processes and sockets.
"""
import json
import os
import signal
import time

import pytest

from e2e import harness
from e2e.shims import alive, bundle, shim_address, wait_until

PROXY = "io.containerd.pyshimproxy.v1"
RUNC = "io.containerd.runc.v2"


class TracedContainerd(harness.TestContainerd):
    """The session's kind of containerd, with PYSHIM_TRACE set for its shims."""

    __test__ = False

    @property
    def trace_path(self):
        return self.workdir / "trace.jsonl"

    def environ(self):
        return {**super().environ(), "PYSHIM_TRACE": str(self.trace_path)}


@pytest.fixture(scope="module")
def traced():
    yield from harness.session_containerd(TracedContainerd, "pyshim-proxy-")


@pytest.fixture
def tctr(request, traced):
    harness.watch_log(request.node, traced)
    yield traced.ctr
    traced.check_leaks()
    leftover = [p for p in proxy_sockets() if p not in _sockets_before]
    assert not leftover, f"proxy sockets left: {leftover}"


_sockets_before = set()


def proxy_sockets():
    """The sockets of the proxy's daemons (named by the proxy: see shim/proxy/cli.py)."""
    return set()


def records(traced, cid, kind=None):
    lines = traced.trace_path.read_text().splitlines() if traced.trace_path.exists() else []
    found = [json.loads(line) for line in lines]
    return [r for r in found if r.get("id") == cid and (kind is None or r["kind"] == kind)]


def test_ctr_run_through_the_proxy_in_front_of_runc_v2(traced, tctr):
    cid = traced.new_id("proxy-echo")
    result = tctr("run", "--rm", "--runtime", PROXY, traced.image, cid, "echo", "hi")
    assert (result.rc, result.stdout) == (0, "hi\n"), result.stderr
    wait_until(lambda: any(r["method"] == "Shutdown" for r in records(traced, cid, "call")),
               what="the Shutdown call is traced")
    calls = [r["method"] for r in records(traced, cid, "call")]
    order = [calls.index(m) for m in ("Create", "Start", "Wait", "Delete")]
    assert order == sorted(order), calls
    wait_until(lambda: len(records(traced, cid, "event")) >= 4, what="four events are traced")
    topics = [r["topic"] for r in records(traced, cid, "event")]
    assert topics[:4] == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], topics
    create = next(r for r in records(traced, cid, "call") if r["method"] == "Create")
    assert create["code"] == 0 and create["response"]["pid"] > 0 and create["duration"] > 0
