"""OOM notifications for every container of the shim, from one thread.

One epoll set holds:
  * cgroup v1: an eventfd per container, registered with the kernel by writing
    "<eventfd> <fd of memory.oom_control>" to the memory cgroup's cgroup.event_control.
    The kernel signals it on every OOM in the cgroup, and once more when the cgroup is
    removed; the second kind is told apart by the memory directory being gone.
  * cgroup v2: one inotify fd, with IN_MODIFY watches on each container's memory.events
    and cgroup.events; an OOM kill is when memory.events' oom_kill count went up since
    it was last read. The watch ends when the cgroup empties ("populated 0" in
    cgroup.events: no process is left to be killed) or is removed, after one last read
    of memory.events so the kill that emptied it is still reported.
`on_oom(container_id)` runs on the watcher thread: it must only queue the event.

Locking: `_lock` guards the watch tables and every fd close, so the thread never acts
on an fd that `remove` closed (and the kernel may have handed out again): it looks
each ready fd up under the lock, and the eventfds are non-blocking, so a stale
readiness report just reads EAGAIN. Callbacks run outside the lock, so they may call
`remove`.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from typing import Callable

from shim.linux.cgroups import Cgroup
from shim.linux import inotify
from shim.linux.inotify import IN_DELETE_SELF, IN_IGNORED, IN_MODIFY, IN_UNMOUNT
from shim.linux.libc import libc

log = logging.getLogger("shim.linux.oom")


def read_oom_kills(memory_events: str) -> int | None:
    """The oom_kill count of a v2 memory.events file.

    None when the file is gone, and also when it has no oom_kill line (a kernel before
    4.13, or a torn read of a file being rewritten): then nothing can be concluded.
    """
    try:
        with open(memory_events, "rb") as f:
            text = f.read()
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENODEV):
            return None
        raise
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == b"oom_kill":
            try:
                return int(parts[1])
            except ValueError:
                return None
    return None


def is_populated(cgroup_events: str) -> bool:
    """False only when a v2 cgroup.events says "populated 0"."""
    try:
        with open(cgroup_events, "rb") as f:
            text = f.read()
    except OSError:
        return True  # no such file (a fake cgroup in tests): removal ends the watch
    return b"populated 0" not in text.splitlines()


class _Watch:
    __slots__ = ("container_id", "directory", "fd", "wds", "oom_kills")

    def __init__(self, container_id: str, directory: str) -> None:
        self.container_id = container_id
        self.directory = directory
        self.fd = -1  # v1: the eventfd
        self.wds: list[int] = []  # v2: inotify watches on memory.events and cgroup.events
        self.oom_kills = 0  # v2: last seen oom_kill count


class OOMWatcher:
    def __init__(self, on_oom: Callable[[str], None], *, start: bool = True) -> None:
        """`start=False` leaves the thread to `start()`: watches may be added before it
        runs, and their events wait in the epoll set until it does."""
        self._on_oom = on_oom
        # Guards the three tables, _inotify_fd and _closed: add/remove run on RPC threads,
        # the watcher's thread reads the tables for every ready fd.
        self._lock = threading.Lock()
        self._by_id: dict[str, _Watch] = {}
        self._by_fd: dict[int, _Watch] = {}  # v1 eventfds
        self._by_wd: dict[int, _Watch] = {}  # v2 inotify watches
        self._inotify_fd = -1  # created with the first v2 watch
        self._closed = False
        self._epoll = select.epoll()
        # Wakes the thread for close(); epoll_wait has no other way out.
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="oom-watcher", daemon=True)
        if start:
            self._thread.start()

    def start(self) -> None:
        self._thread.start()

    def __contains__(self, container_id: str) -> bool:
        with self._lock:
            return container_id in self._by_id

    def add(self, container_id: str, cgroup: Cgroup) -> None:
        """Start watching; replaces an earlier watch for the same id."""
        directory = cgroup.memory_path
        if directory is None:
            raise ValueError(f"{cgroup!r} has no memory controller")
        watch = _Watch(container_id, directory)
        with self._lock:
            if self._closed:
                raise RuntimeError("OOM watcher is closed")
            self._drop(self._by_id.get(container_id))
            if cgroup.version == 1:
                self._add_v1(watch)
            else:
                self._add_v2(watch)
            self._by_id[container_id] = watch

    def remove(self, container_id: str) -> None:
        with self._lock:
            self._drop(self._by_id.get(container_id))

    def close(self) -> None:
        """Stop the thread and close every fd. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for watch in list(self._by_id.values()):
                self._drop(watch)
            if self._thread.ident is None:  # never started: nothing to stop
                self._close_fds()
                return
            os.eventfd_write(self._wake_fd, 1)
        if threading.current_thread() is not self._thread:
            self._thread.join()
        # else: called from a callback; the thread closes the rest as it leaves.

    # -- registration (under _lock) ------------------------------------------

    def _add_v1(self, watch: _Watch) -> None:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            ctl = os.open(os.path.join(watch.directory, "memory.oom_control"),
                          os.O_RDONLY | os.O_CLOEXEC)
            try:
                # The kernel keeps its own reference to memory.oom_control, so this fd
                # may be closed once registered (containerd does the same).
                event_control = os.open(os.path.join(watch.directory, "cgroup.event_control"),
                                        os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(event_control, f"{efd} {ctl}".encode())
                finally:
                    os.close(event_control)
            finally:
                os.close(ctl)
            self._epoll.register(efd, select.EPOLLIN)
        except BaseException:
            os.close(efd)
            raise
        watch.fd = efd
        self._by_fd[efd] = watch

    def _add_v2(self, watch: _Watch) -> None:
        path = os.path.join(watch.directory, "memory.events")
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, "no memory.events", path)
        if self._inotify_fd < 0:
            self._inotify_fd = inotify.init()
            self._epoll.register(self._inotify_fd, select.EPOLLIN)
        # Baseline before the watch, so a kill that lands in between is reported rather
        # than absorbed into the baseline.
        watch.oom_kills = read_oom_kills(path) or 0
        try:
            for name in ("memory.events", "cgroup.events"):
                file = os.path.join(watch.directory, name)
                if name == "cgroup.events" and not os.path.exists(file):
                    continue
                wd = inotify.add_watch(self._inotify_fd, file, IN_MODIFY)
                # inotify hands out the same wd when a file is watched twice (two ids on
                # one cgroup): the newest id takes the kernel's watch over.
                other = self._by_wd.get(wd)
                if other is not None and other is not watch:
                    self._by_id.pop(other.container_id, None)
                    for other_wd in other.wds:
                        self._by_wd.pop(other_wd, None)
                    other.wds.clear()
                watch.wds.append(wd)
                self._by_wd[wd] = watch
        except BaseException:
            self._drop(watch)
            raise

    def _drop(self, watch: _Watch | None) -> None:
        if watch is None:
            return
        if self._by_id.get(watch.container_id) is watch:
            del self._by_id[watch.container_id]
        if watch.fd >= 0:
            del self._by_fd[watch.fd]
            self._epoll.unregister(watch.fd)
            os.close(watch.fd)
            watch.fd = -1
        for wd in watch.wds:
            if self._by_wd.get(wd) is watch:
                del self._by_wd[wd]
                # EINVAL when the kernel already dropped the watch (file removed): fine.
                libc().inotify_rm_watch(self._inotify_fd, wd)
        watch.wds.clear()

    # -- the thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closed:
                try:
                    ready = self._epoll.poll()
                except Exception:
                    log.exception("epoll_wait failed; OOM events are no longer watched")
                    return
                for fd, _ in ready:
                    try:
                        with self._lock:
                            if self._closed:
                                break
                            if fd == self._wake_fd:
                                continue
                            oom = self._ready(fd)
                    except Exception:
                        log.exception("OOM watcher: handling fd %d", fd)
                        continue
                    for container_id in oom:
                        try:
                            self._on_oom(container_id)
                        except Exception:
                            log.exception("OOM callback for %s failed", container_id)
        finally:
            with self._lock:
                self._closed = True
                for watch in list(self._by_id.values()):
                    self._drop(watch)
                self._close_fds()

    def _close_fds(self) -> None:
        """The watcher's own fds, once every watch is dropped (under _lock)."""
        if self._inotify_fd >= 0:
            os.close(self._inotify_fd)
            self._inotify_fd = -1
        self._epoll.close()
        os.close(self._wake_fd)

    def _ready(self, fd: int) -> list[str]:
        """Container ids with a new OOM, after handling a ready fd (under _lock)."""
        if fd == self._inotify_fd:
            return self._inotify_ready()
        watch = self._by_fd.get(fd)
        if watch is None:
            return []  # removed while epoll_wait was reporting it
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return []  # already drained: a stale report
        if not os.path.isdir(watch.directory):
            # The removal signal: the cgroup is gone, not out of memory.
            self._drop(watch)
            return []
        return [watch.container_id]

    def _inotify_ready(self) -> list[str]:
        try:
            data = os.read(self._inotify_fd, 65536)
        except BlockingIOError:
            return []
        # One look per cgroup however many events it got: masks OR'ed per watch.
        changed: dict[_Watch, int] = {}
        for wd, mask, _ in inotify.events(data):
            watch = self._by_wd.get(wd)
            if watch is not None:
                changed[watch] = changed.get(watch, 0) | mask
        oom = []
        for watch, mask in changed.items():
            path = os.path.join(watch.directory, "memory.events")
            kills = read_oom_kills(path)
            # The count only grows; moving the baseline up only keeps a torn read
            # from turning into a second report of the same kill.
            if kills is not None and kills > watch.oom_kills:
                oom.append(watch.container_id)
                watch.oom_kills = kills
            gone = mask & (IN_IGNORED | IN_DELETE_SELF | IN_UNMOUNT) or (
                kills is None and not os.path.exists(path))
            if gone or not is_populated(os.path.join(watch.directory, "cgroup.events")):
                self._drop(watch)
        return oom
