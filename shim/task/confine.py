"""What a request may name on the host: the checks that keep the shim inside the bundle,
the state dir and the stdio paths containerd made.

containerd writes the bundle under its state dir, makes the FIFOs before it sends Create or
Exec, and chooses `file://` and `binary://` stdio from the user's log URI. A request that
names anything else (a bundle reached through `..` or a symlink, a FIFO path that is a
regular file, a device or a symlink, a log "file" under /proc) is refused before the shim
touches it, with InvalidArgument and the name of the field. Mount targets inside the rootfs
are resolved by `shim.linux.mount.resolve_in_root`, which keeps symlinks from leading out;
here a target with `..` is refused outright.

containerd-shim-runc-v2 checks none of these (it opens any stdout path for writing, any stdin
path for reading, creates any `file://` path); containerd's own mount code clamps targets to
the rootfs, as `resolve_in_root` does.
"""

from __future__ import annotations

import os
import stat
from typing import Iterable
from urllib.parse import unquote, urlsplit

from shim.api import task_pb2 as pb
from shim.task.errors import InvalidArgument

# Pseudo-filesystems: writing to one of their files is a control operation, not logging.
PSEUDO_ROOTS = ("/proc", "/sys", "/dev")


def refuse(field: str, value: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"{field} {value!r}: {why}")


def check_create(req: pb.CreateTaskRequest, bundle_parent: str) -> None:
    """Raise InvalidArgument unless everything `req` names on the host is confined."""
    check_bundle(req.bundle, req.id, bundle_parent)
    for i, m in enumerate(req.rootfs):
        check_mount_target(f"rootfs[{i}].target", m.target)
    check_stdio(req.stdin, req.stdout, req.stderr, req.terminal)
    for field, path in (("checkpoint", req.checkpoint), ("parent_checkpoint", req.parent_checkpoint)):
        if path:
            check_clean_absolute(field, path)


def check_exec(req: pb.ExecProcessRequest) -> None:
    check_stdio(req.stdin, req.stdout, req.stderr, req.terminal)


def check_clean_absolute(field: str, path: str) -> None:
    """An absolute path without `.`/`..` components, empty components or NUL bytes."""
    if "\0" in path:
        raise refuse(field, path, "contains a NUL byte")
    if not path.startswith("/"):
        raise refuse(field, path, "must be an absolute path")
    if ".." in path.split("/"):
        raise refuse(field, path, "must not contain '..'")
    if os.path.normpath(path) != path:
        raise refuse(field, path, "must be a normalized path")


def check_bundle(bundle: str, cid: str, bundle_parent: str) -> None:
    """The bundle is `<bundle_parent>/<id>` itself: not reached through `..` or a symlink."""
    check_clean_absolute("bundle", bundle)
    if os.path.realpath(bundle) != os.path.join(bundle_parent, cid):
        raise refuse("bundle", bundle, f"is not this namespace's bundle for {cid}")


def check_mount_target(field: str, target: str) -> None:
    """A sub-path of the rootfs (relative, or absolute meaning the rootfs's root), no `..`."""
    if "\0" in target:
        raise refuse(field, target, "contains a NUL byte")
    if ".." in target.split("/"):
        raise refuse(field, target, "must not contain '..'")


def check_stdio(stdin: str, stdout: str, stderr: str, terminal: bool = False) -> None:
    """With a terminal, stderr is unused (the terminal carries both streams): containerd's
    client names a stderr FIFO there but never makes it, so it is not looked at."""
    if terminal:
        stderr = ""
    if stdin:
        if "://" in stdin and not stdin.startswith("fifo://"):
            raise refuse("stdin", stdin, "must be a FIFO path")
        check_fifo("stdin", stdin.removeprefix("fifo://"))
    for field, uri in (("stdout", stdout), ("stderr", stderr)):
        if uri:
            check_output(field, uri)


def check_output(field: str, uri: str) -> None:
    if "://" not in uri:
        check_fifo(field, uri)
        return
    u = urlsplit(uri)
    path = unquote(u.path)
    if u.scheme == "fifo":
        check_fifo(field, uri[len("fifo://"):])
    elif u.scheme == "file":
        check_log_file(field, path)
    elif u.scheme == "binary":
        check_logger(field, path)
    else:
        raise refuse(field, uri, f"unknown stdio scheme {u.scheme!r}")


def check_fifo(field: str, path: str) -> None:
    """An existing FIFO (containerd makes them before Create): never a regular file, a
    device or a symlink, which the shim would otherwise write to or read from."""
    check_clean_absolute(field, path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise refuse(field, path, "does not exist (a FIFO is made by the client before the "
                     "request)") from None
    except OSError as e:
        raise refuse(field, path, e.strerror or str(e)) from None
    if not stat.S_ISFIFO(mode):
        raise refuse(field, path, f"is not a FIFO (a {_kind(mode)})")


def check_log_file(field: str, path: str) -> None:
    """A regular file (or a new one) outside the pseudo-filesystems, not a symlink."""
    check_clean_absolute(field, path)
    if _under(os.path.realpath(os.path.dirname(path)), PSEUDO_ROOTS):
        raise refuse(field, path, "is on a pseudo-filesystem (/proc, /sys, /dev)")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise refuse(field, path, e.strerror or str(e)) from None
    if not stat.S_ISREG(mode):
        raise refuse(field, path, f"is not a regular file (a {_kind(mode)})")


def check_logger(field: str, path: str) -> None:
    """An executable regular file (symlinks to one allowed: that is how binaries are installed)."""
    check_clean_absolute(field, path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise refuse(field, path, e.strerror or str(e)) from None
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
        raise refuse(field, path, "is not an executable file")


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r + "/") for r in roots)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISLNK, "symlink"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISFIFO, "FIFO")):
        if test(mode):
            return name
    return "special file"
