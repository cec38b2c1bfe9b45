"""Looking at shims from the outside: which process serves a task, its socket, its fds.

Used by the durability, grouping and options tests. A shim is found as the parent of the
task's init process: every shim (pyshim or runc-v2) is a child subreaper and the parent
of its containers, whatever its command line looks like.
"""
import glob
import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import psutil

SOCKET_DIR = Path("/run/containerd/s")
CTR_FIFO_DIR = Path("/run/containerd/fifo")
GROUP_ANNOTATION = "io.containerd.runc.v2.group"


def shim_pid(containerd, cid, namespace=None):
    """The pid of the shim serving task `cid` (the parent of its init process)."""
    pid, _ = containerd.tasks(namespace)[cid]
    return psutil.Process(pid).ppid()


def socket_path(containerd, group, namespace=None):
    """The socket of the shim serving `group` (a task id, or its grouping annotation):
    sha256 of `<containerd address>/<namespace>/<group>`, as runc-v2 and pyshim name it."""
    key = os.path.join(containerd.address, namespace or containerd.namespace, group)
    return SOCKET_DIR / hashlib.sha256(key.encode()).hexdigest()


def bundle(containerd, cid, namespace=None):
    return containerd.state / "io.containerd.runtime.v2.task" / (namespace or containerd.namespace) / cid


def shim_address(bundle_dir):
    """The shim address containerd keeps for a task: `bootstrap.json` (2.x), else `address`."""
    try:
        return json.loads((bundle_dir / "bootstrap.json").read_text())["address"]
    except FileNotFoundError:
        return (bundle_dir / "address").read_text().strip()


def alive(pid):
    """Whether `pid` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# How long a zygote may take to get ready (imports, rehearsal) on a loaded test machine.
ZYGOTE_PREPARE_SECONDS = 60


def wait_until(condition, timeout=10.0, what="condition"):
    """Poll `condition()` until it is true; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true within {timeout}s")
        time.sleep(0.05)


def open_fds(pid):
    """{fd: what it points at} for process `pid` (e.g. 'pipe:[123]', 'socket:[456]', a path)."""
    fds = {}
    for entry in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[int(entry)] = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            pass  # closed meanwhile
    return fds


def fd_kinds(fds):
    """{'pipe': n, 'socket': n, 'anon_inode:[eventfd]': n, 'file': n, ...} of an open_fds() map."""
    kinds = {}
    for target in fds.values():
        kind = target.split(":[")[0] if ":[" in target else target if target.startswith("anon_inode:") else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def remove_ctr_fifos(cid):
    """Remove the FIFO directories `ctr run -d` left in /run/containerd/fifo for `cid` (ctr makes
    them, names the FIFOs `<id>-stdin|stdout|stderr`, and nobody removes them after `-d`)."""
    for fifo in glob.glob(str(CTR_FIFO_DIR / "*" / f"{cid}-std*")):
        shutil.rmtree(os.path.dirname(fifo), ignore_errors=True)


class LineReader:
    """Collects the lines a process writes to its stdout, in a thread."""

    def __init__(self, proc):
        self.proc = proc
        self.lines = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for raw in self.proc.stdout:
            if raw.endswith(b"\n"):  # a partial last line (the process was killed) is dropped
                self.lines.append(raw.decode(errors="replace")[:-1])

    def wait_for(self, predicate, timeout=20.0, what="line"):
        wait_until(lambda: any(predicate(line) for line in list(self.lines)), timeout,
                   f"{what} (got {self.lines[-5:]})")

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self._thread.join(5)
        return self.lines
