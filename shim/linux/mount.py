"""Mounting the rootfs that containerd hands over in Create, and unmounting it again.

Options are translated the way containerd's mount package does: known words become
mount(2) flags, everything else is passed on as the filesystem's data string.
"""

from __future__ import annotations

import errno
import os

from shim.linux.libc import check, libc

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2

# option -> (clear?, flag). "clear" options remove the flag (e.g. "rw" clears MS_RDONLY).
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS), "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND), "defaults": (False, 0), "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME), "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC), "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME), "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME), "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK), "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME), "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC), "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT), "ro": (False, MS_RDONLY), "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME), "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}

class Mount:
    """One mount of a Create request. `target` is a sub-path inside the rootfs
    (containerd 2.x); "" is the rootfs itself."""

    __slots__ = ("type", "source", "options", "target")

    def __init__(self, type: str, source: str, options: list[str], target: str = "") -> None:
        self.type, self.source, self.options, self.target = type, source, options, target


def parse_options(options: list[str]) -> tuple[int, str]:
    flags, data = 0, []
    for opt in options:
        known = _FLAGS.get(opt)
        if known is None:
            data.append(opt)
        elif known[0]:
            flags &= ~known[1]
        else:
            flags |= known[1]
    return flags, ",".join(data)


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    check(libc().mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                       flags, data.encode() if data else None),
          f"mount {source} on {target} ({fstype})")


MAX_SYMLINKS = 40  # as the kernel's path walk (ELOOP beyond)


def resolve_in_root(root: str, target: str) -> str:
    """`root`/`target` with every symlink on the way resolved as if `root` were `/` (and
    `..` stopping at it), so the result never leaves `root`: the way containerd joins a
    mount target to the rootfs. Components that do not exist yet are kept as they are."""
    parts = [p for p in target.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        path = os.path.join(root, *done, part)
        try:
            link = os.readlink(path)
        except OSError:  # not a symlink, or not there (yet)
            done.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise OSError(errno.ELOOP, f"mount target {target}: too many symlinks")
        if link.startswith("/"):
            done = []
        parts = [p for p in link.split("/") if p not in ("", ".")] + parts
    return os.path.join(root, *done)


def _target(m: Mount, root: str) -> str:
    return resolve_in_root(root, m.target) if m.target else root


def mount(m: Mount, root: str) -> None:
    target = _target(m, root)
    if "loop" in m.options:
        raise OSError(95, f"mount {m.source}: loop mounts are not supported")
    flags, data = parse_options(m.options)
    # Long overlay option strings can exceed a page: run the mount from the lowerdirs'
    # common parent with relative paths, as containerd does.
    cwd = None
    page = os.sysconf("SC_PAGE_SIZE")
    if m.type == "overlay" and len(data) >= page - 512:
        data, cwd = _compact_lowerdirs(m.options, data)
    if len(data.encode()) >= page:
        # The kernel keeps one page, NUL included, and silently cuts the rest: a cut
        # lowerdir list can name a wrong but existing directory and mount the wrong layers.
        raise OSError(errno.E2BIG, f"mount {m.source} on {target}: options are too long "
                                   f"({len(data.encode())} bytes, at most {page - 1})")
    if cwd:
        old = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.chdir(cwd)
            _mount(m.source, target, m.type, flags, data)
        finally:
            os.fchdir(old)
            os.close(old)
    else:
        _mount(m.source, target, m.type, flags, data)
    if flags & MS_BIND and flags & MS_RDONLY:
        # A bind mount ignores MS_RDONLY until it is remounted.
        _mount("", target, "", flags | MS_REMOUNT, "")


def _compact_lowerdirs(options: list[str], data: str) -> tuple[str, str]:
    """(`data` with the lowerdirs relative to their common parent, that parent); `data`
    and "" when they have none."""
    lower = next((o for o in options if o.startswith("lowerdir=")), "")
    dirs = lower[len("lowerdir="):].split(":") if lower else []
    common = os.path.commonpath(dirs) if dirs else ""
    if not common or common == "/":
        return data, ""
    rel = ":".join(os.path.relpath(d, common) for d in dirs)
    rest = [o for o in options if o not in _FLAGS and not o.startswith("lowerdir=")]
    return ",".join(rest + [f"lowerdir={rel}"]), common


def mount_all(mounts: list[Mount], root: str) -> None:
    """Mount in order; on failure undo what was mounted (in reverse: a target may be
    inside an earlier mount) and re-raise."""
    done: list[str] = []
    try:
        for m in mounts:
            mount(m, root)
            done.append(_target(m, root))
    except OSError:
        for target in reversed(done):
            unmount(target, lazy=True)
        raise


def is_mounted(path: str) -> bool:
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            data = f.read()
    except OSError:
        return False
    needle = _escape(path).encode()
    return any(line.split(b" ", 5)[4] == needle for line in data.splitlines() if line)


def _escape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash in octal.
    for ch in ("\\", " ", "\t", "\n"):
        path = path.replace(ch, "\\%03o" % ord(ch))
    return path


def _unescape(path: str) -> str:
    for ch in (" ", "\t", "\n", "\\"):  # the backslash last, or its digits would be read again
        path = path.replace("\\%03o" % ord(ch), ch)
    return path


def _mounted_below(path: str) -> list[str]:
    """The mount points at or below `path`, deepest first."""
    prefix = _escape(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as f:
        data = f.read()
    points = {os.fsdecode(line.split(b" ", 5)[4]) for line in data.splitlines() if line}
    below = [p for p in points if p == prefix or p.startswith(prefix.rstrip("/") + "/")]
    return [_unescape(p) for p in sorted(below, key=len, reverse=True)]


def unmount(path: str, lazy: bool = False) -> bool:
    """Unmount once; False when nothing is mounted there."""
    try:
        check(libc().umount2(path.encode(), MNT_DETACH if lazy else 0), f"unmount {path}")
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOENT):  # not a mount point; no such path
            return False
        raise
    return True


def unmount_all(path: str) -> None:
    """Unmount everything stacked on `path` or mounted below it, deepest first
    (containerd 2.x's UnmountRecursive): 2.x mounts may target a path in the rootfs."""
    try:
        points = _mounted_below(path)
    except OSError:
        points = [path]
    for point in points:
        for _ in range(64):
            if not unmount(point):
                break
