#!/usr/bin/env python3
"""Benchmark pyshim against containerd's own shim (io.containerd.runc.v2), side by side.

Starts a private containerd (scripts/private_containerd.py), imports the busybox test
image, and measures both runtimes in the same run, interleaved (A B A B …) so that the
machine's drift hits both alike; what counts is the ratio pyshim / runc-v2:

  lifecycle   `ctr run --rm IMAGE ID /bin/true`, median and p90
  exec        `ctr task exec` of /bin/true in a running container, median and p90
  memory      RSS and PSS (/proc/PID/smaps_rollup) of all shim processes, per running
              container, with 1 and with N (default 20) containers running
  concurrent  wall time to start N containers at once (`ctr run -d`, all returned)
  cri         through CRI (a second private containerd, CRI on, tests/cri's harness):
              RunPodSandbox + CreateContainer + StartContainer latency, median and p90,
              and shim memory per running pod (pause + one container, one shim each)
              with N/2 pods running; handlers `pyshim` and `runc`
  floor       the same container by bare `runc run`, no containerd, no shim

    scripts/bench.py [--runs 30] [--containers 20] [--containerd-bin PATH] [--json OUT]
                     [--only METRIC,...] [--ksm] [--shim-dir DIR]

--shim-dir measures the shim in DIR (e.g. the bin of a venv where the wheel was installed with
pip) instead of this venv's: DIR goes first on containerd's PATH, and the table names it.

--ksm runs ksmd (/sys/kernel/mm/ksm/run = 1, restored afterwards) and opts pyshim into
same-page merging (PYSHIM_KSM=1, see shim/binary/prefork.py); memory is then measured once
the merging has settled (ksmd needs tens of seconds for 20 shims).

Prints one table and writes JSON (default bench-results.json). Needs root; run it on
an otherwise quiet machine, never as part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from build_image import DEFAULT_REF, build_image  # noqa: E402
from private_containerd import PrivateContainerd, shim_binary_name  # noqa: E402

PYSHIM = "io.containerd.pyshim.v1"
RUNC_V2 = "io.containerd.runc.v2"
RUNTIMES = (PYSHIM, RUNC_V2)
NAMESPACE = "pyshim-bench"


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
    def __init__(self, containerd: PrivateContainerd, runs: int, containers: int,
                 ksm: bool = False) -> None:
        self.c = containerd
        self.env = containerd.environ()
        self.runs = runs
        self.containers = containers
        self.ksm = ksm
        self.tag = ", ksmd" if ksm else ""  # in the names of memory rows
        self.results: dict[str, dict[str, float]] = {}
        self.seq = 0

    def ctr(self, *args: str) -> list[str]:
        return self.c.ctr_argv(*args, namespace=NAMESPACE)

    def new_id(self, tag: str) -> str:
        self.seq += 1
        return f"bench-{tag}-{self.seq}"

    def record(self, metric: str, runtime: str, value: float) -> None:
        self.results.setdefault(metric, {})[runtime] = value

    def interleaved(self, metric: str, measure: Callable[[str, int], float]) -> None:
        """Record the median and p90 of `measure(runtime, round)` (seconds), taken for the
        runtimes in turn (A B, then B A, …) over runs + 2 rounds; the first two warm caches."""
        samples: dict[str, list[float]] = {r: [] for r in RUNTIMES}
        for i in range(self.runs + 2):
            for runtime in (RUNTIMES if i % 2 == 0 else RUNTIMES[::-1]):
                t = measure(runtime, i)
                if i >= 2:
                    samples[runtime].append(t)
        for runtime, values in samples.items():
            self.record(f"{metric} median (ms)", runtime, statistics.median(values) * 1e3)
            self.record(f"{metric} p90 (ms)", runtime, pct(values, 0.9) * 1e3)

    def settled_memory(self, runtime: str, address: str) -> tuple[int, int]:
        """(RSS, PSS) in KiB of `runtime`'s shims, once start-up garbage (and ksmd) settled."""
        time.sleep(1.0)
        if self.ksm:
            ksm_settle()
        return memory_kib(shim_pids(runtime, address))

    def lifecycle(self) -> None:
        self.interleaved("lifecycle", lambda runtime, _: timed(
            self.ctr("run", "--rm", "--runtime", runtime, DEFAULT_REF, self.new_id("life"),
                     "/bin/true"), self.env))

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

    def concurrent(self) -> None:
        walls: dict[str, list[float]] = {r: [] for r in RUNTIMES}
        for i in range(3):
            for runtime in (RUNTIMES if i % 2 == 0 else RUNTIMES[::-1]):
                cids = [self.new_id("conc") for _ in range(self.containers)]
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
            self.record(f"{self.containers} concurrent starts, wall (ms)", runtime,
                        statistics.median(values) * 1e3)

    def cri(self, workdir: Path, containerd_bin: str, ctr_bin: str) -> None:
        sys.path.insert(0, str(TESTS))
        from cri import client  # needs grpcio: the venv's [test] extra
        from cri.harness import HANDLERS, CriContainerd

        handlers = {runtime: HANDLERS[runtime] for runtime in RUNTIMES}
        c = CriContainerd(workdir / "cri", PYSHIM, containerd=containerd_bin, ctr=ctr_bin,
                          log_level="info")
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
            pods = max(1, self.containers // 2)
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

    def floor(self, workdir: Path, archive: str) -> float:
        """Median of bare `runc run` of /bin/true: what no shim can go below."""
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
        for i in range(self.runs):
            times.append(timed(["runc", "--root", str(root), "run", "--bundle", str(bundle),
                                f"floor-{i}"], self.env))
        return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--containers", type=int, default=20)
    ap.add_argument("--containerd-bin", default="containerd")
    ap.add_argument("--ctr-bin", default="")
    ap.add_argument("--json", default="bench-results.json")
    ap.add_argument("--only", default="",
                    help="comma list: lifecycle,exec,memory,concurrent,cri,floor")
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

    ctr_bin = args.ctr_bin or shutil.which("ctr", path=str(Path(args.containerd_bin).parent)) \
        or "ctr"
    ksm_run = None
    if args.ksm:
        ksm_run = (KSM / "run").read_text().strip()  # raises if the kernel has no KSM
        (KSM / "run").write_text("1")
        os.environ["PYSHIM_KSM"] = "1"  # containerd passes it on to the shims
    workdir = Path(tempfile.mkdtemp(prefix="pyshim-bench-", dir="/run"))
    containerd = PrivateContainerd(workdir, containerd=args.containerd_bin, ctr=ctr_bin,
                                   namespace=NAMESPACE, log_level="info",
                                   path_prefix=[shim_dir])
    archive = str(workdir / "busybox.oci.tar")
    build_image(archive)
    bench = Bench(containerd, args.runs, args.containers, ksm=args.ksm)
    floor = None
    try:
        containerd.start()
        containerd.import_image(archive, namespace=NAMESPACE)
        version = subprocess.run([args.containerd_bin, "--version"], capture_output=True,
                                 text=True).stdout.strip()
        if want("lifecycle"):
            bench.lifecycle()
        if want("exec"):
            bench.exec()
        if want("memory"):
            bench.memory(1)
            bench.memory(args.containers)
        if want("concurrent"):
            bench.concurrent()
        if want("floor"):
            floor = bench.floor(workdir, archive)
    finally:
        containerd.stop()
        containerd.cleanup(namespaces=[NAMESPACE])
    try:
        if want("cri"):
            bench.cri(workdir, args.containerd_bin, ctr_bin)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if ksm_run is not None:
            (KSM / "run").write_text(ksm_run)

    rows = []
    print(f"containerd: {version}; {platform.node()} {os.cpu_count()} cpus; runs={args.runs}; "
          f"shim: {shim}")
    print(f"{'metric':44} {'pyshim':>10} {'runc-v2':>10} {'ratio':>7}")
    for metric, values in bench.results.items():
        ours, theirs = values[PYSHIM], values[RUNC_V2]
        ratio = ours / theirs if theirs else float("nan")
        rows.append({"metric": metric, "pyshim": ours, "runc-v2": theirs, "ratio": ratio})
        print(f"{metric:44} {ours:10.1f} {theirs:10.1f} {ratio:7.2f}")
    if floor is not None:
        print(f"{'floor: bare runc run /bin/true (ms)':44} {floor:10.1f}")
    with open(args.json, "w") as f:
        json.dump({"containerd": version, "runs": args.runs, "containers": args.containers,
                   "ksm": args.ksm, "shim": shim,
                   "rows": rows, "floor_ms": floor, "time": time.time()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
