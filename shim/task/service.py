"""The Task service: containerd's task API (containerd.task.v2.Task) implemented with runc.

The RPC handlers are here; what they keep about containers and processes is in model.py,
the rules of the lifecycle in state.py, and the errors they raise in errors.py (mapped to
ttrpc statuses once, in `methods`).

Concurrency, in one place (the locks of processes and containers: model.py):
  * `_lock` guards the container table (`containers`) and the ids being created. A
    lookup of one id takes no lock (a single dict read is atomic); whatever changes
    the table, or reads it more than once, holds it.
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
from typing import Any as AnyType, Callable, Iterator

from google.protobuf.any_pb2 import Any
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError, Message

from shim.api import events_pb2 as ev
from shim.api import task_pb2 as pb
from shim.api.runc_options_pb2 import CheckpointOptions, ProcessDetails
from shim.api.task_types_pb2 import ProcessInfo
from shim.api.task_types_pb2 import Status as PbStatus
from shim.linux import mount as mounts
from shim.linux.cgroups import Cgroup
from shim.linux.oom import OOMWatcher
from shim.linux.reaper import Reaper
from shim.probe import hooks as probe
from shim.runtime import options
from shim.runtime.config import RuncConfig
from shim.runtime.runc import Runc, RuncError, request_deadline
from shim.runtime.stdio import ProcessIO
from shim.task import confine
from shim.task.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,
                              RuntimeFailed, TaskError, to_status)
from shim.task.events import Publisher, timestamp_of
from shim.task.model import Container, ExecProcess, InitProcess, Process
from shim.task.state import Op, State
from shim.ttrpc import Code, Context

log = logging.getLogger("shim.task.service")

DRAIN_TIMEOUT = 2.0

_STATUS = {State.CREATED: PbStatus.CREATED, State.RUNNING: PbStatus.RUNNING,
           State.PAUSED: PbStatus.PAUSED, State.STOPPED: PbStatus.STOPPED,
           State.DELETED: PbStatus.STOPPED}


@contextmanager
def runtime_failure(what: str) -> Iterator[None]:
    """Turn a failed runc call or system call into RuntimeFailed naming the operation."""
    try:
        yield
    except RuncError as e:
        raise RuntimeFailed(f"{what}: {e}") from None
    except OSError as e:
        raise RuntimeFailed(f"{what}: {e.strerror or e}") from None


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
        self._creating: set[str] = set()
        self._lock = threading.Lock()  # guards `containers`, `_creating`, `_shutdown_asked`
        self._shutdown_asked = False  # a Shutdown came
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
            raise NotFound(f"container {cid}")
        return c

    def _init(self, cid: str) -> InitProcess:
        init = self._container(cid).init
        assert init is not None  # set before the container is listed
        return init

    def _process(self, cid: str, exec_id: str) -> Process:
        c = self._container(cid)
        if not exec_id:
            assert c.init is not None
            return c.init
        p = c.execs.get(exec_id)
        if p is None:
            raise NotFound(f"exec {exec_id} in container {cid}")
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
            if isinstance(p, InitProcess):
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
        if isinstance(p, ExecProcess):
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
        p.apply(Op.EXIT)
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
            raise InvalidArgument(f"create: invalid container id {cid!r}")
        confine.check_create(req, self.bundle_parent)  # bundle, mount targets, stdio
        bundle = os.path.realpath(req.bundle)
        with self._lock:
            if cid in self.containers or cid in self._creating:
                raise AlreadyExists(f"container {cid}")
            # Reserve the id while runc works, so a second Create for it fails fast.
            self._creating.add(cid)
        try:
            c = self._create(req, bundle)
        except BaseException:
            with self._lock:
                self._creating.discard(cid)
                # containerd gave up on this Create (its deadline) and asked the shim to
                # shut down meanwhile: nobody will ask again.
                abandoned = self._shutdown_asked and not self.containers and not self._creating
            if abandoned:
                self.request_shutdown()
            raise
        with self._lock:
            self._creating.discard(cid)
            self.containers[cid] = c
        assert c.init is not None
        return pb.CreateTaskResponse(pid=c.init.pid)

    def _create(self, req: pb.CreateTaskRequest, bundle: str) -> Container:
        """Mount the rootfs, runc create, publish /tasks/create; the container is listed
        only once this returns."""
        cid = req.id
        try:
            config = options.decode(req.options.type_url, req.options.value,
                                    f"create {cid}").runc
        except (DecodeError, ValueError) as e:
            raise InvalidArgument(f"create {cid}: options: {e}") from None
        with runtime_failure(f"create {cid}: saving runtime options"):
            config.save(bundle)
        runc = Runc(self.reaper, config, self.namespace, bundle)
        c = Container(cid, bundle, runc, host_pid_ns=_shares_host_pid_ns(bundle))
        init = c.init = InitProcess(c, req.stdin, req.stdout, req.stderr, req.terminal)
        rootfs = os.path.join(bundle, "rootfs")
        if req.rootfs:
            os.makedirs(rootfs, mode=0o711, exist_ok=True)
            with runtime_failure(f"create {cid}: mounting rootfs"):
                mounts.mount_all([mounts.Mount(m.type, m.source, list(m.options), m.target)
                                  for m in req.rootfs], rootfs)
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
                    runc.create(cid, pid_file, init.io.runc_stdio, init.io.console_socket,
                                running=init.io.begin)
                    init.pid = read_pid(pid_file)
                    init.io.started()
                    early = self._watch(init)
        except (OSError, RuncError) as e:
            if init.io is not None:
                init.io.close()
            if c.rootfs_mounted:
                mounts.unmount_all(rootfs)
            if isinstance(e, RuncError):
                raise RuntimeFailed(f"OCI runtime create failed: {e}") from None
            raise RuntimeFailed(f"create {cid}: {e}") from None
        self.publisher.publish("/tasks/create", ev.TaskCreate(
            container_id=cid, bundle=bundle, rootfs=req.rootfs,
            io=ev.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                         terminal=req.terminal),
            checkpoint=req.checkpoint, pid=init.pid))
        if init.pid:
            # Watched from Create, not from Start: a process that runs out of memory at
            # once would do so before Start had registered the watch, and go unreported.
            self._watch_oom(c)
        if early is not None:
            self._handle_exit(init, *early)
        log.debug("created container %s (pid %d)", cid, init.pid)
        return c

    def Start(self, req: pb.StartRequest, ctx: Context) -> pb.StartResponse:
        p = self._process(req.id, req.exec_id)
        with p.lock:
            p.check(Op.START)
            if isinstance(p, InitProcess):
                self._start_init(p)
            else:
                assert isinstance(p, ExecProcess)
                self._start_exec(p)
        return pb.StartResponse(pid=p.pid)

    def _start_init(self, p: InitProcess) -> None:
        """runc start (or restore); call with p.lock held."""
        c = p.container
        early = None
        if p.checkpoint:
            early = self._restore(p)
            self._watch_oom(c)  # restored: its cgroup exists only now
        else:
            try:
                c.runc.start(c.id)
            except RuncError as e:
                raise RuntimeFailed(f"OCI runtime start failed: {e}") from None
        p.apply(Op.START)
        self.publisher.publish("/tasks/start", ev.TaskStart(container_id=c.id, pid=p.pid))
        if early is not None:
            self._handle_exit(p, *early)

    def _start_exec(self, p: ExecProcess) -> None:
        """runc exec; call with p.lock held."""
        c = p.container
        init = c.init
        assert init is not None
        with init.lock:
            # Once init is reaped (even while its exit waits for running execs) no exec
            # may start; one that is starting holds the init's exit back until it is done.
            if c.pending_init_exit is not None or init.state is not State.RUNNING:
                state = "stopped" if c.pending_init_exit is not None else init.state.value
                raise FailedPrecondition(f"cannot start {p.name}: the container's init "
                                         f"process is {state}")
            c.starting_execs += 1
        pid_file = os.path.join(c.bundle, f"{p.exec_id}.pid")
        spec_path = ""
        early = None
        try:
            fd, spec_path = tempfile.mkstemp(prefix="runc-process")
            with os.fdopen(fd, "wb") as f:
                f.write(p.spec)
            p.io = self._open_io(p, c.runc.config)
            with self._launch():
                c.runc.exec(c.id, spec_path, pid_file, p.io.runc_stdio, p.io.console_socket,
                            running=p.io.begin)
                p.pid = read_pid(pid_file)
                p.io.started()
                p.apply(Op.START)
                self.publisher.publish("/tasks/exec-started", ev.TaskExecStarted(
                    container_id=c.id, exec_id=p.exec_id, pid=p.pid))
                early = self._watch(p)
        except (OSError, RuncError) as e:
            if p.io is not None:
                p.io.close()
                p.io = None
            raise RuntimeFailed(f"OCI runtime exec failed: {e}") from None
        finally:
            if spec_path:
                os.unlink(spec_path)
            with init.lock:
                c.starting_execs -= 1  # running now (p.pid is set), or failed
            self._finish_pending_init(c)
        if early is not None:
            self._handle_exit(p, *early)

    def _watch_oom(self, c: Container) -> None:
        if c.cgroup is None and c.init is not None and c.init.pid:
            try:
                c.cgroup = Cgroup.for_pid(c.init.pid)
            except (OSError, ValueError) as e:
                log.warning("container %s: cannot find its cgroup: %s", c.id, e)
        if c.cgroup is None:
            return
        try:
            self.oom.add(c.id, c.cgroup)
        except (OSError, ValueError) as e:
            log.warning("container %s: no OOM notifications: %s", c.id, e)

    def _oom(self, cid: str) -> None:
        log.info("container %s: out of memory", cid)
        self.publisher.publish("/tasks/oom", ev.TaskOOM(container_id=cid))

    def _restore(self, p: InitProcess) -> tuple[int, float] | None:
        """runc restore; returns the restored init's exit if it already happened."""
        c = p.container
        assert p.io is not None and p.checkpoint is not None
        image, parent = p.checkpoint
        work = os.path.join(c.bundle, "work", "criu-work")
        pid_file = os.path.join(c.bundle, "init.pid")
        with runtime_failure(f"restore container {c.id}"), self._launch():
            c.runc.restore(c.id, image, work, pid_file, p.io.runc_stdio, parent,
                           p.io.console_socket)
            p.pid = read_pid(pid_file)
            p.io.started()
            early = self._watch(p)
        p.checkpoint = None
        return early

    def Checkpoint(self, req: pb.CheckpointTaskRequest, ctx: Context) -> Empty:
        p = self._init(req.id)
        c = p.container
        opts = CheckpointOptions()
        if req.options.type_url.endswith("containerd.runc.v1.CheckpointOptions"):
            try:
                opts = CheckpointOptions.FromString(req.options.value)
            except DecodeError as e:
                raise InvalidArgument(f"checkpoint container {c.id}: options: {e}") from None
        image = req.path or opts.image_path
        if not image:
            raise InvalidArgument(f"checkpoint container {c.id}: no image path")
        work = opts.work_path or os.path.join(c.bundle, "work", "criu-work")
        with p.lock:
            p.check(Op.CHECKPOINT)
            try:
                c.runc.checkpoint(c.id, image, work, leave_running=not opts.exit,
                                  tcp_established=opts.open_tcp,
                                  ext_unix_sk=opts.external_unix_sockets,
                                  shell_job=opts.terminal or p.terminal,
                                  file_locks=opts.file_locks, cgroups_mode=opts.cgroups_mode,
                                  empty_ns=list(opts.empty_namespaces))
            except RuncError as e:
                raise RuntimeFailed(f"checkpoint container {c.id} failed: "
                                    f"{_keep_criu_log(str(e), work, c.bundle)}") from None
            finally:
                if not opts.work_path:
                    shutil.rmtree(work, ignore_errors=True)
        return Empty()

    def _open_io(self, p: Process, config: RuncConfig) -> ProcessIO:
        return ProcessIO(p.name, p.stdin, p.stdout, p.stderr, terminal=p.terminal,
                         uid=config.io_uid, gid=config.io_gid, spawn=self.reaper.spawn,
                         ids=(p.container.id, p.exec_id),
                         env={"CONTAINER_ID": p.container.id,
                              "CONTAINER_NAMESPACE": self.namespace})

    def Delete(self, req: pb.DeleteRequest, ctx: Context) -> pb.DeleteResponse:
        p = self._process(req.id, req.exec_id)
        if isinstance(p, InitProcess):
            self._delete_init(p)
        else:
            assert isinstance(p, ExecProcess)
            self._delete_exec(p)
        return pb.DeleteResponse(pid=p.pid, exit_status=p.exit_status,
                                 exited_at=timestamp_of(p.exited_at))

    def _delete_init(self, p: InitProcess) -> None:
        c = p.container
        with p.lock:
            p.check(Op.DELETE)
            if c.running_execs():
                raise FailedPrecondition(f"cannot delete {p.name}: execs are still running")
            self._unwatch(p)
            try:
                c.runc.delete(c.id)
            except RuncError as e:
                if "not exist" not in str(e):
                    raise RuntimeFailed(f"delete {c.id}: {e}") from None
            if p.io is not None:
                p.io.wait_read()  # the client closes its FIFOs once Delete returns
                p.io.close()
            p.apply(Op.DELETE)
            execs = list(c.execs.values())
        for exec_process in execs:
            if exec_process.io is not None:
                exec_process.io.close()
        if c.rootfs_mounted:
            try:
                mounts.unmount_all(os.path.join(c.bundle, "rootfs"))
            except OSError as err:
                log.warning("delete %s: unmounting rootfs: %s", c.id, err)
        self.oom.remove(c.id)
        with self._lock:
            self.containers.pop(c.id, None)
        self.publisher.publish("/tasks/delete", ev.TaskDelete(
            container_id=c.id, pid=p.pid, exit_status=p.exit_status,
            exited_at=timestamp_of(p.exited_at)))
        log.debug("deleted container %s", c.id)

    def _delete_exec(self, p: ExecProcess) -> None:
        c = p.container
        init = c.init
        assert init is not None
        with p.lock:
            p.check(Op.DELETE)
            self._unwatch(p)
            try:
                os.unlink(os.path.join(c.bundle, f"{p.exec_id}.pid"))
            except OSError:
                pass
            if p.io is not None:
                p.io.wait_read()  # the client closes its FIFOs once Delete returns
                p.io.close()
            p.apply(Op.DELETE)
            with init.lock:  # the exec table's guard (model.py)
                c.execs.pop(p.exec_id, None)

    def Exec(self, req: pb.ExecProcessRequest, ctx: Context) -> Empty:
        if not req.exec_id or "/" in req.exec_id:
            raise InvalidArgument(f"exec in container {req.id}: invalid exec id {req.exec_id!r}")
        confine.check_exec(req)  # its stdio
        init = self._init(req.id)
        c = init.container
        try:
            spec = json.loads(req.spec.value or b"{}")
        except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
            raise InvalidArgument(f"exec {req.exec_id}: process spec is not JSON: {e}") from None
        if not isinstance(spec, dict):
            raise InvalidArgument(f"exec {req.exec_id}: the process spec is not a JSON object")
        spec["terminal"] = req.terminal
        with init.lock:
            init.check(Op.EXEC)  # a stopped or paused init is refused here
            if req.exec_id in c.execs:
                raise AlreadyExists(f"exec {req.exec_id} in container {c.id}")
            c.execs[req.exec_id] = ExecProcess(c, req.exec_id, req.stdin, req.stdout, req.stderr,
                                               req.terminal, json.dumps(spec).encode())
        self.publisher.publish("/tasks/exec-added",
                               ev.TaskExecAdded(container_id=c.id, exec_id=req.exec_id))
        return Empty()

    def State(self, req: pb.StateRequest, ctx: Context) -> pb.StateResponse:
        p = self._process(req.id, req.exec_id)
        return pb.StateResponse(
            id=p.id, bundle=p.container.bundle, pid=p.pid, status=_STATUS[p.state],
            stdin=p.stdin, stdout=p.stdout, stderr=p.stderr, terminal=p.terminal,
            exit_status=p.exit_status, exited_at=timestamp_of(p.exited_at))

    def Kill(self, req: pb.KillRequest, ctx: Context) -> Empty:
        p = self._process(req.id, req.exec_id)
        c = p.container
        if isinstance(p, InitProcess):
            with p.lock:
                p.check(Op.KILL)
            try:
                c.runc.kill(c.id, req.signal, all=req.all)
            except RuncError as e:
                raise kill_error(p, str(e)) from None
            return Empty()
        with p.lock:
            p.check(Op.KILL)
            try:
                os.kill(p.pid, req.signal)
            except ProcessLookupError:
                raise NotFound(f"{p.name}: process already finished") from None
            except (OverflowError, ValueError, OSError):  # EINVAL: no such signal
                raise InvalidArgument(f"kill {p.name}: invalid signal {req.signal}") from None
        return Empty()

    def Pids(self, req: pb.PidsRequest, ctx: Context) -> pb.PidsResponse:
        c = self._container(req.id)
        if c.init is not None and c.init.exited.is_set():
            # runc lists no process for a stopped container, but containerd 1.7+ tears down
            # a reloaded task whose Pids is empty (taking it for a shim that never created
            # one): a container that exited while containerd was away would lose its exit
            # status. Its init stays listed until Delete.
            return pb.PidsResponse(processes=[ProcessInfo(pid=c.init.pid)])
        with runtime_failure(f"pids of container {c.id}"):
            pids = c.runc.ps(c.id)
        assert c.init is not None
        with c.init.lock:
            by_pid = {p.pid: p.exec_id for p in c.execs.values() if p.pid}
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
        return self._pause_or_resume(req.id, Op.PAUSE, Runc.pause, "/tasks/paused", ev.TaskPaused)

    def Resume(self, req: pb.ResumeRequest, ctx: Context) -> Empty:
        return self._pause_or_resume(req.id, Op.RESUME, Runc.resume, "/tasks/resumed",
                                     ev.TaskResumed)

    def _pause_or_resume(self, cid: str, op: Op, run: Callable[[Runc, str], None], topic: str,
                         event: Callable[..., Message]) -> Empty:
        """runc first, then the state: it changes only once runc succeeded."""
        p = self._init(cid)
        with p.lock:
            p.check(op)
            with runtime_failure(f"{op.value} container {p.container.id}"):
                run(p.container.runc, p.container.id)
            p.apply(op)
            self.publisher.publish(topic, event(container_id=p.container.id))
        return Empty()

    def Update(self, req: pb.UpdateTaskRequest, ctx: Context) -> Empty:
        p = self._init(req.id)
        with p.lock:
            p.check(Op.UPDATE)
            with runtime_failure(f"update container {req.id}"):
                p.container.runc.update(p.container.id, req.resources.value or b"{}")
        return Empty()

    def ResizePty(self, req: pb.ResizePtyRequest, ctx: Context) -> Empty:
        p = self._process(req.id, req.exec_id)
        p.check(Op.RESIZE)  # unlocked: a resize must not wait for an exit's output to drain
        if p.io is not None:
            with runtime_failure(f"resize {p.name}"):
                p.io.resize(req.width, req.height)
        return Empty()

    def Stats(self, req: pb.StatsRequest, ctx: Context) -> pb.StatsResponse:
        c = self._container(req.id)
        if c.cgroup is None:
            raise NotFound(f"container {c.id}: cgroup does not exist")
        try:
            return pb.StatsResponse(stats=c.cgroup.metrics())
        except FileNotFoundError:
            raise NotFound(f"container {c.id}: cgroup does not exist") from None

    def Wait(self, req: pb.WaitRequest, ctx: Context) -> pb.WaitResponse:
        p = self._process(req.id, req.exec_id)
        p.exited.wait()
        return pb.WaitResponse(exit_status=p.exit_status, exited_at=timestamp_of(p.exited_at))

    def Connect(self, req: pb.ConnectRequest, ctx: Context) -> pb.ConnectResponse:
        c = self.containers.get(req.id)
        if c is None and self._forgotten():
            raise NotFound(f"container {req.id}")
        task_pid = c.init.pid if c is not None and c.init is not None else 0
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=task_pid)

    def _forgotten(self) -> bool:
        """A restarted containerd connects to a shim that holds no container at all: it was
        started for a Create that never came (containerd died in between). Nobody will ask it
        for anything: it shuts down, and containerd, told NotFound, cleans up the bundle."""
        with self._lock:
            if self.containers or self._creating:
                return False
        self.request_shutdown()
        return True

    def Shutdown(self, req: pb.ShutdownRequest, ctx: Context) -> Empty:
        with self._lock:
            idle = not self.containers and not self._creating
            self._shutdown_asked = True
        if idle:
            self.request_shutdown()
        return Empty()

    def methods(self) -> dict[str, tuple[type[Message], Callable[[AnyType, Context], Message]]]:
        """The method table for the ttrpc server; methods not here answer Unimplemented."""
        table: dict[str, type[Message]] = {
            "Create": pb.CreateTaskRequest, "Start": pb.StartRequest,
            "Delete": pb.DeleteRequest, "Exec": pb.ExecProcessRequest,
            "State": pb.StateRequest, "Kill": pb.KillRequest, "Pids": pb.PidsRequest,
            "CloseIO": pb.CloseIORequest, "Pause": pb.PauseRequest,
            "Resume": pb.ResumeRequest, "Update": pb.UpdateTaskRequest,
            "ResizePty": pb.ResizePtyRequest, "Wait": pb.WaitRequest,
            "Connect": pb.ConnectRequest, "Shutdown": pb.ShutdownRequest,
            "Checkpoint": pb.CheckpointTaskRequest, "Stats": pb.StatsRequest,
        }
        return {name: (req_type, _boundary(name, getattr(self, name)))
                for name, req_type in table.items()}


def _boundary(name: str, handler: Callable[[AnyType, Context], Message]
              ) -> Callable[[AnyType, Context], Message]:
    """The RPC boundary: domain errors become ttrpc statuses here and nowhere else. A
    failure is logged with the operation and the process it concerns, and, at debug level
    (`-debug`), every call with its duration."""
    def call(req: AnyType, ctx: Context) -> Message:
        start = time.monotonic()
        deadline = request_deadline.set(ctx.deadline)  # bounds the runc commands of the call
        try:
            return handler(req, ctx)
        except TaskError as e:
            # NotFound is routine: containerd kills and deletes what may be gone already.
            level = logging.DEBUG if e.code == Code.NOT_FOUND else logging.WARNING
            log.log(level, "%s %s failed: %s (%s)", name, _target(req), e.message, e.code.name)
            raise to_status(e) from None
        finally:
            request_deadline.reset(deadline)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s: %.1f ms", name, _target(req), (time.monotonic() - start) * 1e3)
    return call


def _target(req: AnyType) -> str:
    target: str = getattr(req, "id", "")
    if getattr(req, "exec_id", ""):
        target += f" exec {req.exec_id}"
    return target


# -- helpers ------------------------------------------------------------------------------


def kill_error(p: Process, text: str) -> TaskError:
    """Classify runc kill's error the way containerd expects (NotFound when gone)."""
    low = text.lower()
    if any(s in low for s in ("process already finished", "container not running",
                              "no such process")):
        return NotFound(f"{p.name}: process already finished")
    if "does not exist" in low:
        return NotFound(f"{p.name}: no such container")
    return RuntimeFailed(f"kill {p.name}: {text}")


def _keep_criu_log(text: str, work: str, bundle: str) -> str:
    """Keep criu's log where an operator looks: runc's message names the log in the work
    directory, which is about to go, so name the copy instead."""
    dump_log = os.path.join(work, "dump.log")
    kept = os.path.join(bundle, "criu-dump.log")
    if os.path.exists(dump_log):
        shutil.copyfile(dump_log, kept)
        text = text.replace(dump_log, kept)
        if kept not in text:
            text += f" (criu log: {kept})"
    return text


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
