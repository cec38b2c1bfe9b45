"""The Task service: containerd's task API (containerd.task.v2.Task) implemented with runc.

Concurrency, in one place:
  * `Process.lock` serialises the operations of one process. Start holds it across
    `runc start`/`runc exec` and the start event, and exit processing takes it too, so
    a process's /tasks/exit can never be published before its start event.
  * `_exit_lock` guards the pid table (`_pids`) and the early-exit buffer. An exit of an
    unknown pid that arrives while some process is being launched is kept in `_early`;
    the launcher looks there once it knows its pid. So an exit that happens before
    `runc exec` returns (or before Start replies) is never lost.
  * Exits are processed on one thread, in the order the reaper saw them; the reaper
    itself only queues them.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from google.protobuf.any_pb2 import Any
from google.protobuf.empty_pb2 import Empty

from shim.linux import mount as mounts
from shim.runtime import options
from shim.api import events_pb2 as ev
from shim.api import task_pb2 as pb
from shim.api.runc_options_pb2 import CheckpointOptions
from shim.api.runc_options_pb2 import ProcessDetails
from shim.api.task_types_pb2 import ProcessInfo
from shim.api.task_types_pb2 import Status as PbStatus
from shim.linux.cgroups import Cgroup
from shim.task.events import Publisher, timestamp_of
from shim.linux.oom import OOMWatcher
from shim.linux.reaper import Reaper
from shim.probe import hooks as probe
from shim.runtime.runc import Runc, RuncConfig, RuncError
from shim.task.state import Lifecycle, State
from shim.runtime.stdio import ProcessIO
from shim.ttrpc import Code, Context, TTRPCError

log = logging.getLogger("shim.task.service")

DRAIN_TIMEOUT = 2.0

_STATUS = {State.CREATED: PbStatus.CREATED, State.RUNNING: PbStatus.RUNNING,
           State.PAUSING: PbStatus.PAUSING, State.PAUSED: PbStatus.PAUSED,
           State.STOPPED: PbStatus.STOPPED, State.DELETED: PbStatus.STOPPED}


def not_found(what: str) -> TTRPCError:
    return TTRPCError(Code.NOT_FOUND, f"{what}: not found")


class Process:
    """The init process of a container (exec_id "") or one of its exec processes."""

    def __init__(self, container: "Container", exec_id: str, stdin: str, stdout: str,
                 stderr: str, terminal: bool) -> None:
        self.container = container
        self.exec_id = exec_id
        self.stdin, self.stdout, self.stderr, self.terminal = stdin, stdout, stderr, terminal
        self.pid = 0
        self.io: ProcessIO | None = None
        self.life = Lifecycle()
        self.exit_status = 0
        self.exited_at: float | None = None
        self.exited = threading.Event()
        self.lock = threading.RLock()
        self.spec: bytes = b""  # exec: the OCI process JSON
        self.checkpoint: tuple[str, str] | None = None  # init: (image, parent) to restore

    @property
    def id(self) -> str:
        return self.exec_id or self.container.id

    @property
    def name(self) -> str:
        """For messages: 'container c1' or 'exec e1 in container c1'."""
        if self.exec_id:
            return f"exec {self.exec_id} in container {self.container.id}"
        return f"container {self.container.id}"

    @property
    def state(self) -> State:
        return self.life.state


class Container:
    def __init__(self, cid: str, bundle: str, runc: Runc, host_pid_ns: bool) -> None:
        self.id = cid
        self.bundle = bundle
        self.runc = runc
        self.host_pid_ns = host_pid_ns
        self.init: Process | None = None
        self.execs: dict[str, Process] = {}
        self.rootfs_mounted = False
        self.cgroup: Cgroup | None = None
        # An init exit waits here while execs are still running or starting, so that the
        # init's /tasks/exit is the container's last one (guarded by init.lock).
        self.pending_init_exit: tuple[int, float] | None = None
        # Execs inside Start(exec), whose pid is not known yet (guarded by init.lock).
        self.starting_execs = 0

    def running_execs(self) -> list[Process]:
        return [p for p in self.execs.values() if p.pid and not p.exited.is_set()]

    def busy(self) -> bool:
        """Whether an exec is running or being started: the init's exit must wait."""
        return self.starting_execs > 0 or bool(self.running_execs())


class TaskService:
    def __init__(self, namespace: str, bundle: str, publisher: Publisher,
                 request_shutdown: Callable[[], None]) -> None:
        self.namespace = namespace
        self.bundle_parent = os.path.dirname(os.path.realpath(bundle))
        self.publisher = publisher
        self.request_shutdown = request_shutdown
        self.reaper = Reaper(self._exit_queued)
        self.oom = OOMWatcher(self._oom, start=False)
        self.containers: dict[str, Container] = {}
        self._lock = threading.Lock()  # guards `containers`
        self._exit_lock = threading.Lock()
        self._pids: dict[int, list[Process]] = {}
        self._launching = 0
        self._early: dict[int, tuple[int, float]] = {}
        self._exits: queue.SimpleQueue[tuple[int, int, float]] = queue.SimpleQueue()
        self._exit_thread = threading.Thread(target=self._exit_loop, name="exits", daemon=True)

    def start(self) -> None:
        """Start the exit and OOM threads. Until they run, exits and OOM events wait
        in their queue and epoll set: the daemon starts them once it accepts requests,
        so that containerd's first call does not wait for them."""
        self._exit_thread.start()
        self.oom.start()

    # -- lookup ----------------------------------------------------------------------------

    def _container(self, cid: str) -> Container:
        c = self.containers.get(cid)
        if c is None:
            raise not_found(f"container {cid}")
        return c

    def _process(self, cid: str, exec_id: str) -> Process:
        c = self._container(cid)
        if not exec_id:
            if c.init is None:
                raise TTRPCError(Code.FAILED_PRECONDITION,
                                 f"container {cid} must be created")
            return c.init
        p = c.execs.get(exec_id)
        if p is None:
            raise not_found(f"exec {exec_id} in container {cid}")
        return p

    # -- exits -----------------------------------------------------------------------------

    def _exit_queued(self, pid: int, code: int, when: float) -> None:
        self._exits.put((pid, code, when))  # called by the reaper: queue only

    def _exit_loop(self) -> None:
        while True:
            pid, code, when = self._exits.get()
            with self._exit_lock:
                procs = self._pids.pop(pid, None)
                if procs is None:
                    if self._launching:
                        self._early[pid] = (code, when)
                    continue
            for p in procs:
                try:
                    self._handle_exit(p, code, when)
                except Exception:
                    log.exception("handling the exit of %s (pid %d)", p.name, pid)

    @contextmanager
    def _launch(self) -> Iterator[None]:
        """Bracket a runc call that creates a process whose pid is not known yet."""
        with self._exit_lock:
            self._launching += 1
        try:
            yield
        finally:
            with self._exit_lock:
                self._launching -= 1
                if not self._launching:
                    self._early.clear()

    def _watch(self, p: Process) -> tuple[int, float] | None:
        """Route p.pid's exit to p; returns the exit if it already happened. Call inside
        `_launch`."""
        with self._exit_lock:
            early = self._early.pop(p.pid, None)
            if early is None:
                self._pids.setdefault(p.pid, []).append(p)
            return early

    def _unwatch(self, p: Process) -> None:
        with self._exit_lock:
            procs = self._pids.get(p.pid)
            if procs and p in procs:
                procs.remove(p)
                if not procs:
                    del self._pids[p.pid]

    def _handle_exit(self, p: Process, code: int, when: float) -> None:
        c = p.container
        if probe.ON:  # traced; its failpoint may delay the delivery
            probe.reaped_exit(c.id, p.exec_id, p.pid, code)
        with p.lock:
            if p.exited.is_set() or p.state is State.DELETED:
                return
            if p is c.init:
                if c.host_pid_ns:
                    # Without its own pid namespace nothing kills the rest of the
                    # container when init dies: do it, so no orphan survives.
                    try:
                        c.runc.kill(c.id, signal.SIGKILL, all=True)
                    except RuncError:
                        pass
                if c.busy():
                    c.pending_init_exit = (code, when)
                    return
            self._mark_exited(p, code, when)
        if p is not c.init:
            self._finish_pending_init(c)

    def _finish_pending_init(self, c: Container) -> None:
        """Publish the init exit held back by _handle_exit once no exec runs or starts."""
        assert c.init is not None
        with c.init.lock:
            if c.pending_init_exit is None or c.busy():
                return
            code, when = c.pending_init_exit
            c.pending_init_exit = None
            self._mark_exited(c.init, code, when)

    def _mark_exited(self, p: Process, code: int, when: float) -> None:
        if p.io is not None and not p.io.wait_drained(DRAIN_TIMEOUT):
            log.warning("%s: output not drained %.0fs after exit", p.name, DRAIN_TIMEOUT)
        p.life.apply("exit")
        p.exit_status, p.exited_at = code, when
        self.publisher.publish("/tasks/exit", ev.TaskExit(
            container_id=p.container.id, id=p.id, pid=p.pid, exit_status=code,
            exited_at=timestamp_of(when)))
        p.exited.set()
        log.debug("%s exited with status %d", p.name, code)

    # -- Task API --------------------------------------------------------------------------

    def Create(self, req: pb.CreateTaskRequest, ctx: Context) -> pb.CreateTaskResponse:
        cid = req.id
        if not cid or "/" in cid or cid in (".", ".."):
            raise TTRPCError(Code.INVALID_ARGUMENT, f"invalid container id {cid!r}")
        bundle = os.path.realpath(req.bundle)
        if os.path.dirname(bundle) != self.bundle_parent or os.path.basename(bundle) != cid:
            raise TTRPCError(Code.INVALID_ARGUMENT,
                             f"create {cid}: bundle {req.bundle} is not this namespace's "
                             f"bundle for {cid}")
        with self._lock:
            if cid in self.containers:
                raise TTRPCError(Code.ALREADY_EXISTS, f"container {cid}: already exists")
            # Reserve the id while runc works, so a second Create for it fails fast.
            self.containers[cid] = placeholder = Container(cid, bundle, None, False)  # type: ignore[arg-type]
        try:
            c = self._create(req, bundle)
        except BaseException:
            with self._lock:
                del self.containers[cid]
            raise
        with self._lock:
            if self.containers.get(cid) is placeholder:
                self.containers[cid] = c
        assert c.init is not None
        return pb.CreateTaskResponse(pid=c.init.pid)

    def _create(self, req: pb.CreateTaskRequest, bundle: str) -> Container:
        cid = req.id
        config = options.decode(req.options.type_url, req.options.value, f"create {cid}").runc
        config.save(bundle)
        runc = Runc(self.reaper, config, self.namespace, bundle)
        c = Container(cid, bundle, runc, host_pid_ns=_shares_host_pid_ns(bundle))
        init = Process(c, "", req.stdin, req.stdout, req.stderr, req.terminal)
        c.init = init
        rootfs = os.path.join(bundle, "rootfs")
        if req.rootfs:
            os.makedirs(rootfs, mode=0o711, exist_ok=True)
            try:
                mounts.mount_all([mounts.Mount(m.type, m.source, list(m.options), m.target)
                                  for m in req.rootfs], rootfs)
            except OSError as e:
                raise TTRPCError(Code.UNKNOWN, f"create {cid}: mounting rootfs: {e}") from None
            c.rootfs_mounted = True
        early = None
        try:
            init.io = self._open_io(init, config)
            if req.checkpoint:
                # Restored in Start, as runc restore both creates and starts.
                init.checkpoint = (req.checkpoint, req.parent_checkpoint)
            else:
                pid_file = os.path.join(bundle, "init.pid")
                with self._launch():
                    runc.create(cid, pid_file, init.io.runc_stdio, init.io.console_socket)
                    init.pid = read_pid(pid_file)
                    init.io.started()
                    early = self._watch(init)
        except (OSError, RuncError) as e:
            if init.io is not None:
                init.io.close()
            if c.rootfs_mounted:
                mounts.unmount_all(rootfs)
            if isinstance(e, RuncError):
                raise TTRPCError(Code.UNKNOWN, f"OCI runtime create failed: {e}") from None
            raise TTRPCError(Code.UNKNOWN, f"create {cid}: {e}") from None
        self.publisher.publish("/tasks/create", ev.TaskCreate(
            container_id=cid, bundle=bundle, rootfs=req.rootfs,
            io=ev.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                         terminal=req.terminal),
            checkpoint=req.checkpoint, pid=init.pid))
        if init.pid:
            try:
                c.cgroup = Cgroup.for_pid(init.pid)
            except (OSError, ValueError) as e:
                log.warning("container %s: cannot find its cgroup: %s", cid, e)
            else:
                # Watched from Create, not from Start: a process that runs out of memory at
                # once would do so before Start had registered the watch, and go unreported.
                self._watch_oom(c)
        if early is not None:
            self._handle_exit(init, *early)
        log.debug("created container %s (pid %d)", cid, init.pid)
        return c

    def Start(self, req: pb.StartRequest, ctx: Context) -> pb.StartResponse:
        p = self._process(req.id, req.exec_id)
        c = p.container
        with p.lock:
            p.life.check("start")
            if p is c.init:
                early = None
                if p.checkpoint:
                    early = self._restore(p)
                    self._watch_oom(c)  # restored: its cgroup exists only now
                else:
                    try:
                        c.runc.start(c.id)
                    except RuncError as e:
                        raise TTRPCError(Code.UNKNOWN, f"OCI runtime start failed: {e}") from None
                p.life.apply("start")
                self.publisher.publish("/tasks/start", ev.TaskStart(container_id=c.id, pid=p.pid))
                if early is not None:
                    self._handle_exit(p, *early)
                return pb.StartResponse(pid=p.pid)
            self._start_exec(p)
            return pb.StartResponse(pid=p.pid)

    def _watch_oom(self, c: Container) -> None:
        if c.cgroup is None and c.init is not None and c.init.pid:
            try:
                c.cgroup = Cgroup.for_pid(c.init.pid)  # a restored container's
            except (OSError, ValueError):
                pass
        if c.cgroup is None:
            return
        try:
            self.oom.add(c.id, c.cgroup)
        except (OSError, ValueError) as e:
            log.warning("container %s: no OOM notifications: %s", c.id, e)

    def _oom(self, cid: str) -> None:
        log.info("container %s: out of memory", cid)
        self.publisher.publish("/tasks/oom", ev.TaskOOM(container_id=cid))

    def _restore(self, p: Process) -> tuple[int, float] | None:
        """runc restore; returns the restored init's exit if it already happened."""
        c = p.container
        assert p.io is not None and p.checkpoint is not None
        image, parent = p.checkpoint
        work = os.path.join(c.bundle, "work", "criu-work")
        pid_file = os.path.join(c.bundle, "init.pid")
        try:
            with self._launch():
                c.runc.restore(c.id, image, work, pid_file, p.io.runc_stdio, parent,
                               p.io.console_socket)
                p.pid = read_pid(pid_file)
                p.io.started()
                early = self._watch(p)
        except (OSError, RuncError) as e:
            raise TTRPCError(Code.UNKNOWN, f"restore container {c.id}: {e}") from None
        p.checkpoint = None
        return early

    def Checkpoint(self, req: pb.CheckpointTaskRequest, ctx: Context) -> Empty:
        p = self._process(req.id, "")
        c = p.container
        opts = CheckpointOptions()
        if req.options.type_url.endswith("containerd.runc.v1.CheckpointOptions"):
            opts = CheckpointOptions.FromString(req.options.value)
        image = req.path or opts.image_path
        if not image:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"checkpoint container {c.id}: no image path")
        work = opts.work_path or os.path.join(c.bundle, "work", "criu-work")
        with p.lock:
            p.life.check("checkpoint")
            try:
                c.runc.checkpoint(c.id, image, work, leave_running=not opts.exit,
                                  tcp_established=opts.open_tcp,
                                  ext_unix_sk=opts.external_unix_sockets,
                                  shell_job=opts.terminal or p.terminal,
                                  file_locks=opts.file_locks, cgroups_mode=opts.cgroups_mode,
                                  empty_ns=list(opts.empty_namespaces))
            except RuncError as e:
                # Keep criu's log where an operator looks, then report. runc's message
                # names the log in the work directory, which is about to go: name the copy.
                text = str(e)
                dump_log = os.path.join(work, "dump.log")
                kept = os.path.join(c.bundle, "criu-dump.log")
                if os.path.exists(dump_log):
                    shutil.copyfile(dump_log, kept)
                    text = text.replace(dump_log, kept)
                    if kept not in text:
                        text += f" (criu log: {kept})"
                raise TTRPCError(Code.UNKNOWN,
                                 f"checkpoint container {c.id} failed: {text}") from None
            finally:
                if not opts.work_path:
                    shutil.rmtree(work, ignore_errors=True)
        return Empty()

    def _start_exec(self, p: Process) -> None:
        c = p.container
        assert c.init is not None
        with c.init.lock:
            # Once init is reaped (even while its exit waits for running execs) no exec
            # may start; one that is starting holds the init's exit back until it is done.
            if c.pending_init_exit is not None or c.init.state is not State.RUNNING:
                raise TTRPCError(Code.FAILED_PRECONDITION,
                                 f"container {c.id} init process is not running")
            c.starting_execs += 1
        pid_file = os.path.join(c.bundle, f"{p.exec_id}.pid")
        spec_path = ""
        try:
            fd, spec_path = tempfile.mkstemp(prefix="runc-process")
            with os.fdopen(fd, "wb") as f:
                f.write(p.spec)
            p.io = self._open_io(p, c.runc.config)
            with self._launch():
                c.runc.exec(c.id, spec_path, pid_file, p.io.runc_stdio, p.io.console_socket)
                p.pid = read_pid(pid_file)
                p.io.started()
                p.life.apply("start")
                self.publisher.publish("/tasks/exec-started", ev.TaskExecStarted(
                    container_id=c.id, exec_id=p.exec_id, pid=p.pid))
                early = self._watch(p)
        except (OSError, RuncError) as e:
            if p.io is not None:
                p.io.close()
                p.io = None
            raise TTRPCError(Code.UNKNOWN, f"OCI runtime exec failed: {e}") from None
        finally:
            if spec_path:
                os.unlink(spec_path)
            with c.init.lock:
                c.starting_execs -= 1  # running now (p.pid is set), or failed
            self._finish_pending_init(c)
        if early is not None:
            self._handle_exit(p, *early)

    def _open_io(self, p: Process, config: RuncConfig) -> ProcessIO:
        return ProcessIO(p.name, p.stdin, p.stdout, p.stderr, terminal=p.terminal,
                         uid=config.io_uid, gid=config.io_gid, spawn=self.reaper.spawn,
                         ids=(p.container.id, p.exec_id),
                         env={"CONTAINER_ID": p.container.id,
                              "CONTAINER_NAMESPACE": self.namespace})

    def Delete(self, req: pb.DeleteRequest, ctx: Context) -> pb.DeleteResponse:
        p = self._process(req.id, req.exec_id)
        c = p.container
        with p.lock:
            if p.state is State.DELETED:
                raise not_found(p.name)
            if p.state not in (State.CREATED, State.STOPPED):
                raise TTRPCError(Code.FAILED_PRECONDITION,
                                 f"cannot delete {p.name}: it is {p.state.value}")
            if p is c.init and c.running_execs():
                raise TTRPCError(Code.FAILED_PRECONDITION,
                                 f"cannot delete {p.name}: execs are still running")
            self._unwatch(p)
            if p is c.init:
                try:
                    c.runc.delete(c.id)
                except RuncError as e:
                    if "not exist" not in str(e):
                        raise TTRPCError(Code.UNKNOWN, f"delete {c.id}: {e}") from None
            else:
                try:
                    os.unlink(os.path.join(c.bundle, f"{p.exec_id}.pid"))
                except OSError:
                    pass
            if p.io is not None:
                p.io.close()
            p.life.apply("delete")
        if p is c.init:
            for e in list(c.execs.values()):
                if e.io is not None:
                    e.io.close()
            if c.rootfs_mounted:
                try:
                    mounts.unmount_all(os.path.join(c.bundle, "rootfs"))
                except OSError as e:
                    log.warning("delete %s: unmounting rootfs: %s", c.id, e)
            self.oom.remove(c.id)
            with self._lock:
                self.containers.pop(c.id, None)
            self.publisher.publish("/tasks/delete", ev.TaskDelete(
                container_id=c.id, pid=p.pid, exit_status=p.exit_status,
                exited_at=timestamp_of(p.exited_at)))
            log.debug("deleted container %s", c.id)
        else:
            c.execs.pop(p.exec_id, None)
        return pb.DeleteResponse(pid=p.pid, exit_status=p.exit_status,
                                 exited_at=timestamp_of(p.exited_at))

    def Exec(self, req: pb.ExecProcessRequest, ctx: Context) -> Empty:
        c = self._container(req.id)
        if not req.exec_id or "/" in req.exec_id:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"invalid exec id {req.exec_id!r}")
        init = self._process(req.id, "")
        with init.lock:
            init.life.check("exec")  # a stopped init is refused here
            if req.exec_id in c.execs:
                raise TTRPCError(Code.ALREADY_EXISTS, f"id {req.exec_id}: already exists")
            p = Process(c, req.exec_id, req.stdin, req.stdout, req.stderr, req.terminal)
            try:
                spec = json.loads(req.spec.value or b"{}")
            except ValueError as e:
                raise TTRPCError(Code.INVALID_ARGUMENT,
                                 f"exec {req.exec_id}: process spec is not JSON: {e}") from None
            if not isinstance(spec, dict):
                raise TTRPCError(Code.INVALID_ARGUMENT, f"exec {req.exec_id}: bad process spec")
            spec["terminal"] = req.terminal
            p.spec = json.dumps(spec).encode()
            c.execs[req.exec_id] = p
        self.publisher.publish("/tasks/exec-added",
                               ev.TaskExecAdded(container_id=c.id, exec_id=req.exec_id))
        return Empty()

    def State(self, req: pb.StateRequest, ctx: Context) -> pb.StateResponse:
        p = self._process(req.id, req.exec_id)
        state = p.state
        if p.exec_id and p.container.init is not None and \
                p.container.init.state in (State.PAUSED, State.PAUSING) and \
                state is State.RUNNING:
            state = p.container.init.state
        return pb.StateResponse(
            id=p.id, bundle=p.container.bundle, pid=p.pid, status=_STATUS[state],
            stdin=p.stdin, stdout=p.stdout, stderr=p.stderr, terminal=p.terminal,
            exit_status=p.exit_status, exited_at=timestamp_of(p.exited_at))

    def Kill(self, req: pb.KillRequest, ctx: Context) -> Empty:
        p = self._process(req.id, req.exec_id)
        c = p.container
        if p is c.init:
            with p.lock:
                p.life.check("kill")
            try:
                c.runc.kill(c.id, req.signal, all=req.all)
            except RuncError as e:
                raise kill_error(p, str(e)) from None
            return Empty()
        with p.lock:
            if p.state is State.CREATED:
                raise TTRPCError(Code.FAILED_PRECONDITION, f"{p.name}: process not created")
            if p.state is not State.RUNNING:
                raise not_found(f"{p.name}: process already finished")
            try:
                os.kill(p.pid, req.signal)
            except ProcessLookupError:
                raise not_found(f"{p.name}: process already finished") from None
        return Empty()

    def Pids(self, req: pb.PidsRequest, ctx: Context) -> pb.PidsResponse:
        c = self._container(req.id)
        if c.init is not None and c.init.exited.is_set():
            # runc lists no process for a stopped container, but containerd 1.7+ tears down
            # a reloaded task whose Pids is empty (taking it for a shim that never created
            # one): a container that exited while containerd was away would lose its exit
            # status. Its init stays listed until Delete.
            return pb.PidsResponse(processes=[ProcessInfo(pid=c.init.pid)])
        try:
            pids = c.runc.ps(c.id)
        except RuncError as e:
            raise TTRPCError(Code.UNKNOWN, f"pids of container {c.id}: {e}") from None
        by_pid = {p.pid: p.exec_id for p in list(c.execs.values()) if p.pid}
        out = pb.PidsResponse()
        for pid in pids:
            info = ProcessInfo(pid=pid)
            if pid in by_pid:
                details = ProcessDetails(exec_id=by_pid[pid])
                info.info.CopyFrom(Any(type_url=details.DESCRIPTOR.full_name,
                                       value=details.SerializeToString()))
            out.processes.append(info)
        return out

    def CloseIO(self, req: pb.CloseIORequest, ctx: Context) -> Empty:
        p = self._process(req.id, req.exec_id)
        if p.io is not None:
            p.io.close_stdin()
        return Empty()

    def Pause(self, req: pb.PauseRequest, ctx: Context) -> Empty:
        return self._pause_resume(req.id, "pause")

    def Resume(self, req: pb.ResumeRequest, ctx: Context) -> Empty:
        return self._pause_resume(req.id, "resume")

    def _pause_resume(self, cid: str, op: str) -> Empty:
        p = self._process(cid, "")
        c = p.container
        with p.lock:
            p.life.apply(op)
            try:
                if op == "pause":
                    c.runc.pause(c.id)
                else:
                    c.runc.resume(c.id)
            except RuncError as e:
                p.life.apply(f"{op}_failed")
                raise TTRPCError(Code.UNKNOWN, f"{op} container {c.id}: {e}") from None
            if op == "pause":
                p.life.apply("paused")
                self.publisher.publish("/tasks/paused", ev.TaskPaused(container_id=c.id))
            else:
                self.publisher.publish("/tasks/resumed", ev.TaskResumed(container_id=c.id))
        return Empty()

    def Update(self, req: pb.UpdateTaskRequest, ctx: Context) -> Empty:
        p = self._process(req.id, "")
        with p.lock:
            p.life.check("update")
            try:
                p.container.runc.update(p.container.id, req.resources.value or b"{}")
            except RuncError as e:
                raise TTRPCError(Code.UNKNOWN, f"update container {req.id}: {e}") from None
        return Empty()

    def ResizePty(self, req: pb.ResizePtyRequest, ctx: Context) -> Empty:
        p = self._process(req.id, req.exec_id)
        # Only a stopped exec refuses (as runc-v2's does): `ctr run -t` sends its first
        # resize after Start, and an init that exited by then must not make it print an error.
        if p.exited.is_set() and p.exec_id:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"cannot resize {p.name}: it is stopped")
        if p.io is not None:
            try:
                p.io.resize(req.width, req.height)
            except OSError as e:
                raise TTRPCError(Code.UNKNOWN, f"resize {p.name}: {e}") from None
        return Empty()

    def Stats(self, req: pb.StatsRequest, ctx: Context) -> pb.StatsResponse:
        c = self._container(req.id)
        if c.cgroup is None:
            raise not_found(f"container {c.id}: cgroup does not exist")
        try:
            return pb.StatsResponse(stats=c.cgroup.metrics())
        except FileNotFoundError:
            raise not_found(f"container {c.id}: cgroup does not exist") from None

    def Wait(self, req: pb.WaitRequest, ctx: Context) -> pb.WaitResponse:
        p = self._process(req.id, req.exec_id)
        p.exited.wait()
        return pb.WaitResponse(exit_status=p.exit_status, exited_at=timestamp_of(p.exited_at))

    def Connect(self, req: pb.ConnectRequest, ctx: Context) -> pb.ConnectResponse:
        c = self.containers.get(req.id)
        task_pid = c.init.pid if c is not None and c.init is not None else 0
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=task_pid)

    def Shutdown(self, req: pb.ShutdownRequest, ctx: Context) -> Empty:
        with self._lock:
            idle = not self.containers
        if idle:
            self.request_shutdown()
        return Empty()

    def methods(self) -> dict[str, tuple[type, Callable]]:
        """The method table for the ttrpc server; methods not here answer Unimplemented."""
        table = {
            "Create": pb.CreateTaskRequest, "Start": pb.StartRequest,
            "Delete": pb.DeleteRequest, "Exec": pb.ExecProcessRequest,
            "State": pb.StateRequest, "Kill": pb.KillRequest, "Pids": pb.PidsRequest,
            "CloseIO": pb.CloseIORequest, "Pause": pb.PauseRequest,
            "Resume": pb.ResumeRequest, "Update": pb.UpdateTaskRequest,
            "ResizePty": pb.ResizePtyRequest, "Wait": pb.WaitRequest,
            "Connect": pb.ConnectRequest, "Shutdown": pb.ShutdownRequest,
            "Checkpoint": pb.CheckpointTaskRequest, "Stats": pb.StatsRequest,
        }
        return {name: (req_type, _traced(name, getattr(self, name)))
                for name, req_type in table.items()}


def _traced(name: str, handler: Callable) -> Callable:
    """Log a call's failure with the operation and the process it concerns, and, at
    debug level (`-debug`), every call with its duration."""
    def call(req, ctx: Context):
        start = time.monotonic()
        target = getattr(req, "id", "")
        if getattr(req, "exec_id", ""):
            target += f" exec {req.exec_id}"
        try:
            return handler(req, ctx)
        except TTRPCError as e:
            # NotFound is routine: containerd kills and deletes what may be gone already.
            level = logging.DEBUG if e.code == Code.NOT_FOUND else logging.WARNING
            log.log(level, "%s %s failed: %s (%s)", name, target, e.message, e.code.name)
            raise
        finally:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s: %.1f ms", name, target, (time.monotonic() - start) * 1e3)
    return call


# -- helpers ------------------------------------------------------------------------------


def kill_error(p: Process, text: str) -> TTRPCError:
    """Classify runc kill's error the way containerd expects (NotFound when gone)."""
    low = text.lower()
    if any(s in low for s in ("process already finished", "container not running",
                              "no such process")):
        return not_found(f"{p.name}: process already finished")
    if "does not exist" in low:
        return not_found(f"{p.name}: no such container")
    return TTRPCError(Code.UNKNOWN, f"kill {p.name}: {text}")


def read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def _shares_host_pid_ns(bundle: str) -> bool:
    """True unless config.json asks for a new pid namespace (a pid entry without path)."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = json.load(f)
        namespaces = spec.get("linux", {}).get("namespaces", [])
    except (OSError, ValueError, AttributeError):
        return True
    return not any(ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)
