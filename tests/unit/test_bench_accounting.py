"""scripts/bench.py's accounting without containerd: CPU times from /proc, zombies below a
process, and the "must" verdicts of the table."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench  # noqa: E402
import subreaper  # noqa: E402


def burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_ticks_counts_own_time_then_reaped_childrens():
    burn(0.2)
    own, children = bench.cpu_ticks(os.getpid())
    times = os.times()
    assert abs(own - (times.user + times.system) * bench.CLK_TCK) <= 2
    pid = os.fork()
    if pid == 0:
        burn(0.3)
        os._exit(0)
    os.waitpid(pid, 0)
    _, children_after = bench.cpu_ticks(os.getpid())
    assert children_after - children >= 0.25 * bench.CLK_TCK


def test_cpu_ticks_of_a_gone_process_is_zero():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    assert bench.cpu_ticks(pid) == (0, 0)


def test_descendants_shows_an_unreaped_child_only_when_asked():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.01)
        assert pid in dict(subreaper.descendants(os.getpid(), zombies=True))
        assert pid not in dict(subreaper.descendants(os.getpid()))
    finally:
        os.waitpid(pid, 0)


def test_must_checks_the_ratio_or_pyshims_own_value():
    assert bench.must("lifecycle median (ms)", 95.0, 1.04) == (1.05, True)
    assert bench.must("lifecycle p90 (ms)", 95.0, 1.06) == (1.05, False)
    assert bench.must("PSS per container, 100 running (MiB)", 4.0, 1.30) == (1.25, False)
    assert bench.must("100 concurrent starts, wall (ms)", 900.0, 0.99) == (1.00, True)
    # the occupancy row is a ratio itself: pyshim's slowdown is what must stay under the bound
    assert bench.must("lifecycle median, 100 running / none", 1.04, 0.90) == (1.05, True)
    assert bench.must("lifecycle median, 100 running / none", 1.07, 1.00) == (1.05, False)
    # no target: per-container memory with one running, with ksmd, or at other counts
    assert bench.must("PSS per container, 1 running (MiB)", 20.0, 1.8) is None
    assert bench.must("PSS per container, 20 running, ksmd (MiB)", 2.5, 0.8) is None
    assert bench.must("exec p90 (ms)", 40.0, 1.2) is None


def test_counts_reads_a_comma_list():
    assert bench.counts("20,100") == [20, 100]
    assert bench.counts("20") == [20]
