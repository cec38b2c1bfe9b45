#!/usr/bin/env python3
"""Benchmark pyshim against containerd's own shim (io.containerd.runc.v2), side by side.

Starts a private containerd (scripts/private_containerd.py), imports the busybox test
image, and measures both runtimes in the same run, interleaved (A B A B …) so that the
machine's drift hits both alike; what counts is the ratio pyshim / runc-v2:

  lifecycle   `ctr run --rm IMAGE ID /bin/true`, median and p90; and the CPU time of one
              lifecycle (see CPU below)
  exec        `ctr task exec` of /bin/true in a running container, median and p90
  memory      RSS and PSS (/proc/PID/smaps_rollup) of all shim processes, per running
              container, with 1 and with each of N (default 20 and 100) containers running
  concurrent  wall time to start N containers at once (`ctr run -d`, all returned), each N
  sweep       at 0 and each of the --sweep counts (default 1,10,25,50,100) of containers
              running: PSS per container, and start (`ctr run -d`) and lifecycle latency of
              one more container, median; the lifecycle latency at the largest count ÷ at
              none is the latency under occupancy. Both runtimes' containers run at once (n
              of each), so that their probes can be interleaved under the same load.
              `--plot PNG` draws it (needs matplotlib: pip install -e '.[bench]',
              then scripts/setup.sh again, which puts the shim's launcher back)
  cri         through CRI (a second private containerd, CRI on, tests/cri's harness):
              RunPodSandbox + CreateContainer + StartContainer latency, median and p90,
              and shim memory per running pod (pause + one container, one shim each)
              with --pods pods running (default half the first N); handlers `pyshim` and `runc`
  floor       the same container by bare `runc run`, no containerd, no shim; its CPU time

    scripts/bench.py [--runs 30] [--containers 20,100] [--sweep 1,10,25,50,100]
                     [--containerd-series 1.6|1.7|2.1 | --containerd-bin PATH] [--pods N]
                     [--json OUT] [--plot PNG] [--only METRIC,...] [--ksm] [--shim-dir DIR]

--shim-dir measures the shim in DIR (e.g. the bin of a venv where the wheel was installed with
pip) instead of this venv's: DIR goes first on containerd's PATH, and the table names it.

--containerd-series picks containerd the way scripts/test.sh does: the one on PATH if it
is of that series (Debian 12: 1.6), else the Debian build scripts/containerd_versions.py
unpacks under .work/ (e.g. .work/containerd-2.1/usr/bin/containerd). The private
containerd's PATH has that build's directory after the venv, so runc-v2 is its own shim.

CPU: utime+stime (/proc/PID/stat) of every process below the subreaper the private
containerd runs under, apart from containerd's own threads: the children that the
subreaper and containerd reaped (cutime+cstime: shim daemons, and the short-lived `start`
and `delete` processes), plus every process still alive (own and reaped-children time:
pyshim's zygote). After each lifecycle the bench waits until everything it started has
been reaped, so a lifecycle's CPU counts to its own runtime. The count includes the runc
processes the shims run and the container's /bin/true (the floor's CPU shows what these
cost without a shim); containerd's own CPU per lifecycle is a row of its own.

--ksm runs ksmd (/sys/kernel/mm/ksm/run = 1, restored afterwards) and opts pyshim into
same-page merging (PYSHIM_KSM=1, see shim/binary/prefork.py); memory is then measured once
the merging has settled (ksmd needs tens of seconds for 20 shims).

Prints one table, with the issue's "must" bound and pass/FAIL beside each row that has one,
and writes JSON (default bench-results.json). Needs root; run it on an otherwise quiet
machine, never as part of the tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
TESTS = SCRIPTS.parent / "tests"  # the CRI measurement reuses the CRI tests' harness
import subreaper  # noqa: E402
from build_image import DEFAULT_REF, build_image  # noqa: E402
from containerd_versions import in_series  # noqa: E402
from private_containerd import (RUNC_V2_ROOT, PrivateContainerd, daemon_version,  # noqa: E402
                                shim_binary_name)

PYSHIM = "io.containerd.pyshim.v1"
RUNC_V2 = "io.containerd.runc.v2"
RUNTIMES = (PYSHIM, RUNC_V2)
NAMESPACE = "pyshim-bench"
SHIM_SOCKETS = Path("/run/containerd/s")  # both shims' sockets, named as containerd names them
CLK_TCK = os.sysconf("SC_CLK_TCK")
WARMUP = 2  # rounds of the interleaved loop that only warm caches

# The "must" bounds of the targets (issue 14): (metric, bound, which value must be at most the
# bound: the ratio pyshim / runc-v2, or pyshim's own value for a row that is a ratio itself).
MUSTS = [
    (r"lifecycle (median|p90) \(ms\)", 1.05, "ratio"),
    (r"exec median \(ms\)", 1.00, "ratio"),
    (r"CRI pod \+ container start median \(ms\)", 1.05, "ratio"),
    (r"PSS per container, (20|100) running \(MiB\)", 1.25, "ratio"),
    (r"PSS per pod, 10 running \(MiB\)", 1.25, "ratio"),
    (r"(20|100) concurrent starts, wall \(ms\)", 1.00, "ratio"),
    (r"lifecycle median, 100 running / none", 1.05, "pyshim"),
]


def must(metric: str, ours: float, ratio: float) -> tuple[float, bool] | None:
    """(bound, met) of the "must" target for `metric`, or None if it has none."""
    for pattern, bound, which in MUSTS:
        if re.fullmatch(pattern, metric):
            return bound, (ratio if which == "ratio" else ours) <= bound
    return None


def counts(text: str) -> list[int]:
    """`20,100` -> [20, 100]."""
    return [int(word) for word in text.split(",") if word.strip()]


def containerd_of_series(series: str) -> str:
    """The containerd binary of `series`, chosen as scripts/test.sh does: the one on PATH if it
    is of that series, else the Debian build that scripts/containerd_versions.py unpacks (and
    caches) under .work/."""
    on_path = shutil.which("containerd")
    if on_path and in_series(daemon_version(on_path) or "", series):
        return on_path
    line = subprocess.run([sys.executable, str(SCRIPTS / "containerd_versions.py"), series],
                          stdout=subprocess.PIPE, text=True, check=True).stdout.split()
    return str(Path(line[2]) / "containerd")  # SERIES VERSION BIN-DIR


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: rc={result.returncode}: {result.stderr.decode()}")
    return elapsed


def shim_pids(runtime: str, address: str) -> list[int]:
    """The shim processes (pyshim's zygote included) of the containerd at `address`."""
    name = shim_binary_name(runtime)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        # pyshim's launcher runs under the interpreter: its name is argv[1] or argv[2].
        if any(os.path.basename(a.decode(errors="replace")) == name for a in argv[:3]) \
                and address.encode() in argv:
            pids.append(int(entry))
    return pids


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) in KiB summed over `pids`."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key == "Rss":
                        rss += int(rest.split()[0])
                    elif key == "Pss":
                        pss += int(rest.split()[0])
        except OSError:
            pass
    return rss, pss


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime+stime, cutime+cstime) of `pid` in clock ticks; (0, 0) if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0, 0
    fields = stat[stat.rindex(b")") + 2:].split()  # fields[0] is the state, field 3 of stat(5)
    utime, stime, cutime, cstime = map(int, fields[11:15])
    return utime + stime, cutime + cstime


KSM = Path("/sys/kernel/mm/ksm")


def ksm_settle(timeout: float = 180.0) -> None:
    """Wait until ksmd has stopped finding new pages to share."""
    deadline, last = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        time.sleep(5.0)
        sharing = int((KSM / "pages_sharing").read_text())
        if sharing > 0 and sharing <= last * 1.01:
            return
        last = sharing


class Bench:
    def __init__(self, containerd: PrivateContainerd, runs: int, ksm: bool = False) -> None:
        self.c = containerd
        self.env = containerd.environ()
        self.runs = runs
        self.ksm = ksm
        self.tag = ", ksmd" if ksm else ""  # in the names of memory rows
        self.results: dict[str, dict[str, float]] = {}
        self.sweep_points: list[dict] = []
        self.seq = 0
        self.issued: list[str] = []  # every container id handed out, for the last clean-up

    def ctr(self, *args: str) -> list[str]:
        return self.c.ctr_argv(*args, namespace=NAMESPACE)

    def new_id(self, tag: str) -> str:
        self.seq += 1
        self.issued.append(f"bench-{tag}-{self.seq}")
        return self.issued[-1]

    def record(self, metric: str, runtime: str, value: float) -> None:
        self.results.setdefault(metric, {})[runtime] = value

    def interleaved(self, metric: str, measure: Callable[[str, int], float],
                    record: bool = True) -> dict[str, list[float]]:
        """The samples of `measure(runtime, round)` (seconds), taken for the runtimes in turn
        (A B, then B A, …) over runs + WARMUP rounds; the first WARMUP rounds warm caches and
        are left out. With `record`, their median and p90 are rows of the table."""
        samples: dict[str, list[float]] = {r: [] for r in RUNTIMES}
        for i in range(self.runs + WARMUP):
            for runtime in (RUNTIMES if i % 2 == 0 else RUNTIMES[::-1]):
                t = measure(runtime, i)
                if i >= WARMUP:
                    samples[runtime].append(t)
        if record:
            for runtime, values in samples.items():
                self.record(f"{metric} median (ms)", runtime, statistics.median(values) * 1e3)
                self.record(f"{metric} p90 (ms)", runtime, pct(values, 0.9) * 1e3)
        return samples

    def settled_memory(self, runtime: str, address: str) -> tuple[int, int]:
        """(RSS, PSS) in KiB of `runtime`'s shims, once start-up garbage (and ksmd) settled."""
        time.sleep(1.0)
        if self.ksm:
            ksm_settle()
        return memory_kib(shim_pids(runtime, address))

    def lifecycle(self) -> None:
        cpu = {r: [0.0, 0.0] for r in RUNTIMES}  # CPU seconds of the counted rounds: shims, containerd

        def measure(runtime: str, i: int) -> float:
            before = self.below_subreaper()
            shims, own = self.cpu_seconds()
            t = timed(self.ctr("run", "--rm", "--runtime", runtime, DEFAULT_REF, self.new_id("life"),
                               "/bin/true"), self.env)
            self.reaped(before)
            if i >= WARMUP:
                shims_after, own_after = self.cpu_seconds()
                cpu[runtime][0] += shims_after - shims
                cpu[runtime][1] += own_after - own
            return t

        self.interleaved("lifecycle", measure)
        for runtime, (shims, own) in cpu.items():
            self.record("CPU per lifecycle, shims and runc (ms)", runtime, shims / self.runs * 1e3)
            self.record("CPU per lifecycle, containerd (ms)", runtime, own / self.runs * 1e3)

    def below_subreaper(self) -> dict[int, str]:
        """pid -> args of every process below the private containerd's subreaper, zombies too."""
        return dict(subreaper.descendants(self.c.process.pid, zombies=True))

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds so far of (everything below the subreaper but containerd's own threads,
        containerd's own threads); see CPU in the module's docstring."""
        _, total = cpu_ticks(self.c.process.pid)  # what the subreaper reaped: shim daemons
        own = 0
        for pid in self.below_subreaper():
            mine, children = cpu_ticks(pid)
            if pid == self.c.containerd_pid:
                own = mine
            else:
                total += mine
            total += children  # containerd's: the `start` and `delete` processes
        return total / CLK_TCK, own / CLK_TCK

    def reaped(self, before: dict[int, str], timeout: float = 5.0) -> None:
        """Wait until every process that was not below the subreaper `before` has been reaped,
        but a new pyshim zygote and its spare (which stay for the next start), so that its time
        is counted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(pid in before or args.endswith((" zygote", " spare"))
                   for pid, args in self.below_subreaper().items()):
                return
            time.sleep(0.01)

    def start_detached(self, runtime: str, cid: str) -> None:
        timed(self.ctr("run", "-d", "--runtime", runtime, DEFAULT_REF, cid, "sleep", "100000"),
              self.env)

    def remove(self, cids: list[str]) -> None:
        for cid in cids:
            subprocess.run(self.ctr("task", "kill", "-s", "SIGKILL", cid), env=self.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for cid in cids:
            for _ in range(100):
                r = subprocess.run(self.ctr("task", "rm", cid), env=self.env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if r.returncode == 0:
                    break
                time.sleep(0.05)
            subprocess.run(self.ctr("container", "rm", cid), env=self.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def remove_everything(self) -> None:
        """Remove every container of the bench's namespace: what an interrupted step left."""
        listed = subprocess.run(self.ctr("containers", "ls", "-q"), env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout.split()
        for cid in listed:
            for argv in (self.ctr("task", "rm", "-f", cid), self.ctr("container", "rm", cid)):
                subprocess.run(argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def clean_after_stop(self) -> list[str]:
        """Once containerd has stopped: what an interrupted step can leave of the bench's
        containers (runc state and cgroups of a shim the subreaper killed, its socket)."""
        left = []
        for cid in self.issued:
            if (RUNC_V2_ROOT / NAMESPACE / cid).exists():
                subprocess.run(["runc", "--root", str(RUNC_V2_ROOT / NAMESPACE), "delete", "--force",
                                cid], capture_output=True)
                left.append(f"runc state of {cid}")
            socket = SHIM_SOCKETS / hashlib.sha256(
                os.path.join(self.c.address, NAMESPACE, cid).encode()).hexdigest()
            if socket.exists():
                socket.unlink()
                left.append(f"shim socket of {cid}")
        return left

    def exec(self) -> None:
        cids = {r: self.new_id("exec") for r in RUNTIMES}
        for runtime, cid in cids.items():
            self.start_detached(runtime, cid)
        try:
            self.interleaved("exec", lambda runtime, i: timed(
                self.ctr("task", "exec", "--exec-id", f"x{i}", cids[runtime], "/bin/true"),
                self.env))
        finally:
            self.remove(list(cids.values()))

    def memory(self, count: int) -> None:
        for runtime in RUNTIMES:
            cids = [self.new_id("mem") for _ in range(count)]
            try:
                for cid in cids:
                    self.start_detached(runtime, cid)
                rss, pss = self.settled_memory(runtime, self.c.address)
            finally:
                self.remove(cids)
            self.record(f"RSS per container, {count} running{self.tag} (MiB)", runtime,
                        rss / 1024 / count)
            self.record(f"PSS per container, {count} running{self.tag} (MiB)", runtime,
                        pss / 1024 / count)

    def concurrent(self, count: int) -> None:
        walls: dict[str, list[float]] = {r: [] for r in RUNTIMES}
        for i in range(3):
            for runtime in (RUNTIMES if i % 2 == 0 else RUNTIMES[::-1]):
                cids = [self.new_id("conc") for _ in range(count)]
                start = time.perf_counter()
                procs = [subprocess.Popen(self.ctr("run", "-d", "--runtime", runtime, DEFAULT_REF,
                                                   cid, "sleep", "100000"), env=self.env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                         for cid in cids]
                failed = [p.stderr.read().decode() for p in procs if p.wait() != 0]
                walls[runtime].append(time.perf_counter() - start)
                self.remove(cids)
                if failed:
                    raise RuntimeError(f"{runtime}: {len(failed)} starts failed: {failed[0]}")
        for runtime, values in walls.items():
            self.record(f"{count} concurrent starts, wall (ms)", runtime,
                        statistics.median(values) * 1e3)

    def sweep(self, levels: list[int]) -> None:
        """PSS per container, and start and lifecycle latency of one more container, with 0 and
        each of `levels` containers of each runtime running (both runtimes' at once, so that the
        probes are interleaved under the same load)."""
        running: dict[str, list[str]] = {r: [] for r in RUNTIMES}

        def start_probe(runtime: str, _: int) -> float:
            cid = self.new_id("probe")
            try:
                return timed(self.ctr("run", "-d", "--runtime", runtime, DEFAULT_REF, cid,
                                      "sleep", "100000"), self.env)
            finally:
                self.remove([cid])

        def lifecycle_probe(runtime: str, _: int) -> float:
            return timed(self.ctr("run", "--rm", "--runtime", runtime, DEFAULT_REF,
                                  self.new_id("probe"), "/bin/true"), self.env)

        try:
            for n in [0, *sorted(set(levels) - {0})]:
                while len(running[RUNC_V2]) < n:
                    for runtime in RUNTIMES:
                        running[runtime].append(self.new_id("bg"))
                        self.start_detached(runtime, running[runtime][-1])
                pss = {r: self.settled_memory(r, self.c.address)[1] / 1024 / n if n else None
                       for r in RUNTIMES}
                start = self.interleaved("", start_probe, record=False)
                life = self.interleaved("", lifecycle_probe, record=False)
                self.sweep_points.append({
                    "running": n, "pss_per_container_mib": pss,
                    "start_median_ms": {r: statistics.median(v) * 1e3 for r, v in start.items()},
                    "lifecycle_median_ms": {r: statistics.median(v) * 1e3 for r, v in life.items()}})
        finally:
            self.remove(running[PYSHIM] + running[RUNC_V2])
        none, most = self.sweep_points[0], self.sweep_points[-1]
        for runtime in RUNTIMES:
            self.record(f"lifecycle median, {most['running']} running / none", runtime,
                        most["lifecycle_median_ms"][runtime] / none["lifecycle_median_ms"][runtime])

    def cri(self, workdir: Path, containerd_bin: str, ctr_bin: str, pods: int) -> None:
        sys.path.insert(0, str(TESTS))
        from cri import client  # needs grpcio: the venv's [test] extra
        from cri.harness import HANDLERS, CriContainerd

        handlers = {runtime: HANDLERS[runtime] for runtime in RUNTIMES}
        c = CriContainerd(workdir / "cri", PYSHIM, containerd=containerd_bin, ctr=ctr_bin,
                          log_level="info")
        c.new_session = True  # a Ctrl-C leaves it running for shutdown() to clean up
        c.start()
        try:
            def run_pod(runtime: str, n: int) -> str:
                name = f"bench-{n}"
                config = client.host_network_pod(name, log_directory=c.pod_log_directory(name),
                                                  cgroup_parent=c.cgroup_parent, uid=name)
                sandbox = c.cri.run_pod_sandbox(config, handlers[runtime])
                cid = c.cri.create_container(
                    sandbox, client.container("sleeper", c.image, ["sleep", "100000"]), config)
                c.cri.start_container(cid)
                return sandbox

            def remove(sandboxes: list[str]) -> None:
                for sandbox in sandboxes:
                    c.cri.stop_pod_sandbox(sandbox)
                    c.cri.remove_pod_sandbox(sandbox)

            def pod_start(runtime: str, _: int) -> float:
                start = time.perf_counter()
                sandbox = run_pod(runtime, self.seq)
                elapsed = time.perf_counter() - start
                self.seq += 1
                remove([sandbox])
                return elapsed

            self.interleaved("CRI pod + container start", pod_start)
            for runtime in RUNTIMES:
                sandboxes = []
                try:
                    for _ in range(pods):
                        sandboxes.append(run_pod(runtime, self.seq))
                        self.seq += 1
                    _, pss = self.settled_memory(runtime, c.address)
                finally:
                    remove(sandboxes)
                self.record(f"PSS per pod, {pods} running{self.tag} (MiB)", runtime,
                            pss / 1024 / pods)
        finally:
            c.shutdown()  # raises if anything was left behind

    def floor(self, workdir: Path, archive: str) -> tuple[float, float]:
        """Median latency (ms) and mean CPU time (ms; runc's and the container's, reaped by us)
        of bare `runc run` of /bin/true: what no shim can go below."""
        bundle = workdir / "floor"
        rootfs = bundle / "rootfs"
        rootfs.mkdir(parents=True)
        with tarfile.open(archive) as outer:
            index = json.load(outer.extractfile("index.json"))
            manifest_digest = index["manifests"][0]["digest"].split(":")[1]
            manifest = json.load(outer.extractfile(f"blobs/sha256/{manifest_digest}"))
            for layer in manifest["layers"]:
                blob = outer.extractfile(f"blobs/sha256/{layer['digest'].split(':')[1]}")
                with tarfile.open(fileobj=blob, mode="r:*") as lt:
                    if hasattr(tarfile, "tar_filter"):  # Python >= 3.11.4
                        lt.extractall(rootfs, filter="tar")
                    else:  # our own image: no hostile paths in it
                        lt.extractall(rootfs)
        subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
        spec = json.loads((bundle / "config.json").read_text())
        spec["process"]["terminal"] = False
        spec["process"]["args"] = ["/bin/true"]
        (bundle / "config.json").write_text(json.dumps(spec))
        root = workdir / "runc-root"
        times = []
        before = os.times()
        for i in range(self.runs):
            times.append(timed(["runc", "--root", str(root), "run", "--bundle", str(bundle),
                                f"floor-{i}"], self.env))
        after = os.times()
        cpu = (after.children_user + after.children_system
               - before.children_user - before.children_system)
        return statistics.median(times) * 1e3, cpu / self.runs * 1e3


def plot(points: list[dict], path: str, title: str) -> None:
    """PSS per container, and start and lifecycle latency, against the containers running."""
    import matplotlib
    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    fig, (memory, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for runtime, label, color in ((PYSHIM, "pyshim", "tab:blue"), (RUNC_V2, "runc-v2", "tab:orange")):
        loaded = [p for p in points if p["running"]]
        memory.plot([p["running"] for p in loaded], [p["pss_per_container_mib"][runtime] for p in loaded],
                    marker="o", color=color, label=label)
        x = [p["running"] for p in points]
        latency.plot(x, [p["start_median_ms"][runtime] for p in points], marker="o", color=color,
                     label=f"{label}: start (ctr run -d)")
        latency.plot(x, [p["lifecycle_median_ms"][runtime] for p in points], marker="s", color=color,
                     linestyle="--", label=f"{label}: lifecycle (ctr run --rm /bin/true)")
    memory.set(title="PSS per running container", xlabel="containers running, of each shim",
               ylabel="MiB", ylim=(0, None))
    latency.set(title="latency of one more container, median", xlabel="containers running, of each shim",
                ylabel="ms", ylim=(0, None))
    memory.set_xticks([p["running"] for p in points if p["running"]])
    latency.set_xticks([p["running"] for p in points])
    for axes in (memory, latency):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # e.g. docs/
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--containers", type=counts, default=[20, 100],
                    help="comma list of running/concurrent container counts (default 20,100)")
    ap.add_argument("--pods", type=int, default=0,
                    help="CRI pods running for PSS per pod (default half the first --containers)")
    ap.add_argument("--sweep", type=counts, default=[1, 10, 25, 50, 100],
                    help="comma list of containers running (of each runtime) for the sweep")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--containerd-series", default="",
                       help="e.g. 1.6 or 2.1: containerd of that series, as scripts/test.sh picks it")
    where.add_argument("--containerd-bin", default="")
    ap.add_argument("--ctr-bin", default="")
    ap.add_argument("--json", default="bench-results.json")
    ap.add_argument("--plot", default="", help="write the sweep's plot to this PNG")
    ap.add_argument("--only", default="",
                    help="comma list: lifecycle,exec,memory,concurrent,sweep,cri,floor")
    ap.add_argument("--ksm", action="store_true",
                    help="run ksmd and opt pyshim into same-page merging (PYSHIM_KSM=1)")
    ap.add_argument("--shim-dir", default=sysconfig.get_path("scripts"),
                    help="directory of the containerd-shim-pyshim-v1 to measure (default: this venv's bin)")
    args = ap.parse_args()
    shim_dir = os.path.abspath(args.shim_dir)
    shim = os.path.join(shim_dir, shim_binary_name(PYSHIM))
    if not os.access(shim, os.X_OK):
        ap.error(f"no executable {shim}")
    os.environ["PYSHIM_SHIM_DIR"] = shim_dir  # the CRI measurement's containerd (tests/e2e/harness.py)
    only = set(filter(None, args.only.split(",")))

    def want(name: str) -> bool:
        return not only or name in only

    if args.plot:
        if not want("sweep"):
            ap.error("--plot draws the sweep: add sweep to --only")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            ap.error("--plot needs matplotlib: .venv/bin/python -m pip install -e '.[bench]', "
                     "then scripts/setup.sh (which puts the shim's launcher back)")
    # A pip console script turns itself into the fast launcher on its first run, as on a
    # user's node; one run first, so that no measured container pays for that.
    subprocess.run([shim, "-v"], capture_output=True, check=False)
    if not Path(shim).read_text().split("\n", 1)[0].endswith(" -IS"):  # the fast launcher's #! line
        ap.error(f"{shim} is still pip's console script, not the shim's launcher: run it once "
                 "by hand to see why it cannot replace itself")
    containerd_bin = args.containerd_bin or (containerd_of_series(args.containerd_series)
                                             if args.containerd_series else "containerd")
    pods = args.pods or max(1, args.containers[0] // 2)
    ctr_bin = args.ctr_bin or shutil.which("ctr", path=str(Path(containerd_bin).parent)) or "ctr"
    ksm_run = None
    if args.ksm:
        ksm_run = (KSM / "run").read_text().strip()  # raises if the kernel has no KSM
        (KSM / "run").write_text("1")
        os.environ["PYSHIM_KSM"] = "1"  # containerd passes it on to the shims
    workdir = Path(tempfile.mkdtemp(prefix="pyshim-bench-", dir="/run"))
    # the venv's shim first, then the build's own containerd-shim-runc-v2 (as tests/e2e does)
    path_prefix = [shim_dir] + ([str(Path(containerd_bin).parent)]
                                                     if "/" in containerd_bin else [])
    containerd = PrivateContainerd(workdir, containerd=containerd_bin, ctr=ctr_bin,
                                   namespace=NAMESPACE, log_level="info", path_prefix=path_prefix,
                                   new_session=True)  # a Ctrl-C leaves it running for the clean-up
    archive = str(workdir / "busybox.oci.tar")
    bench = Bench(containerd, args.runs, ksm=args.ksm)
    floor = floor_cpu = None
    try:
        try:
            build_image(archive)
            containerd.start()
            containerd.import_image(archive, namespace=NAMESPACE)
            version = subprocess.run([containerd_bin, "--version"], capture_output=True,
                                     text=True).stdout.strip()
            if want("lifecycle"):
                bench.lifecycle()
            if want("exec"):
                bench.exec()
            if want("memory"):
                for count in [1, *args.containers]:
                    bench.memory(count)
            if want("concurrent"):
                for count in args.containers:
                    bench.concurrent(count)
            if want("sweep"):
                bench.sweep(args.sweep)
            if want("floor"):
                floor, floor_cpu = bench.floor(workdir, archive)
        finally:
            if containerd.running():
                bench.remove_everything()
            for line in containerd.stop() + bench.clean_after_stop():
                print(f"bench: left: {line}", file=sys.stderr)
            for point in containerd.cleanup(namespaces=[NAMESPACE]):
                print(f"bench: unmounted a leftover {point}", file=sys.stderr)
        if want("cri"):
            bench.cri(workdir, containerd_bin, ctr_bin, pods)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if ksm_run is not None:
            (KSM / "run").write_text(ksm_run)

    rows = []
    print(f"containerd: {version}; {platform.node()} {os.cpu_count()} cpus; runs={args.runs}; "
          f"shim: {shim}")
    print(f"{'metric':44} {'pyshim':>10} {'runc-v2':>10} {'ratio':>7}  must")
    for metric, values in bench.results.items():
        ours, theirs = values[PYSHIM], values[RUNC_V2]
        ratio = ours / theirs if theirs else float("nan")
        target = must(metric, ours, ratio)
        rows.append({"metric": metric, "pyshim": ours, "runc-v2": theirs, "ratio": ratio,
                     "must": target[0] if target else None, "pass": target[1] if target else None})
        verdict = f"<= {target[0]:.2f} {'pass' if target[1] else 'FAIL'}" if target else ""
        digits = 2 if metric.endswith("/ none") else 1  # a ratio itself
        print(f"{metric:44} {ours:10.{digits}f} {theirs:10.{digits}f} {ratio:7.2f}  {verdict}")
    if floor is not None:
        print(f"{'floor: bare runc run /bin/true (ms)':44} {floor:10.1f}")
        print(f"{'floor: CPU per run, runc and /bin/true (ms)':44} {floor_cpu:10.1f}")
    if bench.sweep_points:
        print("\nsweep: n containers of each runtime running; PSS per container (MiB), "
              "start and lifecycle of one more (median, ms)")
        print(f"{'n':>5} {'PSS pyshim':>11} {'runc-v2':>8} {'start pyshim':>13} {'runc-v2':>8} "
              f"{'life pyshim':>12} {'runc-v2':>8}")
        for p in bench.sweep_points:
            pss = p["pss_per_container_mib"]
            print(f"{p['running']:5} " + (f"{pss[PYSHIM]:11.2f} {pss[RUNC_V2]:8.2f} " if p["running"]
                                          else f"{'':11} {'':8} ")
                  + f"{p['start_median_ms'][PYSHIM]:13.1f} {p['start_median_ms'][RUNC_V2]:8.1f} "
                  f"{p['lifecycle_median_ms'][PYSHIM]:12.1f} {p['lifecycle_median_ms'][RUNC_V2]:8.1f}")
        if args.plot:
            plot(bench.sweep_points, args.plot, f"containerd {version.split()[2] if version else ''}, "
                 f"pyshim and runc-v2 ({platform.node()}, runs={args.runs})")
            print(f"plot: {args.plot}")
    with open(args.json, "w") as f:
        json.dump({"containerd": version, "containerd_bin": containerd_bin, "shim": shim, "runs": args.runs,
                   "containers": args.containers, "pods": pods, "ksm": args.ksm,
                   "rows": rows, "floor_ms": floor, "floor_cpu_ms": floor_cpu,
                   "sweep": bench.sweep_points,
                   "cpu_method": "utime+stime from /proc/PID/stat of every process below the "
                                 "private containerd's subreaper but containerd's own threads "
                                 "(reaped children's cutime+cstime included); shims, runc and "
                                 "the container's /bin/true",
                   "time": time.time()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
