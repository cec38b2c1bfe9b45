#!/usr/bin/env python3
"""The worked experiments of the README, through the tracing proxy (io.containerd.pyshimproxy.v1).

    experiments.py callseq [--a CONTAINERD] [--b CONTAINERD]   (a) `ctr run --rm` calls, 1.6 vs 2.1
    experiments.py shims                                        (b) runc-v2 vs pyshim, same workload
    experiments.py start-fails                                  (c) a pod whose Start fails once (CRI)
    experiments.py dies-after-create                            (d) the shim dies right after Create
    common: --out DIR (traces, reports, timeline SVGs; default ./experiments-out)

Each starts private containerds of its own (as the tests do: scripts/private_containerd.py,
tests/e2e/harness.py), runs the workload with PYSHIM_TRACE set in containerd's environment,
and prints what `pyshim-trace` says about the traces. Run as root, after scripts/setup.sh,
with the venv's python: `.venv/bin/python scripts/experiments.py callseq`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]
from e2e import harness  # noqa: E402
from private_containerd import daemon_version  # noqa: E402

from shim.tools import timeline, tracestats  # noqa: E402
from shim.tools.tracefile import calls, containers, load  # noqa: E402

PROXY = "io.containerd.pyshimproxy.v1"
DEFAULT_B = REPO / ".work" / "containerd-2.1" / "usr" / "bin" / "containerd"
FAILPOINT = "io.containerd.runtime.v2.shim.failpoint."


def traced_containerd(cls, trace: Path, env: dict[str, str] | None = None):
    """A subclass of harness class `cls` whose containerd has PYSHIM_TRACE=`trace` (and `env`)."""
    extra = {"PYSHIM_TRACE": str(trace), **(env or {})}

    class Traced(cls):
        __test__ = False

        def environ(self):
            return {**super().environ(), **extra}

    return Traced


def started(cls, containerd: str = "containerd", prefix: str = "pyshim-exp-"):
    ctr = str(Path(containerd).parent / "ctr") if "/" in containerd else "ctr"
    instance = cls(tempfile.mkdtemp(prefix=prefix), PROXY, containerd=containerd, ctr=ctr, log_level="info")
    try:
        instance.start()
    except BaseException:
        instance.shutdown()
        raise
    return instance


def settle(trace: Path, cid: str, method: str = "Shutdown", timeout: float = 10.0) -> None:
    """Wait until the trace has `method` for `cid` (records are written as calls end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if trace.exists() and any(r["method"] == method for r in calls(load(str(trace)), cid)):
            return
        time.sleep(0.05)


def write(out: Path, name: str, text: str) -> None:
    (out / name).write_text(text)
    print(text, end="" if text.endswith("\n") else "\n")


def _timeline(out: Path, trace: Path, cid: str, title: str) -> None:
    (out / f"{trace.stem}.svg").write_text(timeline.render(load(str(trace)), cid, title))


# -- (a) -------------------------------------------------------------------------------------

def callseq(out: Path, containerd_a: str = "containerd", containerd_b: str = str(DEFAULT_B),
            command: tuple[str, ...] = ("echo", "hi")) -> dict:
    """`ctr run --rm` through the proxy in front of runc-v2, on two containerds."""
    traces = {}
    for label, binary in (("a", containerd_a), ("b", containerd_b)):
        trace = out / f"callseq-{label}.jsonl"
        trace.unlink(missing_ok=True)
        cd = started(traced_containerd(harness.TestContainerd, trace), binary)
        try:
            cid = "ctr-run-rm"
            result = cd.ctr("run", "--rm", "--runtime", PROXY, cd.image, cid, *command)
            if result.rc != 0:
                raise RuntimeError(f"ctr run on {binary}: {result.stderr}")
            settle(trace, cid)
            version = daemon_version(binary) or binary
        finally:
            cd.shutdown()
        traces[label] = (trace, version)
        _timeline(out, trace, cid, f"ctr run --rm {' '.join(command)} through the proxy, containerd {version}")
    a, b = load(str(traces["a"][0])), load(str(traces["b"][0]))
    text, differ = tracestats.diff(a, b, f"containerd {traces['a'][1]}", f"containerd {traces['b'][1]}")
    services = {k: sorted({r["service"] for r in calls(load(str(t)))}) for k, (t, _) in traces.items()}
    text += f"\nservices: a {', '.join(services['a'])}; b {', '.join(services['b'])}\n"
    write(out, "callseq.txt", text)
    return {"differ": differ, "a": [r["method"] for r in calls(a, "ctr-run-rm", "proxy")],
            "b": [r["method"] for r in calls(b, "ctr-run-rm", "proxy")], "services": services, "text": text}


# -- (b) -------------------------------------------------------------------------------------

def shims(out: Path, containerd: str = "containerd", runs: int = 3) -> dict:
    """The same workload (`ctr run --rm … echo hi`, then a detached container with an exec) through
    the proxy, in front of runc-v2 and in front of pyshim, on one containerd."""
    trace = out / "shims.jsonl"
    trace.unlink(missing_ok=True)
    cd = started(traced_containerd(harness.TestContainerd, trace), containerd)
    ids: dict[str, list[str]] = {"runc": [], "pyshim": []}
    try:
        for n in range(runs):
            for target in ("io.containerd.runc.v2", "io.containerd.pyshim.v1"):
                name = "runc" if "runc" in target else "pyshim"
                cid = f"{name}-{n}"
                result = cd.ctr("run", "--rm", "--runtime", PROXY, "--annotation", f"io.pyshimproxy.target={target}",
                                cd.image, cid, "echo", "hi")
                if (result.rc, result.stdout) != (0, "hi\n"):
                    raise RuntimeError(f"{target}: {result}")
                settle(trace, cid)
                ids[name].append(cid)
        for target, name in (("io.containerd.runc.v2", "runc"), ("io.containerd.pyshim.v1", "pyshim")):
            cid = f"{name}-exec"
            assert cd.ctr("run", "-d", "--runtime", PROXY, "--annotation", f"io.pyshimproxy.target={target}",
                          cd.image, cid, "sleep", "100").rc == 0
            cd.wait_task_status(cid, "RUNNING")
            assert cd.ctr("task", "exec", "--exec-id", "e1", cid, "true").rc == 0
            cd.ctr("task", "kill", "-s", "KILL", cid)
            cd.wait_task_status(cid, "STOPPED")
            cd.ctr("task", "rm", cid)
            cd.ctr("container", "rm", cid)
            settle(trace, cid)
            ids[name].append(cid)
        # pyshim's zygote leaves 5 s after its last shim (later on a loaded machine); the
        # leak check at shutdown allows none
        cd.wait_for_no_leaks(settle=30, allow_idle_zygote=False)
    finally:
        cd.shutdown()
    records = load(str(trace))
    pairs = list(zip(ids["runc"], ids["pyshim"]))
    text, differ = tracestats.diff(records, records, "runc-v2 (through the proxy)", "pyshim (through the proxy)",
                                   pairs, "proxy", "proxy")
    write(out, "shims.txt", text)
    _timeline(out, trace, ids["pyshim"][-1], "pyshim through the proxy: run -d, exec, kill, rm")
    targets = {r["id"]: Path(r["detail"]["binary"]).name for r in records
               if r["kind"] == "phase" and r["name"] == "target-start"}
    return {"differ": differ, "pairs": pairs, "text": text, "targets": targets,
            "runc": [r["method"] for r in calls(records, ids["runc"][0], "proxy")],
            "pyshim": [r["method"] for r in calls(records, ids["pyshim"][0], "proxy")]}


# -- (c) -------------------------------------------------------------------------------------

def start_fails(out: Path, containerd: str = "containerd") -> dict:
    """A pod whose container's Start fails once (`Start=1*error(...)`), through CRI and the proxy."""
    from cri import client
    from cri.harness import CriContainerd

    class ProxyCri(CriContainerd):
        """CRI with a `pyshimproxy` handler that lets the failpoint annotations into the OCI spec."""

        def __init__(self, workdir, runtime, **kwargs):
            super().__init__(workdir, "io.containerd.runc.v2", **kwargs)
            self.handler = "pyshimproxy"

        def config(self):
            text = super().config()
            v2 = self.major_version() < 2
            table = ('[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pyshimproxy]' if v2
                     else '[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.pyshimproxy]')
            return text + "\n".join(["", table, f'  runtime_type = "{PROXY}"',
                                     f'  pod_annotations = ["{FAILPOINT}*", "io.pyshimproxy.*"]',
                                     f'  container_annotations = ["{FAILPOINT}*", "io.pyshimproxy.*"]', ""])

    trace = out / "start-fails.jsonl"
    trace.unlink(missing_ok=True)
    cd = started(traced_containerd(ProxyCri, trace), containerd, "pyshim-exp-cri-")
    facts: dict = {}
    try:
        cri = cd.cri
        logs = cd.pod_log_directory("start-fails")
        pod = client.host_network_pod("start-fails", log_directory=logs, cgroup_parent=cd.cgroup_parent)
        sandbox = cri.run_pod_sandbox(pod, cd.handler)
        config = client.container("app", harness.DEFAULT_REF, ["sh", "-c", "echo started; sleep 100"])
        config.annotations[FAILPOINT + "Start"] = "1*error(please retry)"
        attempts = []
        for attempt in range(2):  # what the kubelet does: a new container for each retry
            config.metadata.attempt = attempt
            cid = cri.create_container(sandbox, config, pod)
            try:
                cri.start_container(cid)
                error = None
            except Exception as e:  # grpc.RpcError
                error = e.details() if hasattr(e, "details") else str(e)
            status = cri.container_status(cid)
            attempts.append({"attempt": attempt, "container": cid, "start_error": error,
                             "state": client.api.ContainerState.Name(status.state),
                             "reason": status.reason, "message": status.message, "exit_code": status.exit_code})
            if error is not None:
                cri.remove_container(cid)
        config.annotations.pop(FAILPOINT + "Start")
        config.metadata.name = "app-without-failpoint"
        ok = cri.create_container(sandbox, config, pod)
        cri.start_container(ok)
        running = client.api.ContainerState.Name(cri.wait_container_state(ok, client.api.CONTAINER_RUNNING).state)
        sandbox_state = client.api.PodSandboxState.Name(cri.pod_sandbox_status(sandbox).status.state)
        cri.stop_container(ok, 0)
        cri.remove_container(ok)
        cri.stop_pod_sandbox(sandbox)
        cri.remove_pod_sandbox(sandbox)
        facts = {"attempts": attempts, "without_failpoint": running, "sandbox": sandbox_state}
        time.sleep(1)
    finally:
        cd.shutdown()
    records = load(str(trace))
    text = json.dumps(facts, indent=1) + "\n\n" + tracestats.summary(records, "start-fails.jsonl")
    write(out, "start-fails.txt", text)
    first = facts["attempts"][0]["container"]
    _timeline(out, trace, first, "CRI: Start=1*error(please retry) through the proxy")
    facts["fired"] = [(r.get("id"), r["point"], r["action"]) for r in records if r["kind"] == "failpoint"]
    return facts


# -- (d) -------------------------------------------------------------------------------------

def dies_after_create(out: Path, containerd: str = "containerd",
                      target: str = "io.containerd.runc.v2") -> dict:
    """`ctr run -d` whose shim is SIGKILLed as soon as Create replied (Create.after=1*kill)."""
    trace = out / "dies-after-create.jsonl"
    trace.unlink(missing_ok=True)
    cd = started(traced_containerd(harness.TestContainerd, trace), containerd)
    cid = "dies-after-create"
    try:
        with cd.events() as events:
            result = cd.ctr("run", "-d", "--runtime", PROXY, "--annotation", f"io.pyshimproxy.target={target}",
                            "--annotation", "io.pyshimproxy.failpoint.Create.after=1*kill",
                            cd.image, cid, "sleep", "100")
            try:
                exit_event = events.wait_for("/tasks/exit", container_id=cid, timeout=15)
            except AssertionError:
                exit_event = None
            try:
                delete_event = events.wait_for("/tasks/delete", container_id=cid, timeout=5)
            except AssertionError:
                delete_event = None
        tasks = cd.tasks()
        containers_after = cd.ctr("containers", "ls", "-q").stdout.split()
        facts = {"ctr_rc": result.rc, "ctr_stderr": result.stderr.strip(), "task_after": tasks.get(cid),
                 "container_after": cid in containers_after,
                 "exit_event": exit_event, "delete_event": delete_event}
        cd.ctr("task", "rm", "-f", cid)
        cd.ctr("container", "rm", cid)
        facts["leaks"] = cd.wait_for_no_leaks()
        time.sleep(0.5)
    finally:
        cd.shutdown()
    records = load(str(trace))
    text = json.dumps(facts, indent=1, default=str) + "\n\n" + tracestats.summary(records, "dies-after-create.jsonl")
    write(out, "dies-after-create.txt", text)
    _timeline(out, trace, cid, "the shim dies right after Create (Create.after=1*kill)")
    facts["phases"] = [r["name"] for r in records if r["kind"] == "phase" and r.get("id") == cid]
    facts["calls"] = [(r["method"], r["code_name"]) for r in calls(records, cid, "proxy")]
    return facts


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=("callseq", "shims", "start-fails", "dies-after-create"))
    p.add_argument("--out", default="experiments-out")
    p.add_argument("--a", default="containerd", help="callseq: the first containerd (default: on PATH)")
    p.add_argument("--b", default=str(DEFAULT_B), help="callseq: the second containerd")
    p.add_argument("--containerd", default="containerd", help="the containerd of the other experiments")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.experiment == "callseq":
        callseq(out, args.a, args.b)
    elif args.experiment == "shims":
        shims(out, args.containerd)
    elif args.experiment == "start-fails":
        start_fails(out, args.containerd)
    else:
        dies_after_create(out, args.containerd)
    print(f"(traces, reports and timelines in {out}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
