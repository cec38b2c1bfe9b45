"""Fixtures shared by the test suite.

End-to-end fixtures (harness: tests/e2e/harness.py). Nothing is started unless a test asks:

    containerd  session   TestContainerd: a private containerd, busybox image imported
    runtime     session   the runtime name under test ($PYSHIM_TEST_RUNTIME)
    image       session   the busybox image reference
    leak_check  function  fails the test (at teardown) if it left processes, containers, bundles,
                          mounts, runc state or cgroups behind, then cleans them up
    ctr         function  containerd.ctr(*args, input=None, timeout=60, namespace=None)
                          -> CtrResult(rc, stdout, stderr); implies leak_check
    cid         function  a fresh container id named after the test
    run         function  run(*command, options=("--rm",), container_id=None, timeout=60) -> CtrResult
                          = ctr run OPTIONS --runtime RUNTIME IMAGE ID COMMAND... (a fresh ID by default)

On a failure, the containerd log lines written during the test are added to the report.
"""
import pytest

from e2e import harness

def pytest_report_header(config):
    s = harness.settings()
    return f"e2e: runtime {s['runtime']}, containerd {s['containerd']}, ctr {s['ctr']}, shim from {s['shim_dir']}"


@pytest.fixture(scope="session")
def containerd():
    yield from harness.session_containerd(harness.TestContainerd, "pyshim-e2e-")


@pytest.fixture(scope="session")
def runtime(containerd):
    return containerd.runtime


@pytest.fixture(scope="session")
def image(containerd):
    return containerd.image


@pytest.fixture
def leak_check(request, containerd):
    harness.watch_log(request.node, containerd)
    yield
    containerd.check_leaks()


@pytest.fixture
def ctr(containerd, leak_check):
    return containerd.ctr


def _id_hint(request):
    return request.node.name.removeprefix("test_")


@pytest.fixture
def cid(request, containerd):
    return containerd.new_id(_id_hint(request))


@pytest.fixture
def run(request, containerd, ctr):
    def run(*command, options=("--rm",), container_id=None, timeout=60.0):
        return ctr("run", *options, "--runtime", containerd.runtime, containerd.image,
                   container_id or containerd.new_id(_id_hint(request)), *command, timeout=timeout)
    return run


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    log = harness.log_section(item) if report.failed else None
    if log is not None:
        report.sections.append(("containerd log (this test)", log))
