"""A shim installed the way a user installs it (`pip install pyshim-*.whl` into a fresh venv)
starts the fast way and has a working zygote.

The wheel venv is $PYSHIM_WHEEL_BIN's (scripts/test.sh builds one), else one built here
(`python -m build`, `python -m venv`, `pip install` of the wheel). Its shim is run by absolute
path (`ctr run --runtime /…/containerd-shim-pyshim-v1`), beside the session's own.
"""
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from e2e.harness import command_line
from e2e.shims import ZYGOTE_PREPARE_SECONDS as PREPARE_SECONDS, wait_until
from e2e.tasks import remove
from shim.binary import launcher

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def wheel_bin(tmp_path_factory):
    given = os.environ.get("PYSHIM_WHEEL_BIN")
    if given:
        return Path(given)
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(work / "dist"),
                    str(REPO)], check=True, capture_output=True)
    [wheel] = (work / "dist").glob("pyshim-*.whl")
    venv = work / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", str(wheel)],
                   check=True)
    return venv / "bin"


@pytest.fixture
def pyshim_only(containerd, wheel_bin):
    if containerd.runtime != "io.containerd.pyshim.v1":
        pytest.skip("tests pyshim's install")
    yield
    # The wheel's zygote stays idle for a while: not beside the next tests' own.
    socket = zygote_socket(interpreter(str(wheel_bin / launcher.NAME)), containerd.address)
    for z in zygotes_of(containerd, socket):
        z.kill()
        z.wait(5)


def zygotes_of(containerd, socket):
    """The zygotes of this containerd listening on `socket`."""
    found = []
    for proc in psutil.Process(containerd.process.pid).children():
        try:
            if command_line(proc)[-1:] == ["zygote"] and any(
                    c.laddr == socket for c in proc.net_connections(kind="unix")):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def interpreter(script):
    """The interpreter of a script's #! line (pip's console script, or the launcher)."""
    with open(script) as f:
        return f.readline()[2:].split()[0]


def zygote_socket(python, address):
    """The zygote socket of the install `python` runs (named after its interpreter and code)."""
    return subprocess.run([python, "-I", "-c", "import sys; from shim.binary.zygote import socket_path; "
                           "print(socket_path(sys.argv[1]))", address],
                          capture_output=True, text=True, check=True).stdout.strip()


def logged(containerd, offset):
    """The zygote-failure lines containerd logged since `offset`."""
    return [line for line in containerd.log_tail(10_000, offset=offset).splitlines() if "pyshim zygote for" in line]


def test_a_shim_from_a_built_wheel_starts_a_zygote(pyshim_only, containerd, ctr, wheel_bin):
    shim = str(wheel_bin / launcher.NAME)
    python = interpreter(shim)
    socket = zygote_socket(python, containerd.address)
    first = containerd.new_id("wheel")
    result = ctr("run", "--rm", "--runtime", shim, containerd.image, first, "echo", "from the wheel")
    assert (result.rc, result.stdout) == (0, "from the wheel\n"), result.stderr
    assert launcher.is_launcher(shim)  # whichever script pip wrote, it is the fast launcher now
    wait_until(lambda: zygotes_of(containerd, socket), PREPARE_SECONDS, "a zygote of the wheel's install")
    [z] = zygotes_of(containerd, socket)
    assert command_line(z) == [launcher.NAME, "-address", containerd.address, "zygote"]
    # ...and it serves: the next container's daemon is its child.
    cid = containerd.new_id("wheel")
    result = ctr("run", "-d", "--runtime", shim, containerd.image, cid, "sleep", "100")
    assert result.rc == 0, result.stderr
    try:
        pid, _ = containerd.tasks()[cid]
        daemon = psutil.Process(psutil.Process(pid).ppid())  # the container's parent
        assert daemon.ppid() == z.pid
    finally:
        remove(containerd, ctr, cid)


def test_a_zygote_that_cannot_start_says_so_in_the_log(pyshim_only, containerd, ctr, wheel_bin):
    """A zygote whose start fails (here: a module it needs, and no container's start needs, is
    missing from the install) leaves an error in containerd's log: in the log of the bundle that
    spawned it if that container still runs, else in the next start's; containers still run."""
    shim = str(wheel_bin / launcher.NAME)
    python = interpreter(shim)
    warmup = Path(subprocess.run([python, "-I", "-c", "import shim.binary.warmup as m; print(m.__file__)"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    socket = zygote_socket(python, containerd.address)
    for z in zygotes_of(containerd, socket):  # the next start must spawn a new one
        z.kill()
        z.wait(5)
    offset = containerd.log_path.stat().st_size
    hidden = warmup.with_name("warmup.py.hidden")
    warmup.rename(hidden)
    try:
        result = ctr("run", "--rm", "--runtime", shim, containerd.image, containerd.new_id("nozygote"), "true")
        assert result.rc == 0, result.stderr
        wait_until(lambda: os.path.exists(socket + ".failed") or logged(containerd, offset), PREPARE_SECONDS,
                   "the zygote's failure recorded")
        result = ctr("run", "--rm", "--runtime", shim, containerd.image, containerd.new_id("nozygote"), "true")
        assert result.rc == 0, result.stderr
        wait_until(lambda: logged(containerd, offset), 15, "the zygote's failure in containerd's log")
    finally:
        hidden.rename(warmup)
    lines = logged(containerd, offset)
    assert all("level=error" in line and "cannot start" in line and "warmup" in line for line in lines)
    assert not zygotes_of(containerd, socket)
    # The next zygote (the module is back) starts, and clears the record.
    assert ctr("run", "--rm", "--runtime", shim, containerd.image, containerd.new_id("zygote"), "true").rc == 0
    wait_until(lambda: zygotes_of(containerd, socket), PREPARE_SECONDS, "a zygote again")
    wait_until(lambda: not os.path.exists(socket + ".failed"), 10, "the failure record cleared")
