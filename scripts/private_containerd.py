"""A private containerd for the demo (scripts/demo.py) and the end-to-end tests.

`PrivateContainerd(workdir)` writes a containerd config whose root, state,
gRPC socket and log all live under `workdir`, starts containerd under
scripts/subreaper.py (PID 1 on the test machines never reaps orphans; the
daemonized shims are re-parented to the subreaper instead), runs `ctr` against
it, and stops it again.

Not everything containerd and runc touch can be moved under `workdir`:
runc-v2 keeps its state in /run/containerd/runc/<namespace>, its sockets in
/run/containerd/s, ctr its FIFOs in /run/containerd/fifo, and runc the
container cgroups in /sys/fs/cgroup/<controller>/<namespace>/<id>. Using a
namespace of its own keeps those apart from any other containerd's;
`remove_namespace_dirs` removes the per-namespace directories afterwards.

Standard library only (the demo runs it before anything else is installed).
"""
import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
import subreaper  # noqa: E402  (sibling script)

RUNC_V2_ROOT = Path("/run/containerd/runc")
MNT_DETACH = 2


class CtrResult(NamedTuple):
    rc: int
    stdout: str
    stderr: str


def shim_binary_name(runtime):
    """`io.containerd.pyshim.v1` -> `containerd-shim-pyshim-v1` (containerd's own rule)."""
    name, version = runtime.split(".")[-2:]
    return f"containerd-shim-{name}-{version}"


def _unescape_mountinfo(field):
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounts_under(path):
    """Mount points at or below `path`, deepest first (from /proc/self/mountinfo)."""
    prefix = str(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape_mountinfo(line.split()[4])
            if point == prefix[:-1] or point.startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def unmount_under(path):
    """Lazily unmount everything at or below `path`; return the mount points."""
    libc = ctypes.CDLL(None, use_errno=True)
    points = mounts_under(path)
    for point in points:
        libc.umount2(point.encode(), MNT_DETACH)
    return points


def cgroup_roots():
    """Mount points of every cgroup (v1) and cgroup2 hierarchy."""
    roots = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype in ("cgroup", "cgroup2"):
                roots.append(Path(_unescape_mountinfo(fields[4])))
    return roots


def namespace_cgroups(namespace):
    """Cgroup directories of one containerd namespace: `<hierarchy>/<namespace>` (ctr's default cgroupsPath)."""
    return [root / namespace for root in cgroup_roots() if (root / namespace).is_dir()]


def remove_namespace_dirs(namespace):
    """Remove the per-namespace runc state and cgroup directories if they are empty."""
    for directory in [RUNC_V2_ROOT / namespace, *namespace_cgroups(namespace)]:
        try:
            os.rmdir(directory)
        except FileNotFoundError:
            pass
        except OSError as e:
            print(f"private_containerd: cannot remove {directory}: {e.strerror}", file=sys.stderr)


class PrivateContainerd:
    """A containerd with its own socket, root, state and log under `workdir`."""

    def __init__(self, workdir, *, containerd="containerd", ctr="ctr", path_prefix=(), namespace="default",
                 log_level="info", grace=2.0, cri_config=None, restartable=False, new_session=False):
        self.workdir = Path(workdir)
        # new_session: the subreaper (and so containerd) in a session of its own, so that a Ctrl-C
        # meant for the caller does not stop containerd before the caller has cleaned up
        self.new_session = new_session
        # restartable: kill_containerd() and restart() may stop and start containerd while its shims
        # run on (they stay children of the same subreaper, see subreaper.py --restartable)
        self.restartable = restartable
        # TOML tables appended to the config that configure the CRI plugin; None disables CRI
        self.cri_config = cri_config
        self.containerd_bin = containerd
        self.ctr_bin = ctr
        self.path_prefix = [str(p) for p in path_prefix]
        self.namespace = namespace
        self.log_level = log_level
        self.grace = grace
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.address = str(self.workdir / "containerd.sock")
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        self.process = None  # the subreaper
        self.containerd_pid = None
        self._log_start = 0  # where this run's part of the log begins
        self._major = None

    # -- configuration and lifecycle ------------------------------------------------------------

    def config(self):
        q = json.dumps  # a JSON string is a valid TOML basic string
        return "\n".join([
            # containerd 2.x reads version 2 too, but migrates it on every start: give it its own.
            f"version = {3 if self.major_version() >= 2 else 2}",
            f"root = {q(str(self.root))}",
            f"state = {q(str(self.state))}",
            f"disabled_plugins = {q(self.disabled_plugins())}",
            "",
            "[grpc]",
            f"  address = {q(self.address)}",
            "",
            "[debug]",
            f"  level = {q(self.log_level)}",
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {q(str(self.workdir / 'opt'))}",
            "",
            *([self.cri_config] if self.cri_config is not None else []),
        ])

    def major_version(self):
        """containerd's major version (1 or 2), from `containerd --version`; cached."""
        if self._major is None:
            version = daemon_version(self.containerd_bin) or "1"
            self._major = int(re.match(r"\d*", version)[0] or 1)
        return self._major

    def disabled_plugins(self):
        """NRI (its socket, /var/run/nri/nri.sock, is machine-wide; on by default in 2.x) and,
        without `cri_config`, CRI: it would also want a pause image and CNI. 2.x splits CRI into
        three plugins."""
        disabled = ["io.containerd.nri.v1.nri"]
        if self.cri_config is None:
            disabled += (["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"]
                         if self.major_version() >= 2 else ["io.containerd.grpc.v1.cri"])
        return disabled

    def environ(self):
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join(self.path_prefix + [env.get("PATH") or os.defpath])
        for name in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "NOTIFY_SOCKET"):
            env.pop(name, None)
        return env

    def start(self, timeout=30.0):
        """Start containerd under the subreaper and wait until it answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(SCRIPTS / "subreaper.py"), "--grace", str(self.grace),
                 *(["--restartable"] if self.restartable else []), "--",
                 self.containerd_bin, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.environ(),
                start_new_session=self.new_session)
        self._wait_until_answering(timeout)
        return self

    def _wait_until_answering(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"containerd exited with status {self.process.returncode} while starting; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            if os.path.exists(self.address) and self.ctr("version", timeout=5).rc == 0:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"containerd did not answer within {timeout}s; log {self.log_path}:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)
        # the subreaper's child running our config (its other children are re-parented shims)
        mine = f" --config {self.config_path}"
        children = [pid for pid, args in subreaper.descendants(self.process.pid) if mine in args]
        self.containerd_pid = children[0] if children else None

    def kill_containerd(self):
        """SIGKILL containerd itself (needs `restartable`): its shims and containers run on, children
        of the subreaper. Returns once containerd is reaped; `restart()` starts it again."""
        assert self.restartable and self.running(), "kill_containerd needs a running, restartable containerd"
        pid, self.containerd_pid = self.containerd_pid, None
        _kill(pid)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists():  # until the subreaper has reaped it
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd (pid {pid}) still not reaped 10s after SIGKILL")
            time.sleep(0.01)

    @contextlib.contextmanager
    def killed(self):
        """`with containerd.killed():` containerd is SIGKILLed for the block and started again after
        it (also when the block fails), while the shims and containers run on."""
        self.kill_containerd()
        try:
            yield self
        finally:
            self.restart()

    def restart(self, timeout=30.0):
        """Start containerd again after kill_containerd(), same config, socket and log; wait until it
        answers."""
        assert self.restartable and self.process is not None and not self.running()
        self.process.send_signal(signal.SIGHUP)  # subreaper --restartable: start COMMAND again
        self._wait_until_answering(timeout)
        return self

    def running(self):
        """Whether containerd itself is alive (the subreaper outlives it for its grace period)."""
        if self.process is None or self.process.poll() is not None or self.containerd_pid is None:
            return False
        try:
            stat = Path(f"/proc/{self.containerd_pid}/stat").read_text()
        except OSError:
            return False
        return stat[stat.rindex(")") + 2] != "Z"

    def stop(self, timeout=None):
        """SIGTERM containerd (through the subreaper) and wait; return the leftover processes the
        subreaper had to kill, as the lines it logged. Safe to call twice."""
        if self.process is None:
            return []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout or self.grace + 20)
            except subprocess.TimeoutExpired:
                for pid, _ in reversed(subreaper.descendants(self.process.pid)):
                    _kill(pid)
                self.process.kill()
                self.process.wait()
        self.process = None
        with open(self.log_path, errors="replace") as f:
            f.seek(self._log_start)
            return [line.rstrip("\n") for line in f if line.startswith("subreaper: killing leftover")]

    def cleanup(self, namespaces=()):
        """After stop(): unmount what is left under workdir, remove per-namespace dirs; return the
        mount points that had to be unmounted."""
        left = unmount_under(self.workdir)
        for namespace in namespaces:
            remove_namespace_dirs(namespace)
        return left

    # -- ctr ------------------------------------------------------------------------------------

    def ctr_argv(self, *args, namespace=None):
        return [self.ctr_bin, "--address", self.address, "--namespace", namespace or self.namespace, *map(str, args)]

    def ctr(self, *args, input=None, timeout=60.0, namespace=None):
        """Run `ctr --address … --namespace … ARGS`; return CtrResult(rc, stdout, stderr).

        stdin is /dev/null unless `input` (str or bytes) is given. Beware ctr's stdin quirk: if
        `ctr run` sees EOF on its stdin before its task exists it never closes the container's stdin, so
        feed `ctr run -i` through a pipe after the task is running instead (see tests/e2e)."""
        if isinstance(input, str):
            input = input.encode()
        proc = subprocess.run(self.ctr_argv(*args, namespace=namespace), input=input,
                              stdin=None if input is not None else subprocess.DEVNULL,
                              capture_output=True, timeout=timeout, env=self.environ())
        return CtrResult(proc.returncode, _text(proc.stdout), _text(proc.stderr))

    def ctr_popen(self, *args, namespace=None, **popen_kwargs):
        """Start ctr without waiting (for concurrent runs or a streamed stdin)."""
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        popen_kwargs.setdefault("stdout", subprocess.PIPE)
        popen_kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(self.ctr_argv(*args, namespace=namespace), env=self.environ(), **popen_kwargs)

    def import_image(self, archive, namespace=None):
        result = self.ctr("images", "import", archive, namespace=namespace, timeout=120)
        if result.rc != 0:
            raise RuntimeError(f"ctr images import {archive} failed: {result.stderr.strip()}")

    def log_tail(self, lines=80, offset=0):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def daemon_version(containerd="containerd"):
    """The version word of `containerd --version` (e.g. `1.6.20~ds1`, `2.1.9+unknown`), or None."""
    try:
        out = subprocess.run([containerd, "--version"], capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out[2] if len(out) >= 3 else None


def _text(data):
    return data.decode("utf-8", errors="surrogateescape")


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
