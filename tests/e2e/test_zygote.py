"""The zygote (shim/binary/zygote.py): shims forked from a warmed interpreter, never dependent on it."""
import fcntl
import os
import socket
import subprocess
import time

import psutil
import pytest

from e2e.harness import command_line, shim_dir
from e2e.shims import ZYGOTE_PREPARE_SECONDS as PREPARE_SECONDS, shim_pid, wait_until
from e2e.tasks import remove
from shim.binary import launcher, zygote
from shim.binary.address import is_live


def install_socket(containerd):
    """The zygote socket of the install under test (zygotes are per install and containerd:
    test_wheel.py's install may have one of its own beside it for a few seconds)."""
    with open(os.path.join(shim_dir(), launcher.NAME)) as f:
        python = f.readline()[2:].split()[0]
    return subprocess.run([python, "-I", "-c", "import sys; from shim.binary.zygote import socket_path; "
                           "print(socket_path(sys.argv[1]))", containerd.address],
                          capture_output=True, text=True, check=True).stdout.strip()


def install_lock(containerd):
    """zygote.lock_path of the install under test."""
    return install_socket(containerd) + ".lock"


def zygote_processes(containerd):
    """Every zygote process of this containerd, bound to its socket or not yet: direct
    children of its subreaper."""
    found = []
    for proc in psutil.Process(containerd.process.pid).children():
        try:
            if command_line(proc)[-1:] == ["zygote"] and containerd.address in command_line(proc):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def zygotes(containerd):
    """The zygotes of this containerd and the install under test that serve (listen on the
    install's socket)."""
    socket = install_socket(containerd)
    found = []
    for proc in zygote_processes(containerd):
        try:
            if any(c.laddr == socket for c in proc.net_connections(kind="unix")):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def the_zygote(containerd):
    """This containerd's one zygote, once it serves (a start may still be spawning it)."""
    wait_until(lambda: zygotes(containerd), what="a zygote")
    [z] = zygotes(containerd)
    wait_until(lambda: serving(z), PREPARE_SECONDS, "the zygote serving")
    return z


def serving(proc):
    """Whether a zygote listens yet (it binds its socket once it has imported everything)."""
    try:
        return any(c.laddr.startswith(zygote.ZYGOTE_DIR + "/") for c in proc.net_connections(kind="unix"))
    except psutil.NoSuchProcess:
        return True  # gone: nothing to wait for


def zygote_socket(proc):
    """The socket a zygote listens on (named after the install it runs from)."""
    # a set: a connection it has accepted (a start handing over) shows the same path
    [path] = {c.laddr for c in proc.net_connections(kind="unix")
              if c.laddr.startswith(zygote.ZYGOTE_DIR + "/")}
    return path


def shim_of(containerd, cid):
    """The shim daemon process serving `cid`."""
    return psutil.Process(shim_pid(containerd, cid))


@pytest.fixture
def pyshim_only(containerd):
    if containerd.runtime != "io.containerd.pyshim.v1":
        pytest.skip("the zygote is pyshim's")


def start_sleeper(containerd, ctr, cid):
    result = ctr("run", "-d", "--runtime", containerd.runtime, containerd.image, cid, "sleep", "1000")
    assert result.rc == 0, result.stderr


def test_later_shims_are_forked_by_the_zygote(pyshim_only, containerd, ctr, run, cid):
    assert run("true").rc == 0  # leaves a zygote behind if none was running
    z = the_zygote(containerd)
    start_sleeper(containerd, ctr, cid)
    try:
        shim = shim_of(containerd, cid)
        assert shim.ppid() == z.pid
        # Only the zygote holds its lock: a daemon that kept it would keep every later
        # zygote of this containerd from getting ready.
        lock = install_lock(containerd)
        assert lock in {f.path for f in z.open_files()}
        assert lock not in {f.path for f in shim.open_files()}
        for spare in spares(z):
            assert lock not in {f.path for f in spare.open_files()}
    finally:
        remove(containerd, ctr, cid)


def spares(z):
    """The spare daemons of zygote `z` (forked ahead, serving nobody yet)."""
    found = []
    for child in z.children():
        try:
            if command_line(child) == [launcher.NAME, "-address", z.cmdline()[2], "spare"]:
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def test_the_next_shim_is_the_spare_forked_ahead(pyshim_only, containerd, ctr, run, cid):
    """The zygote keeps one daemon forked ahead: the next container's shim is that process,
    and a new spare follows once it has taken its container."""
    assert run("true").rc == 0
    z = the_zygote(containerd)
    wait_until(lambda: spares(z), what="a spare daemon")
    [spare] = spares(z)
    start_sleeper(containerd, ctr, cid)
    try:
        shim = shim_of(containerd, cid)
        assert shim.pid == spare.pid
        assert command_line(shim)[-2:] == ["-id", cid]
        wait_until(lambda: spares(z), what="the next spare")
        [after] = spares(z)
        assert after.pid != spare.pid
    finally:
        remove(containerd, ctr, cid)


def test_a_spare_goes_with_its_zygote(pyshim_only, containerd, ctr, run, cid):
    """A spare serves nobody: a killed zygote takes it along, never a shim with a container."""
    assert run("true").rc == 0
    z = the_zygote(containerd)
    start_sleeper(containerd, ctr, cid)
    shim = shim_of(containerd, cid)
    wait_until(lambda: spares(z), what="a spare daemon")
    [spare] = spares(z)
    z.kill()
    z.wait(5)
    spare.wait(5)  # raises psutil.TimeoutExpired if the spare stays
    assert shim.is_running()
    result = ctr("task", "exec", "--exec-id", "after", cid, "sh", "-c", "exit 5")
    assert result.rc == 5
    remove(containerd, ctr, cid)


def test_a_killed_spare_is_reaped_at_once(pyshim_only, containerd, run):
    """Even when no daemon of the zygote runs: a spare's exit is the zygote's to reap."""
    assert run("true").rc == 0
    z = the_zygote(containerd)
    wait_until(lambda: spares(z), what="a spare daemon")
    [spare] = spares(z)
    wait_until(lambda: [c.pid for c in z.children()] == [spare.pid], what="the shim of `true` gone")
    spare.kill()

    def reaped():  # neither running nor a zombie any more
        try:
            spare.status()
        except psutil.NoSuchProcess:
            return True
        return False
    wait_until(reaped, 2, "the killed spare reaped")
    assert z.is_running() and z.status() != psutil.STATUS_ZOMBIE


def test_no_second_zygote_gets_ready_while_one_holds_the_lock(pyshim_only, containerd, run):
    """A start that finds no zygote serving spawns one only if none is getting ready: the
    zygote of an address holds its lock from before its imports until it exits."""
    for z in zygotes(containerd):
        z.kill()
        z.wait(5)

    path = install_lock(containerd)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a zygote getting ready would
        assert run("echo", "without").stdout == "without\n"  # its start forks the daemon itself
        time.sleep(1)
        assert zygote_processes(containerd) == []
    finally:
        os.close(fd)
    assert run("echo", "with").stdout == "with\n"
    wait_until(lambda: zygotes(containerd), PREPARE_SECONDS, "a zygote, once the lock is free")


def test_shims_outlive_a_killed_zygote(pyshim_only, containerd, ctr, run, cid):
    assert run("true").rc == 0
    wait_until(lambda: zygotes(containerd), what="a zygote")
    start_sleeper(containerd, ctr, cid)
    shim = shim_of(containerd, cid)
    [killed_socket] = [zygote_socket(z) for z in zygotes(containerd)]
    for z in zygotes(containerd):
        z.kill()
        z.wait(5)
    assert shim.is_running()
    assert os.path.exists(killed_socket)  # a SIGKILLed zygote cannot remove it
    # The orphaned shim still serves its container: exec, then a clean stop.
    result = ctr("task", "exec", "--exec-id", "after", cid, "sh", "-c", "echo alive; exit 3")
    assert (result.rc, result.stdout) == (3, "alive\n")
    remove(containerd, ctr, cid)
    assert run("echo", "next").stdout == "next\n"  # and new containers still start
    # ...and the next zygote takes over the address (the dead socket is replaced).
    z = the_zygote(containerd)
    wait_until(lambda: is_live(killed_socket, socket.SOCK_SEQPACKET), PREPARE_SECONDS, "the new zygote serving")
    assert zygote_socket(z) == killed_socket


def test_a_new_zygote_removes_dead_zygote_sockets(pyshim_only, containerd, run, tmp_path):
    os.makedirs(zygote.ZYGOTE_DIR, exist_ok=True)
    dead = os.path.join(zygote.ZYGOTE_DIR, "zygote-0000deadtest0000.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(dead)
    s.close()  # a socket file nobody listens on, as a killed zygote leaves it
    for z in zygotes(containerd):  # make the next start spawn a fresh zygote
        z.kill()
        z.wait(5)
    assert run("true").rc == 0
    wait_until(lambda: not os.path.exists(dead), what="the dead socket removed")


def test_an_idle_zygote_exits_on_its_own(pyshim_only, containerd, run):
    assert run("true").rc == 0
    # Its idle time counts from when it serves: on a loaded machine, getting ready (imports,
    # rehearsal) alone can take longer than IDLE_SECONDS.
    for z in zygotes(containerd):
        wait_until(lambda z=z: serving(z), PREPARE_SECONDS, "the zygote serving")
    wait_until(lambda: not zygotes(containerd), zygote.IDLE_SECONDS + 5, "the idle zygote gone")


def installed_package(containerd):
    """The `shim` package directory of the install under test."""
    with open(os.path.join(shim_dir(), launcher.NAME)) as f:
        python = f.readline()[2:].split()[0]
    return subprocess.run([python, "-I", "-c", "import os, shim; print(os.path.dirname(shim.__file__))"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_a_zygote_exits_when_its_installed_code_changes(pyshim_only, containerd, ctr, run, cid):
    """A zygote must never fork a daemon from older code than containerd just ran: a change
    to any module of the package (here: a module of shim/task, far from the zygote's own
    directory) ends it, while the daemons it forked go on; the next start spawns a new one."""
    assert run("true").rc == 0
    z = the_zygote(containerd)
    start_sleeper(containerd, ctr, cid)
    shim = shim_of(containerd, cid)
    module = os.path.join(installed_package(containerd), "task", "state.py")
    times = os.stat(module)
    try:
        os.utime(module, ns=(times.st_atime_ns, times.st_mtime_ns))  # the same times: only the event
        z.wait(5)  # raises psutil.TimeoutExpired if the zygote stays
    finally:
        remove(containerd, ctr, cid)
    assert not shim.is_running() or shim.wait(10) is not None
    assert run("echo", "next").stdout == "next\n"
    assert the_zygote(containerd).pid != z.pid


def test_bytecode_written_beside_the_code_is_no_change(pyshim_only, containerd, run, tmp_path):
    """Only sources count: a .pyc written into __pycache__ (and any other file) leaves the
    zygote serving."""
    assert run("true").rc == 0
    z = the_zygote(containerd)
    other = os.path.join(installed_package(containerd), "task", "notes.txt")
    try:
        with open(other, "w") as f:
            f.write("not code\n")
    finally:
        os.unlink(other)
    time.sleep(1.5)  # the zygote polls its fds at least once a second
    assert z.is_running() and z.status() != psutil.STATUS_ZOMBIE


def test_the_zygote_goes_with_its_containerd(pyshim_only, containerd, ctr, run, cid):
    assert run("true").rc == 0
    z = the_zygote(containerd)
    start_sleeper(containerd, ctr, cid)
    shim = shim_of(containerd, cid)
    with containerd.killed():
        z.wait(5)  # raises psutil.TimeoutExpired if the zygote stays
        assert shim.is_running()  # its daemon does not depend on it
    result = ctr("task", "exec", "--exec-id", "after", cid, "sh", "-c", "exit 4")
    assert result.rc == 4
    remove(containerd, ctr, cid)


def test_a_forked_shim_imports_nothing_the_zygote_lacks(pyshim_only, containerd, ctr, run, cid):
    """An import in a forked daemon costs it private memory: the zygote preloads
    daemon.MODULES, and a daemon warns at exit about any module it had to import."""
    assert run("true").rc == 0
    z = the_zygote(containerd)
    offset = containerd.log_path.stat().st_size
    start_sleeper(containerd, ctr, cid)
    shim = shim_of(containerd, cid)
    assert shim.ppid() == z.pid
    result = ctr("task", "exec", "--exec-id", "echo", cid, "sh", "-c", "echo out; echo err >&2")
    assert (result.rc, result.stdout, result.stderr) == (0, "out\n", "err\n")
    assert ctr("task", "pause", cid).rc == 0
    assert ctr("task", "resume", cid).rc == 0
    assert ctr("task", "metrics", cid).rc == 0
    remove(containerd, ctr, cid)
    shim.wait(10)
    lines = containerd.log_tail(10_000, offset=offset).splitlines()
    assert any("shutting down" in line and f"id={cid}" in line for line in lines)  # it logged
    assert not [line for line in lines if "imported after the fork" in line]
