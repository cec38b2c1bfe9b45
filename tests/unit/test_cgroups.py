"""Cgroup discovery and metrics: sample trees for v1 and v2, and one live v1 cgroup."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from shim.linux import cgroups
from shim.linux.cgroups import files
from shim.api import cgroups_v1_pb2 as v1
from shim.api import cgroups_v2_pb2 as v2
from shim.linux.cgroups import (
    MAX_UINT32,
    MAX_UINT64,
    Cgroup,
    hugepage_size_name,
    is_unified,
    parse_mountinfo,
    parse_proc_cgroup,
)

from live_cgroups import live_v1, rmdir_retry, v1_mount_points

DATA = Path(__file__).parent / "data" / "cgroups"
SIZES = ("2MB", "1GB")


def proc(name: str) -> tuple[str, str]:
    return ((DATA / "proc" / f"{name}.cgroup").read_text(),
            (DATA / "proc" / f"{name}.mountinfo").read_text())


def v1_sample(**paths: Path) -> Cgroup:
    controllers = ("pids", "cpu", "cpuacct", "memory", "blkio", "hugetlb")
    dirs = {c: str(DATA / "v1" / c) for c in controllers}
    dirs.update({c: str(p) for c, p in paths.items()})
    return Cgroup(v1_paths=dirs, hugepage_sizes=SIZES, partitions=str(DATA / "partitions"))


def v1_metrics(cg: Cgroup) -> v1.Metrics:
    any_ = cg.metrics()
    assert any_.type_url == "io.containerd.cgroups.v1.Metrics"
    return v1.Metrics.FromString(any_.value)


def v2_metrics(cg: Cgroup) -> v2.Metrics:
    any_ = cg.metrics()
    assert any_.type_url == "io.containerd.cgroups.v2.Metrics"
    return v2.Metrics.FromString(any_.value)


# -- discovery ----------------------------------------------------------------


def test_parse_proc_cgroup_splits_combined_controllers():
    paths = parse_proc_cgroup(proc("combined")[0])
    assert paths["cpu"] == paths["cpuacct"] == "/k8s.io/abc123"
    assert paths["net_cls"] == paths["net_prio"] == "/k8s.io/abc123"
    assert paths["name=systemd"] == "/k8s.io/abc123"
    assert paths["rdma"] == "/"
    assert paths[""] == "/k8s.io/abc123"


def test_hybrid_host_is_v1_with_separate_cpu_and_cpuacct_mounts():
    cg = Cgroup.from_proc(*proc("hybrid"))
    assert cg.version == 1 and cg.v2_path is None
    assert cg.v1_paths == {
        "name=systemd": "/sys/fs/cgroup/systemd/default/redis",
        "pids": "/sys/fs/cgroup/pids/default/redis",
        "blkio": "/sys/fs/cgroup/blkio/default/redis",
        "freezer": "/sys/fs/cgroup/freezer/default/redis",
        "devices": "/sys/fs/cgroup/devices/default/redis",
        "memory": "/sys/fs/cgroup/memory/default/redis",
        "cpuset": "/sys/fs/cgroup/cpuset/default/redis",
        "cpuacct": "/sys/fs/cgroup/cpuacct/default/redis",
        "cpu": "/sys/fs/cgroup/cpu/default/redis",
    }
    assert cg.memory_path == "/sys/fs/cgroup/memory/default/redis"


def test_v1_combined_mounts_and_named_hierarchy():
    cg = Cgroup.from_proc(*proc("combined"))
    assert cg.version == 1
    p = cg.v1_paths
    assert p["cpu"] == p["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct/k8s.io/abc123"
    assert p["net_cls"] == p["net_prio"] == "/sys/fs/cgroup/net_cls,net_prio/k8s.io/abc123"
    assert p["name=systemd"] == "/sys/fs/cgroup/systemd/k8s.io/abc123"
    assert p["rdma"] == "/sys/fs/cgroup/rdma"
    assert "misc" not in p  # listed by the kernel, mounted nowhere: skipped
    assert "" not in p


def test_unified_host_is_v2():
    cg = Cgroup.from_proc(*proc("unified"))
    assert cg.version == 2
    assert cg.v2_path == "/sys/fs/cgroup/system.slice/containerd.service/default/web"
    assert cg.memory_path == cg.v2_path
    assert cg.v1_paths == {}


def test_mount_of_a_subtree_and_escaped_mount_point():
    # Inside a container the memory hierarchy is mounted from /docker/abc; the mount
    # point has a space in it (mountinfo writes it as \040).
    mountinfo = (
        "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
        "35 31 0:32 /docker/abc /sys/fs/cgroup/mem\\040ory rw,relatime shared:5"
        " - cgroup cgroup rw,memory\n"
    )
    cg = Cgroup.from_proc("4:memory:/docker/abc/sub\n", mountinfo)
    assert cg.v1_paths == {"memory": "/sys/fs/cgroup/mem ory/sub"}


def test_last_mount_on_the_cgroup_root_decides():
    tmpfs = "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw"
    cg2 = "32 23 0:29 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw"
    assert is_unified(parse_mountinfo(f"{tmpfs}\n{cg2}\n"))
    assert not is_unified(parse_mountinfo(f"{cg2}\n{tmpfs}\n"))
    assert not is_unified(parse_mountinfo(""))


def test_unified_without_a_0_line_is_an_error():
    with pytest.raises(ValueError):
        Cgroup.from_proc("4:memory:/x\n", proc("unified")[1])


def test_for_pid_of_a_missing_process():
    with pytest.raises(ProcessLookupError):
        Cgroup.for_pid(2**22 + 1)  # above pid_max's ceiling


def test_constructor_needs_exactly_one_layout():
    with pytest.raises(ValueError):
        Cgroup()
    with pytest.raises(ValueError):
        Cgroup(v2_path="/x", v1_paths={})


def test_hugepage_size_names():
    assert hugepage_size_name(64) == "64KB"
    assert hugepage_size_name(2048) == "2MB"
    assert hugepage_size_name(32768) == "32MB"
    assert hugepage_size_name(1048576) == "1GB"


def test_system_hugepage_sizes_smallest_first(tmp_path, monkeypatch):
    for name in ("hugepages-1048576kB", "hugepages-2048kB", "hugepages-64kB", "junk"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(files, "_hugepage_sizes", None)
    assert cgroups.system_hugepage_sizes(str(tmp_path)) == ("64KB", "2MB", "1GB")
    monkeypatch.setattr(files, "_hugepage_sizes", None)  # don't leave the fake cached


# -- v1 metrics -------------------------------------------------------------------


def test_v1_pids_and_cpu():
    m = v1_metrics(v1_sample())
    assert (m.pids.current, m.pids.limit) == (2, 64)
    u = m.cpu.usage
    assert u.total == 243109101
    assert list(u.per_cpu) == [82764572, 160344529]
    # cpuacct.stat is in USER_HZ (100/s) ticks: user 17, system 6
    assert (u.user, u.kernel) == (170_000_000, 60_000_000)
    t = m.cpu.throttling
    assert (t.periods, t.throttled_periods, t.throttled_time) == (7, 4, 146556641)


def test_v1_pids_max_is_zero_like_containerd(tmp_path):
    (tmp_path / "pids.current").write_text("1\n")
    (tmp_path / "pids.max").write_text("max\n")
    m = v1_metrics(Cgroup(v1_paths={"pids": str(tmp_path)}))
    assert m.HasField("pids")
    assert (m.pids.current, m.pids.limit) == (1, 0)


def test_v1_memory_stat_every_key():
    m = v1_metrics(v1_sample()).memory
    raw = dict(line.split() for line in (DATA / "v1/memory/memory.stat").read_text().splitlines())
    raw = {k: int(v) for k, v in raw.items()}
    names = {
        "cache": "cache", "rss": "rss", "rss_huge": "rss_huge", "mapped_file": "mapped_file",
        "dirty": "dirty", "writeback": "writeback", "pgpgin": "pg_pg_in", "pgpgout": "pg_pg_out",
        "pgfault": "pg_fault", "pgmajfault": "pg_maj_fault", "inactive_anon": "inactive_anon",
        "active_anon": "active_anon", "inactive_file": "inactive_file",
        "active_file": "active_file", "unevictable": "unevictable",
    }
    for key, field in names.items():
        assert getattr(m, field) == raw[key], field
        assert getattr(m, "total_" + field) == raw["total_" + key], "total_" + field
        assert raw[key] != raw["total_" + key] or raw[key] == 0
    assert m.hierarchical_memory_limit == 268435456
    assert m.hierarchical_swap_limit == 9223372036854771712


def test_v1_memory_entries_and_oom_control():
    m = v1_metrics(v1_sample())
    mem = m.memory
    assert (mem.usage.usage, mem.usage.max, mem.usage.limit, mem.usage.failcnt) == (
        22528000, 28528640, 268435456, 7)
    assert (mem.swap.usage, mem.swap.max, mem.swap.limit, mem.swap.failcnt) == (
        22814720, 28626944, 536870912, 0)
    assert (mem.kernel.usage, mem.kernel.max, mem.kernel.limit) == (
        106496, 2654208, 9223372036854771712)
    assert mem.HasField("kernel_tcp")
    assert mem.kernel_tcp.limit == 9223372036854771712
    o = m.memory_oom_control
    assert (o.oom_kill_disable, o.under_oom, o.oom_kill) == (0, 0, 3)


def test_v1_memory_without_swap_and_kmem_files(tmp_path):
    # No swap accounting, no kmem limit (gone from newer kernels): zeros, not errors.
    mem = tmp_path / "memory"
    mem.mkdir()
    for name in ("memory.stat", "memory.usage_in_bytes", "memory.limit_in_bytes"):
        shutil.copy(DATA / "v1/memory" / name, mem / name)
    m = v1_metrics(Cgroup(v1_paths={"memory": str(mem)}))
    assert m.memory.usage.usage == 22528000
    assert m.memory.usage.max == 0
    assert m.memory.HasField("swap") and m.memory.swap.usage == 0
    assert not m.HasField("memory_oom_control")
    assert not m.HasField("pids") and not m.HasField("blkio") and len(m.hugetlb) == 0
    # cpu is always there, empty without cpu/cpuacct, as containerd sends it
    assert m.cpu.HasField("usage") and m.cpu.usage.total == 0


def test_v1_blkio_falls_back_to_throttle_files():
    b = v1_metrics(v1_sample()).blkio
    got = [(e.device, e.major, e.minor, e.op, e.value) for e in b.io_service_bytes_recursive]
    assert got[:6] == [
        ("/dev/vda", 254, 0, "Read", 8388608),
        ("/dev/vda", 254, 0, "Write", 16777216),
        ("/dev/vda", 254, 0, "Sync", 25165824),
        ("/dev/vda", 254, 0, "Async", 0),
        ("/dev/vda", 254, 0, "Discard", 0),
        ("/dev/vda", 254, 0, "Total", 25165824),
    ]
    assert got[6] == ("", 8, 0, "Read", 4096)  # not in /proc/partitions: no name
    assert len(got) == 12  # the closing "Total N" line is not an entry
    assert [(e.op, e.value) for e in b.io_serviced_recursive][:2] == [("Read", 8), ("Write", 16)]
    assert len(b.sectors_recursive) == 0 and len(b.io_queued_recursive) == 0


def test_v1_blkio_prefers_cfq_recursive_files():
    b = v1_metrics(v1_sample(blkio=DATA / "v1-cfq/blkio")).blkio
    assert [(e.op, e.value) for e in b.io_service_bytes_recursive] == [
        ("Read", 1048576), ("Write", 2097152), ("Sync", 3145728), ("Async", 0), ("Total", 3145728)]
    assert [(e.major, e.minor, e.op, e.value) for e in b.sectors_recursive] == [(8, 0, "", 6144)]
    assert [e.value for e in b.io_time_recursive] == [1234]
    assert len(b.io_merged_recursive) == 5
    assert b.io_service_bytes_recursive[0].device == ""  # 8:0 is not in the sample partitions


def test_v1_blkio_empty_cfq_files_fall_back(tmp_path):
    blkio = tmp_path / "blkio"
    shutil.copytree(DATA / "v1-cfq/blkio", blkio)
    for f in blkio.glob("blkio.*recursive"):
        f.write_text("Total 0\n")
    for name in ("blkio.throttle.io_serviced", "blkio.throttle.io_service_bytes"):
        shutil.copy(DATA / "v1/blkio" / name, blkio / name)
    b = v1_metrics(v1_sample(blkio=blkio)).blkio
    assert len(b.io_serviced_recursive) == 12 and len(b.io_service_bytes_recursive) == 12
    assert len(b.sectors_recursive) == 0


def test_v1_hugetlb():
    h = v1_metrics(v1_sample()).hugetlb
    assert [(e.pagesize, e.usage, e.max, e.failcnt) for e in h] == [
        ("2MB", 4194304, 6291456, 2), ("1GB", 0, 0, 0)]


def test_v1_rdma(tmp_path):
    (tmp_path / "rdma.current").write_text("mlx4_0 hca_handle=2 hca_object=2000\n")
    (tmp_path / "rdma.max").write_text("mlx4_0 hca_handle=max hca_object=max\n")
    r = v1_metrics(Cgroup(v1_paths={"rdma": str(tmp_path)})).rdma
    assert [(e.device, e.hca_handles, e.hca_objects) for e in r.current] == [("mlx4_0", 2, 2000)]
    assert [(e.hca_handles, e.hca_objects) for e in r.limit] == [(MAX_UINT32, MAX_UINT32)]


def test_v1_gone_cgroup_raises_file_not_found(tmp_path):
    cg = Cgroup(v1_paths={"memory": str(tmp_path / "gone"), "name=systemd": str(tmp_path)})
    assert not cg.exists()
    with pytest.raises(FileNotFoundError):
        cg.metrics()


def test_v1_exists_ignores_shared_non_stat_hierarchies(tmp_path):
    # name=systemd may be the host's "/" and outlive the container: only stat
    # controllers count.
    cg = Cgroup(v1_paths={"name=systemd": str(tmp_path), "pids": str(tmp_path / "gone")})
    assert not cg.exists()
    assert Cgroup(v1_paths={"name=systemd": str(tmp_path)}).exists()


# -- v2 metrics -------------------------------------------------------------------


def v2_sample() -> Cgroup:
    return Cgroup(v2_path=str(DATA / "v2"), hugepage_sizes=SIZES)


def test_v2_pids_and_cpu():
    m = v2_metrics(v2_sample())
    assert (m.pids.current, m.pids.limit) == (3, MAX_UINT64)
    c = m.cpu
    assert (c.usage_usec, c.user_usec, c.system_usec) == (1234567, 1000000, 234567)
    assert (c.nr_periods, c.nr_throttled, c.throttled_usec) == (120, 15, 350000)
    assert (c.nr_bursts, c.burst_usec) == (2, 1000)
    assert (c.psi.some.avg10, c.psi.some.avg60, c.psi.some.avg300, c.psi.some.total) == (
        1.5, 0.75, 0.25, 123456)
    assert (c.psi.full.avg10, c.psi.full.total) == (0.5, 65432)


def test_v2_memory():
    mem = v2_metrics(v2_sample()).memory
    raw = {k: int(v) for k, v in (
        line.split() for line in (DATA / "v2/memory.stat").read_text().splitlines())}
    special = {"usage", "usage_limit", "swap_usage", "swap_limit", "max_usage",
               "swap_max_usage", "psi"}
    copied = 0
    for field in v2.MemoryStat.DESCRIPTOR.fields:
        if field.name in special:
            continue
        assert getattr(mem, field.name) == raw.get(field.name, 0), field.name
        copied += field.name in raw
    assert copied == 33  # all but workingset_refault/activate (split since Linux 5.9)
    assert (mem.usage, mem.usage_limit, mem.max_usage) == (52428800, 104857600, 60000000)
    assert (mem.swap_usage, mem.swap_limit, mem.swap_max_usage) == (4096, MAX_UINT64, 8192)
    assert mem.psi.some.avg60 == 0.12 and mem.psi.full.total == 2121


def test_v2_memory_events_io_hugetlb_rdma():
    m = v2_metrics(v2_sample())
    e = m.memory_events
    assert (e.low, e.high, e.max, e.oom, e.oom_kill, e.oom_group_kill) == (0, 5, 12, 2, 1, 0)
    assert [(i.major, i.minor, i.rbytes, i.wbytes, i.rios, i.wios) for i in m.io.usage] == [
        (8, 16, 1459200, 314773504, 192, 353),
        (8, 0, 90430464, 299008000, 8950, 1252),
    ]
    assert m.io.psi.some.total == 777 and m.io.psi.full.avg300 == 0.03
    assert [(h.pagesize, h.current, h.max, h.failcnt) for h in m.hugetlb] == [
        ("2MB", 4194304, 8388608, 3), ("1GB", 0, MAX_UINT64, 0)]
    assert [(r.device, r.hca_handles, r.hca_objects) for r in m.rdma.current] == [
        ("mlx4_0", 2, 2000), ("ocrdma1", 3, 10)]
    assert [(r.device, r.hca_handles, r.hca_objects) for r in m.rdma.limit] == [
        ("mlx4_0", 10, MAX_UINT32), ("ocrdma1", MAX_UINT32, MAX_UINT32)]


def test_v2_missing_controllers_are_left_out(tmp_path):
    (tmp_path / "cgroup.procs").write_text("")
    (tmp_path / "cpu.stat").write_text("usage_usec 10\nuser_usec 6\nsystem_usec 4\n")
    m = v2_metrics(Cgroup(v2_path=str(tmp_path), hugepage_sizes=SIZES))
    assert m.cpu.usage_usec == 10 and not m.cpu.HasField("psi")
    for name in ("pids", "memory", "memory_events", "io", "rdma"):
        assert not m.HasField(name), name
    assert len(m.hugetlb) == 0


def test_v2_gone_cgroup_raises_file_not_found(tmp_path):
    cg = Cgroup(v2_path=str(tmp_path / "gone"))
    assert not cg.exists()
    with pytest.raises(FileNotFoundError):
        cg.metrics()


# -- live, on this machine's cgroup v1 ------------------------------------------------------










def wait_for_comm(pid: int, comm: str) -> None:
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}/comm").read_text().strip() != comm:
        assert time.monotonic() < deadline, f"{pid} never became {comm}"
        time.sleep(0.01)


@live_v1
def test_live_v1_cgroup_for_a_child():
    mounts = v1_mount_points()
    name = f"pyshim-test-{os.getpid()}"
    dirs = {}
    for controller in ("memory", "pids", "cpu", "cpuacct"):
        if controller in mounts:
            dirs[controller] = os.path.join(mounts[controller], name)
    made = []
    child = None
    try:
        for d in dict.fromkeys(dirs.values()):  # a combined cpu,cpuacct mount is one dir
            os.mkdir(d)
            made.append(d)
        procs = [os.path.join(d, "cgroup.procs") for d in made]
        # The child moves itself before exec, so what sleep touches is charged here; it
        # spins a little first, so that cpuacct has CPU time to report (without it, the
        # usage read 0 in about one run of fifteen).
        child = subprocess.Popen(
            ["sh", "-c", 'for f in "$@"; do echo $$ > "$f"; done; i=0; '
                         'while [ $i -lt 20000 ]; do i=$((i+1)); done; exec sleep 60', "sh", *procs])
        wait_for_comm(child.pid, "sleep")

        cg = Cgroup.for_pid(child.pid)
        assert cg.version == 1
        for controller, d in dirs.items():
            assert cg.v1_paths[controller] == d
        assert cg.memory_path == dirs["memory"]
        assert cg.exists()
        m = v1_metrics(cg)
        assert m.memory.usage.usage > 0
        assert m.memory.HasField("usage") and m.HasField("memory_oom_control")
        if "pids" in dirs:
            assert m.pids.current == 1
        if "cpuacct" in dirs:
            assert m.cpu.usage.total > 0
            assert len(m.cpu.usage.per_cpu) == os.cpu_count()
    finally:
        if child is not None:
            child.send_signal(signal.SIGKILL)
            child.wait()
        for d in made:
            rmdir_retry(d)
    for d in made:
        assert not os.path.exists(d)
    assert not cg.exists()
    with pytest.raises(FileNotFoundError):
        cg.metrics()
