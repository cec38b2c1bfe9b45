"""A containerd whose shims trace: PYSHIM_TRACE and PYSHIM_TRACE_DIR in its environment.

`ProbingContainerd` is a `TestContainerd` whose environment (so that of `start`, the
daemons and `delete`) names a trace file for every shim (`env_trace`) and a directory
where the `io.pyshim.trace` annotation may write (`trace_dir`). Helpers read traces.
"""
import json
from pathlib import Path

from e2e.harness import TestContainerd


class ProbingContainerd(TestContainerd):
    __test__ = False

    def __init__(self, workdir, *args, **kwargs):
        super().__init__(workdir, *args, **kwargs)
        self.trace_dir = Path(workdir) / "traces"
        self.env_trace = Path(workdir) / "env-trace.jsonl"

    def environ(self):
        env = super().environ()
        env["PYSHIM_TRACE"] = str(self.env_trace)
        env["PYSHIM_TRACE_DIR"] = str(self.trace_dir)
        return env

    def start(self, timeout=30.0):
        self.trace_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return super().start(timeout)

    def shutdown(self):
        # This containerd ends with its module, possibly while the zygote its last shim
        # spawned still warms up (seconds on a loaded machine) before idling out: give it
        # that time, so only what stays longer counts as a leak.
        self.wait_for_no_leaks(settle=30.0, allow_idle_zygote=False)
        super().shutdown()


def read_trace(path, container_id=None):
    """The records of trace `path` (of one container, if given), in file order."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [r for r in records if container_id is None or r.get("id") == container_id]


def is_subsequence(wanted, seen):
    it = iter(seen)
    return all(any(w == s for s in it) for w in wanted)
