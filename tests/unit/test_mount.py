"""Mount options as containerd translates them, the overlay lowerdir compaction, and real
tmpfs/bind/overlay mounts below a temporary directory (root only; CI runs as root)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.linux.mount import (Mount, _compact_lowerdirs, _escape, _unescape, is_mounted, mount,
                              mount_all, parse_options, unmount, unmount_all)

# The kernel's values (<linux/mount.h>), not the module's own constants.
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS, MS_REMOUNT = 1, 2, 4, 8, 16, 32
MS_MANDLOCK, MS_DIRSYNC, MS_NOATIME, MS_NODIRATIME = 64, 128, 1024, 2048
MS_BIND, MS_REC, MS_RELATIME, MS_STRICTATIME = 4096, 16384, 1 << 21, 1 << 24
PAGE = os.sysconf("SC_PAGE_SIZE")

# -- parse_options --------------------------------------------------------------------

SETTING = {
    "ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
    "sync": MS_SYNCHRONOUS, "remount": MS_REMOUNT, "mand": MS_MANDLOCK, "dirsync": MS_DIRSYNC,
    "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "bind": MS_BIND,
    "rbind": MS_BIND | MS_REC, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME,
}
CLEARING = {  # option -> the option whose flag it clears
    "rw": "ro", "suid": "nosuid", "dev": "nodev", "exec": "noexec", "async": "sync",
    "nomand": "mand", "atime": "noatime", "diratime": "nodiratime",
    "norelatime": "relatime", "nostrictatime": "strictatime",
}


@pytest.mark.parametrize("option,flag", SETTING.items())
def test_each_setting_option_is_its_flag_and_no_data(option, flag):
    assert parse_options([option]) == (flag, "")


@pytest.mark.parametrize("option,opposite", CLEARING.items())
def test_each_clearing_option_clears_its_opposites_flag(option, opposite):
    flag = SETTING[opposite]
    assert parse_options([opposite, option]) == (0, "")
    assert parse_options([option]) == (0, "")
    assert parse_options([option, opposite]) == (flag, "")  # the later one wins
    assert parse_options(["bind", opposite, option]) == (MS_BIND, "")  # only its own flag


def test_defaults_is_no_flag():
    assert parse_options(["defaults"]) == (0, "")
    assert parse_options(["ro", "defaults"]) == (MS_RDONLY, "")


def test_ro_and_rw_last_one_wins():
    assert parse_options(["ro", "rw", "ro"]) == (MS_RDONLY, "")
    assert parse_options(["rw", "ro", "rw"]) == (0, "")


def test_bind_and_rbind():
    assert parse_options(["rbind", "ro"]) == (MS_BIND | MS_REC | MS_RDONLY, "")
    assert parse_options(["bind", "nosuid", "nodev"]) == (MS_BIND | MS_NOSUID | MS_NODEV, "")


def test_unknown_options_are_the_filesystems_data_in_order():
    options = ["index=off", "ro", "workdir=/s/2/work", "upperdir=/s/2/fs", "nosuid",
               "lowerdir=/s/1/fs", "xino=off"]
    assert parse_options(options) == (
        MS_RDONLY | MS_NOSUID,
        "index=off,workdir=/s/2/work,upperdir=/s/2/fs,lowerdir=/s/1/fs,xino=off")
    assert parse_options(["size=65536k", "mode=755"]) == (0, "size=65536k,mode=755")
    assert parse_options([]) == (0, "")


@pytest.mark.parametrize("option", ["private", "rprivate", "shared", "rshared", "slave",
                                    "rslave", "unbindable", "runbindable"])
def test_propagation_words_are_not_flags(option):
    # containerd's option table has no propagation entries either (its propagation code
    # is never reached): the word goes to the filesystem like any unknown option.
    assert parse_options(["rbind", option]) == (MS_BIND | MS_REC, option)


# -- _compact_lowerdirs ---------------------------------------------------------------

SNAPSHOTS = "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots"


def overlay_options(lowers: list[str], *extra: str) -> list[str]:
    return ["index=off", *extra, f"workdir={SNAPSHOTS}/99/work", f"upperdir={SNAPSHOTS}/99/fs",
            "lowerdir=" + ":".join(lowers)]


def test_lowerdirs_become_relative_to_their_common_parent():
    options = overlay_options([f"{SNAPSHOTS}/{n}/fs" for n in (12, 11, 10, 9)], "ro")
    data, cwd = _compact_lowerdirs(options, parse_options(options)[1])
    assert cwd == SNAPSHOTS
    # Flags stay flags (not data); the other options keep their order; lowerdir goes last.
    assert data == (f"index=off,workdir={SNAPSHOTS}/99/work,upperdir={SNAPSHOTS}/99/fs,"
                    "lowerdir=12/fs:11/fs:10/fs:9/fs")


def test_a_lowerdir_that_is_the_common_parent_itself():
    options = overlay_options([f"{SNAPSHOTS}/1/fs", f"{SNAPSHOTS}/1/fs/sub"])
    data, cwd = _compact_lowerdirs(options, parse_options(options)[1])
    assert cwd == f"{SNAPSHOTS}/1/fs"
    assert data.endswith(",lowerdir=.:sub")


def test_compaction_makes_a_hundred_layers_fit_in_a_page():
    options = overlay_options([f"{SNAPSHOTS}/{n}/fs" for n in range(1000, 1100)])
    data = parse_options(options)[1]
    assert len(data) > PAGE
    compact, cwd = _compact_lowerdirs(options, data)
    assert cwd == SNAPSHOTS and len(compact) < PAGE - 512


@pytest.mark.parametrize("options", [
    ["index=off", "upperdir=/a/fs", "workdir=/a/work"],       # no lowerdir at all
    ["lowerdir=/a/1/fs:/b/2/fs", "upperdir=/u", "workdir=/w"],  # common parent is /
])
def test_nothing_to_compact_leaves_the_data_alone(options):
    data = parse_options(options)[1]
    assert _compact_lowerdirs(options, data) == (data, "")


def test_loop_mounts_are_refused_before_anything_is_mounted(tmp_path):
    target = tmp_path / "rootfs"
    target.mkdir()
    with pytest.raises(OSError) as err:
        mount(Mount("ext4", str(tmp_path / "disk.img"), ["loop", "ro"]), str(target))
    assert err.value.errno == errno.EOPNOTSUPP
    assert "loop mounts are not supported" in str(err.value)
    assert not is_mounted(str(target))


@pytest.mark.parametrize("path", ["/plain", "/a b", "/tab\there", "/new\nline", "/back\\slash",
                                  "/literal\\040", "/both\\ \\134"])
def test_mountinfo_escapes_round_trip(path):
    escaped = _escape(path)
    assert not any(ch in escaped for ch in " \t\n")
    assert _unescape(escaped) == path


# -- real mounts ----------------------------------------------------------------------

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root (CI runs as root)")


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    prefix = os.path.realpath(path)
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split(" ")[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def mount_options(path: Path) -> tuple[set[str], set[str]]:
    """(per-mount options, superblock options) of the top mount on `path`."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == os.path.realpath(path):
                sep = fields.index("-")
                found = set(fields[5].split(",")), set(fields[sep + 3].split(","))
    assert found is not None, f"nothing mounted on {path}"
    return found


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    """A temporary directory whose mounts are all gone after the test, also when it failed."""
    try:
        yield tmp_path
    finally:
        left = mounts_below(tmp_path)
        for point in left:
            unmount(point, lazy=True)
        assert not left, f"left mounted: {left}"


def tmpfs(*options: str, target: str = "") -> Mount:
    return Mount("tmpfs", "tmpfs", ["size=1m", *options], target)


@root_only
def test_tmpfs_with_flags_and_data(tmp):
    rootfs = tmp / "rootfs"
    rootfs.mkdir()
    mount(tmpfs("nosuid", "nodev", "noexec", "mode=0710"), str(rootfs))
    try:
        assert is_mounted(str(rootfs))
        per_mount, superblock = mount_options(rootfs)
        assert {"rw", "nosuid", "nodev", "noexec"} <= per_mount
        assert {"size=1024k", "mode=710"} <= superblock
    finally:
        assert unmount(str(rootfs))
    assert not is_mounted(str(rootfs))


@root_only
def test_a_target_is_a_path_inside_the_rootfs(tmp):
    rootfs = tmp / "rootfs"
    (rootfs / "data").mkdir(parents=True)
    mount(tmpfs(target="/data"), str(rootfs))
    try:
        assert is_mounted(str(rootfs / "data")) and not is_mounted(str(rootfs))
    finally:
        unmount(str(rootfs / "data"))


@root_only
def test_a_read_only_bind_is_read_only(tmp):
    # MS_RDONLY is ignored on a new bind mount; only the remount makes it read-only.
    src, rootfs = tmp / "src", tmp / "rootfs"
    src.mkdir()
    rootfs.mkdir()
    (src / "file").write_text("from the source")
    mount(Mount("none", str(src), ["bind", "ro"]), str(rootfs))
    try:
        assert (rootfs / "file").read_text() == "from the source"
        assert "ro" in mount_options(rootfs)[0]
        with pytest.raises(OSError) as err:
            (rootfs / "new").write_text("x")
        assert err.value.errno == errno.EROFS
        (src / "new").write_text("the source stays writable")
    finally:
        unmount(str(rootfs))


@root_only
def test_rbind_takes_submounts_along_and_bind_does_not(tmp):
    src, sub = tmp / "src", tmp / "src" / "sub"
    sub.mkdir(parents=True)
    mount(tmpfs(), str(sub))
    (sub / "in-submount").write_text("x")
    try:
        for option, seen in (("rbind", True), ("bind", False)):
            target = tmp / option
            target.mkdir()
            mount(Mount("none", str(src), [option]), str(target))
            try:
                assert (target / "sub" / "in-submount").exists() is seen
            finally:
                unmount(str(target), lazy=True)  # with the rbind's submount
            assert not mounts_below(target)
    finally:
        unmount(str(sub))


def make_layers(base: Path, count: int) -> list[str]:
    """`count` lower layers below `base`, topmost first, each with a file of its own and
    one file ("shadowed") that the topmost layer's copy hides."""
    dirs = []
    for n in range(count):
        d = base / f"{n:03d}" / "fs"
        d.mkdir(parents=True)
        (d / f"layer{n}").write_text("")
        (d / "shadowed").write_text(str(n))
        dirs.append(str(d))
    return dirs


@root_only
def test_an_overlay_too_long_for_a_page_is_mounted_from_the_common_parent(tmp):
    # Everything on a tmpfs of its own: overlay needs an upper filesystem that supports it.
    fs = tmp / "fs"
    fs.mkdir()
    mount(tmpfs("mode=0755"), str(fs))
    try:
        # Long absolute paths, short ones relative to their parent (as snapshots/N/fs).
        lowers = make_layers(fs / ("snapshots-" + "x" * 70), 60)
        for d in ("upper", "work", "rootfs"):
            (fs / d).mkdir()
        m = Mount("overlay", "overlay", [f"workdir={fs}/work", f"upperdir={fs}/upper",
                                         "lowerdir=" + ":".join(lowers)])
        assert len(parse_options(m.options)[1]) > PAGE
        cwd = os.getcwd()
        mount(m, str(fs / "rootfs"))
        try:
            assert os.getcwd() == cwd  # the mount's chdir is undone
            names = set(os.listdir(fs / "rootfs"))
            assert names == {"shadowed"} | {f"layer{n}" for n in range(60)}
            assert (fs / "rootfs" / "shadowed").read_text() == "0"  # the layer order kept
        finally:
            unmount(str(fs / "rootfs"))
    finally:
        unmount(str(fs), lazy=True)


@root_only
def test_overlay_options_that_cannot_fit_in_a_page_are_refused(tmp):
    # No common parent to compact from. The kernel would cut the data at a page: the cut
    # path of the last lowerdir names a directory that exists, the wrong layer.
    fs, other = tmp / "fs", Path("/dev/shm") / f"pyshim-test-{os.getpid()}"
    fs.mkdir()
    mount(tmpfs("mode=0755"), str(fs))
    try:
        other.mkdir()
        first = other / "first"
        first.mkdir()
        for d in ("upper", "work", "rootfs"):
            (fs / d).mkdir()
        data = f"workdir={fs}/work,upperdir={fs}/upper,lowerdir={first}"
        lowers = [str(first)]

        def room() -> int:  # what the kernel keeps of a last lowerdir, after its ":"
            return PAGE - 1 - len(data) - 1

        while room() > 2 * len(str(fs)) + 40:
            lowers.append(str(fs / f"l{len(lowers):03d}"))
            os.mkdir(lowers[-1])
            data += ":" + lowers[-1]
        last = str(fs) + "/" + "z" * (room() - len(str(fs)) - 1 + 8)  # 8 bytes too long
        os.mkdir(last[:room()])  # the wrong layer the kernel would mount
        os.mkdir(last)
        lowers.append(last)
        options = [f"workdir={fs}/work", f"upperdir={fs}/upper", "lowerdir=" + ":".join(lowers)]
        assert len(parse_options(options)[1]) == PAGE - 1 + 8
        with pytest.raises(OSError) as err:
            mount(Mount("overlay", "overlay", options), str(fs / "rootfs"))
        assert err.value.errno == errno.E2BIG
        assert "options are too long" in str(err.value)
        assert not is_mounted(str(fs / "rootfs"))
    finally:
        unmount(str(fs), lazy=True)
        if other.exists():
            for d in sorted(other.rglob("*"), reverse=True):
                d.rmdir()
            other.rmdir()


@root_only
def test_mount_all_undoes_what_it_mounted_when_one_fails(tmp):
    rootfs = tmp / "rootfs"
    rootfs.mkdir()
    ok = tmpfs()
    # The second mount goes on the first one, into a directory that does not exist there.
    with pytest.raises(OSError) as err:
        mount_all([ok, tmpfs(), tmpfs(target="/missing")], str(rootfs))
    assert err.value.errno == errno.ENOENT
    assert not mounts_below(rootfs)


@root_only
def test_mount_all_undoes_mounts_at_sub_paths_too(tmp):
    # containerd 2.x: a mount's target is a path inside the rootfs; what was mounted
    # there must go as well, even when nothing was mounted on the rootfs itself.
    rootfs = tmp / "rootfs"
    (rootfs / "a").mkdir(parents=True)
    (rootfs / "b").mkdir()
    with pytest.raises(OSError):
        mount_all([tmpfs(target="/a"), tmpfs(target="b"), tmpfs("size=bogus")], str(rootfs))
    assert not mounts_below(rootfs)


@root_only
def test_mount_all_mounts_in_order(tmp):
    rootfs = tmp / "rootfs"
    rootfs.mkdir()
    mount_all([tmpfs("mode=0755"), tmpfs("mode=0700")], str(rootfs))
    try:
        assert "mode=700" in mount_options(rootfs)[1]  # the last one is on top
        assert len(mounts_below(rootfs)) == 2
    finally:
        unmount_all(str(rootfs))
    assert not mounts_below(rootfs)


@root_only
def test_unmount_all_takes_mounts_below_too_and_nothing_beside(tmp):
    rootfs, beside = tmp / "rootfs", tmp / "rootfs2"  # a name that starts the same
    rootfs.mkdir()
    beside.mkdir()
    mount(tmpfs(), str(beside))
    try:
        mount(tmpfs(), str(rootfs))
        (rootfs / "proc").mkdir()
        (rootfs / "a b").mkdir()
        mount_all([tmpfs(target="/proc"), tmpfs(target="/a b"), tmpfs(target="/a b")],
                  str(rootfs))
        (rootfs / "proc" / "sys").mkdir()
        mount(tmpfs(target="/proc/sys"), str(rootfs))
        assert len(mounts_below(rootfs)) == 5
        unmount_all(str(rootfs))
        assert mounts_below(rootfs) == []
        assert is_mounted(str(beside))
    finally:
        unmount(str(beside))


@root_only
def test_unmount_all_removes_every_stacked_mount(tmp):
    rootfs = tmp / "root fs"  # a space: mountinfo escapes it
    rootfs.mkdir()
    for _ in range(3):
        mount(tmpfs(), str(rootfs))
    assert is_mounted(str(rootfs))
    unmount_all(str(rootfs))
    assert not is_mounted(str(rootfs))
    assert unmount(str(rootfs)) is False          # nothing mounted: no error
    assert unmount(str(tmp / "missing")) is False  # no such path: no error
