"""`pyshim install | install --check | uninstall`: pyshim on a node with a system containerd.

install    writes the shim's fast launcher where containerd finds it (--bin-dir; or, with
           --no-bin, uses this installation's own shim and prints its path), registers the
           CRI runtime handler (containerd 2.x: a drop-in imported by the main config;
           1.6/1.7: a block merged into the main config), keeps a backup of the main config
           before its first change, and writes the RuntimeClass manifest.
--check    asks containerd what it sees: the shim runs, `containerd config dump` has the
           handler, the running containerd has loaded it and its CRI plugin is up, and (with
           --image) a container runs with the shim.
uninstall  takes out exactly what install put in.

Every run prints each change it makes (and nothing changes on a second run). Every path and
binary is a flag, so that tests point it at a fake config directory and a private containerd.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass, field

from shim import RUNTIME
from shim.binary import launcher
from shim.tools import containerd_config as cc

DEFAULT_CONFIG = "/etc/containerd/config.toml"
DEFAULT_BIN_DIR = "/usr/local/bin"
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
BACKUP_SUFFIX = ".pyshim-backup"


@dataclass
class Plan:
    """Where everything goes, from the flags."""
    config: str
    drop_in: str
    bin_dir: str | None
    manifest: str
    containerd: str
    ctr: str
    address: str
    namespace: str
    handler: str
    image: str | None = None

    @property
    def backup(self) -> str:
        return self.config + BACKUP_SUFFIX

    @property
    def shim(self) -> str:
        """The shim containerd runs (the handler's runtime_path)."""
        directory = self.bin_dir if self.bin_dir is not None else sysconfig.get_path("scripts")
        return os.path.join(directory, launcher.NAME)


@dataclass
class Changes:
    lines: list[str] = field(default_factory=list)

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        print(line)


class InstallError(Exception):
    pass


def containerd_major(containerd: str) -> int:
    try:
        out = subprocess.run([containerd, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise InstallError(f"cannot run containerd ({containerd}): {e}; name it with --containerd") from None
    match = re.search(r"\sv?(\d+)\.\d+", out)
    if not match:
        raise InstallError(f"cannot tell containerd's version from `{containerd} --version`: {out.strip()!r}")
    return int(match[1])


def read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_file(path: str, text: str, changes: Changes, what: str, mode: int = 0o644) -> None:
    """Write `text` to `path` (atomically) unless it already holds exactly that."""
    if read(path) == text:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    changes(f"wrote {what}: {path}")


def remove_file(path: str, changes: Changes, what: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    changes(f"removed {what}: {path}")


def edited_config(plan: Plan, major: int, text: str | None) -> str:
    """The main config as install leaves it (and the drop-in's content, for 2.x, via plan)."""
    if major >= 2:
        base = text if text is not None else cc.new_main_config(3)
        return cc.add_import(base, plan.drop_in, plan.config)
    base = text if text is not None else cc.new_main_config(2)
    data = cc.parse(base, plan.config)
    if int(data.get("version", 1)) != 2:
        raise InstallError(f"{plan.config} is not a version 2 config, which containerd {major}.x needs for "
                           f"this handler: convert it (containerd config migrate) or merge "
                           f"{cc.SNIPPET[2]} by hand")
    tables = cc.handler_tables(2, plan.handler, plan.shim, cc.needs_runc(cc.parse(cc.remove_block(base))))
    return cc.add_block(base, tables, plan.handler, plan.config)


def install(plan: Plan) -> int:
    changes = Changes()
    major = containerd_major(plan.containerd)
    # 1. the shim
    if plan.bin_dir is not None:
        if launcher.is_launcher(plan.shim) and read(plan.shim) == launcher.text(sys.executable,
                                                                                 launcher.search_path()):
            pass
        else:
            os.makedirs(plan.bin_dir, exist_ok=True)
            launcher.write(plan.shim)
            changes(f"wrote the shim's launcher: {plan.shim}")
    else:
        if not launcher.is_launcher(plan.shim):
            launcher.write(plan.shim)
            changes(f"replaced this install's console script with the fast launcher: {plan.shim}")
        print(f"runtime_path: {plan.shim} (no --bin-dir: containerd runs this installation's shim)")
    # 2. containerd's config
    text = read(plan.config)
    config_version = cc.version(text, plan.config) if text is not None else (3 if major >= 2 else 2)
    if major >= 2:
        if config_version < 2:
            raise InstallError(f"{plan.config} is a version {config_version} config: migrate it first "
                               f"(containerd config migrate)")
        tables = cc.handler_tables(config_version, plan.handler, plan.shim, with_runc=False)
        write_file(plan.drop_in, cc.drop_in(config_version, tables), changes, "the runtime handler drop-in")
    new = edited_config(plan, major, text)
    if new != text:
        if text is not None and not os.path.exists(plan.backup):
            shutil.copy2(plan.config, plan.backup)
            changes(f"backed up {plan.config} to {plan.backup}")
        write_file(plan.config, new, changes,
                   "containerd's config (imports the drop-in)" if major >= 2 else
                   f"containerd's config (handler {plan.handler!r} merged)")
    # 3. the RuntimeClass
    write_file(plan.manifest, cc.runtimeclass(plan.handler), changes, "the RuntimeClass manifest")
    if not changes.lines:
        print("nothing to change: pyshim is installed")
    else:
        print(f"next: restart containerd (systemctl restart containerd); `kubectl apply -f {plan.manifest}` "
              f"once per cluster; then `pyshim install --check`")
    return 0


def uninstall(plan: Plan) -> int:
    changes = Changes()
    text = read(plan.config)
    if text is not None:
        new = cc.remove_block(cc.remove_import(text, plan.drop_in))
        if new != text:
            if new == cc.new_main_config(2) or new == cc.new_main_config(3):
                remove_file(plan.config, changes, "containerd's config, which install had created")
            else:
                write_file(plan.config, new, changes, "containerd's config (pyshim's lines taken out)")
        backup = read(plan.backup)
        if backup is not None:
            if backup == read(plan.config):
                remove_file(plan.backup, changes, f"the backup (identical to {plan.config} again)")
            else:
                print(f"kept {plan.backup}: {plan.config} has changed since it was taken")
    if (read(plan.drop_in) or "").startswith(cc.DROP_IN_HEADER):
        remove_file(plan.drop_in, changes, "the runtime handler drop-in")
    if read(plan.manifest) == cc.runtimeclass(plan.handler):
        remove_file(plan.manifest, changes, "the RuntimeClass manifest")
    if plan.bin_dir is not None and launcher.is_launcher(plan.shim):
        remove_file(plan.shim, changes, "the shim's launcher")
    if not changes.lines:
        print("nothing to change: pyshim is not installed")
    else:
        print("next: restart containerd (systemctl restart containerd)")
    return 0


# -- --check ------------------------------------------------------------------------------------

class Report:
    def __init__(self) -> None:
        self.failed = 0

    def ok(self, line: str) -> None:
        print(f"ok:      {line}")

    def bad(self, line: str) -> None:
        self.failed += 1
        print(f"PROBLEM: {line}")

    def note(self, line: str) -> None:
        print(f"note:    {line}")


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(argv, 127, "", str(e))


def server_pid(address: str) -> int | None:
    """The pid of the process listening on a unix socket (containerd), from SO_PEERCRED."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(5)
        s.connect(address)
        pid, _, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid
    except OSError:
        return None
    finally:
        s.close()


def process_start_time(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def check(plan: Plan) -> int:
    report = Report()
    major = containerd_major(plan.containerd)
    # The shim itself.
    result = _run([plan.shim, "-v"])
    if result.returncode != 0 or f"Runtime: {RUNTIME}" not in result.stdout:
        report.bad(f"the shim {plan.shim} does not run ({(result.stderr or result.stdout).strip()!r}): "
                   f"run `pyshim install` again")
    elif not launcher.is_launcher(plan.shim):
        report.bad(f"{plan.shim} runs, but is not pyshim's fast launcher (it starts twice as slowly): "
                   f"run `pyshim install` again")
    else:
        report.ok(f"the shim runs: {plan.shim}")
    # What containerd reads from its config files.
    dump = _run([plan.containerd, "--config", plan.config, "config", "dump"])
    config_version = 3 if major >= 2 else 2
    if dump.returncode != 0:
        report.bad(f"containerd cannot read its config {plan.config}: {dump.stderr.strip()[-400:]}")
        found = None
    else:
        found = cc.handler(cc.parse(dump.stdout, "containerd config dump"), config_version, plan.handler)
    if dump.returncode == 0 and found is None:
        why = ""
        text = read(plan.config)
        if major >= 2 and text is not None and not cc.imported(text, plan.config, plan.drop_in):
            why = f": {plan.config} does not import {plan.drop_in}"
        elif major >= 2 and not os.path.exists(plan.drop_in):
            why = f": the drop-in {plan.drop_in} is missing"
        report.bad(f"`containerd config dump` has no CRI runtime handler {plan.handler!r}{why}; "
                   f"run `pyshim install`")
    elif found is not None:
        if found.get("runtime_type") != RUNTIME:
            report.bad(f"handler {plan.handler!r} has runtime_type {found.get('runtime_type')!r}, not {RUNTIME!r}")
        elif found.get("runtime_path") and found["runtime_path"] != plan.shim:
            report.bad(f"handler {plan.handler!r} runs {found['runtime_path']}, not {plan.shim}")
        else:
            report.ok(f"`containerd config dump` has handler {plan.handler!r} ({RUNTIME}, {plan.shim})")
    # The running containerd.
    ctr = [plan.ctr, "--address", plan.address]
    version = _run(ctr + ["version"], timeout=15)
    if version.returncode != 0:
        report.bad(f"containerd does not answer at {plan.address} (is it running? is --address right?): "
                   f"{version.stderr.strip()}")
        return _verdict(report)
    pid = server_pid(plan.address)
    started = process_start_time(pid) if pid else None
    changed = max((os.stat(p).st_mtime for p in (plan.config, plan.drop_in) if os.path.exists(p)), default=0)
    if started is not None and started < changed - 1:
        report.bad(f"containerd (pid {pid}) was started before its config changed: restart it "
                   f"(systemctl restart containerd)")
    plugins = _run(ctr + ["plugins", "ls"])
    cri = [line.split() for line in plugins.stdout.splitlines()
           if re.match(r"io\.containerd\.(grpc\.v1\s+cri|cri\.v1\s+runtime)\s", line)]
    statuses = {row[-1] for row in cri}
    if not cri:
        report.bad("containerd has no CRI plugin (`ctr plugins ls`): Kubernetes cannot use any handler")
    elif statuses != {"ok"}:
        report.bad(f"containerd's CRI plugin did not load (status {', '.join(sorted(statuses))} in "
                   f"`ctr plugins ls`): containerd's log says why (journalctl -u containerd)")
    else:
        report.ok("containerd's CRI plugin is loaded")
    if pid:
        path = _environ_path(pid)
        on_path = shutil.which(launcher.NAME, path=path) if path is not None else None
        if on_path:
            report.note(f"`ctr run --runtime {RUNTIME}` finds {on_path} on containerd's PATH")
        else:
            report.note(f"{launcher.NAME} is not on containerd's PATH: CRI uses runtime_path; "
                        f"with ctr use --runtime {plan.shim}")
    # A container.
    if plan.image:
        _test_container(plan, ctr, report)
    else:
        report.note(f"no test container run: give --image REF (an image in namespace {plan.namespace!r}; "
                    f"on a Kubernetes node the pause image, with --namespace k8s.io)")
    return _verdict(report)


def _environ_path(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    return env.get(b"PATH", os.defpath.encode()).decode(errors="replace")


def _test_container(plan: Plan, ctr: list[str], report: Report) -> None:
    assert plan.image is not None  # --check runs a test container only when given an image
    cid = f"pyshim-check-{uuid.uuid4().hex[:8]}"
    ctr = ctr + ["--namespace", plan.namespace]
    result = _run(ctr + ["run", "-d", "--runtime", plan.shim, plan.image, cid])
    try:
        if result.returncode != 0:
            report.bad(f"a test container does not start with the shim: {result.stderr.strip()}")
            return
        deadline = time.monotonic() + 30
        status = ""
        while time.monotonic() < deadline:
            rows = [line.split() for line in _run(ctr + ["task", "ls"]).stdout.splitlines()[1:]]
            status = next((row[2] for row in rows if row and row[0] == cid and len(row) == 3), "")
            if status in ("RUNNING", "STOPPED"):
                break
            time.sleep(0.1)
        if status in ("RUNNING", "STOPPED"):
            report.ok(f"a test container ran with the shim ({plan.image}, task {status})")
        else:
            report.bad(f"the test container's task did not run (status {status or 'none'})")
    finally:
        _run(ctr + ["task", "kill", "--signal", "SIGKILL", cid])
        for _ in range(50):
            removed = _run(ctr + ["task", "rm", cid]).returncode == 0
            if removed or cid not in _run(ctr + ["task", "ls", "-q"]).stdout:
                break
            time.sleep(0.1)
        _run(ctr + ["container", "rm", cid])


def _verdict(report: Report) -> int:
    if report.failed:
        print(f"{report.failed} problem(s) found")
        return 1
    print("pyshim is installed and containerd uses it")
    return 0


# -- command line --------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"containerd's main config (default {DEFAULT_CONFIG})")
    parser.add_argument("--drop-in", help="the 2.x drop-in (default: conf.d/pyshim.toml beside --config)")
    parser.add_argument("--bin-dir", default=DEFAULT_BIN_DIR,
                        help=f"where the shim goes, on containerd's PATH (default {DEFAULT_BIN_DIR})")
    parser.add_argument("--no-bin", action="store_true",
                        help="put no shim anywhere: containerd runs this installation's own (runtime_path)")
    parser.add_argument("--manifest",
                        help="the RuntimeClass manifest (default: pyshim-runtimeclass.yaml beside --config)")
    parser.add_argument("--containerd", default="containerd", help="containerd binary (default: on PATH)")
    parser.add_argument("--ctr", help="ctr binary (default: beside --containerd, else on PATH)")
    parser.add_argument("--address", default=DEFAULT_ADDRESS,
                        help=f"containerd's socket, for --check (default {DEFAULT_ADDRESS})")
    parser.add_argument("--namespace", default="default", help="namespace of --check's test container")
    parser.add_argument("--image", help="--check: run a test container of this image (must be in --namespace)")
    parser.add_argument("--handler", default="pyshim", help="the CRI runtime handler's name (default pyshim)")


def plan_from(args: argparse.Namespace) -> Plan:
    config = os.path.abspath(args.config)
    here = os.path.dirname(config)
    ctr = args.ctr
    if not ctr:
        beside = os.path.join(os.path.dirname(args.containerd), "ctr")
        ctr = beside if "/" in args.containerd and os.path.exists(beside) else "ctr"
    return Plan(config=config,
                drop_in=os.path.abspath(args.drop_in or os.path.join(here, "conf.d", "pyshim.toml")),
                bin_dir=None if args.no_bin else os.path.abspath(args.bin_dir),
                manifest=os.path.abspath(args.manifest or os.path.join(here, "pyshim-runtimeclass.yaml")),
                containerd=args.containerd, ctr=ctr, address=args.address, namespace=args.namespace,
                handler=args.handler, image=args.image)


def run(args: argparse.Namespace) -> int:
    plan = plan_from(args)
    try:
        if args.command == "uninstall":
            return uninstall(plan)
        if args.check:
            return check(plan)
        return install(plan)
    except (InstallError, cc.ConfigError, OSError, ValueError, ImportError) as e:
        print(f"pyshim {args.command}: {e}", file=sys.stderr)
        return 1
