"""Containers and their processes: what the task service keeps about each.

Which lock guards what (the service's own locks are described in service.py):
  * `Process.lock` serialises the operations of one process and guards its lifecycle,
    pid, io and exit status. Start holds it across `runc start`/`runc exec` and the start
    event, and exit processing takes it too, so a process's /tasks/exit can never be
    published before its start event.
  * A container's init lock (`Container.init.lock`) also guards the container's exec
    table (`Container.execs`), `pending_init_exit` and `starting_execs`: the exits thread
    reads the table when the init exits while RPC threads add and delete execs.
  * Lock order: an exec's lock before its init's lock, never the other way round.
"""

from __future__ import annotations

import threading

from shim.linux.cgroups import Cgroup
from shim.runtime.runc import Runc
from shim.runtime.stdio import ProcessIO
from shim.task.state import EXEC, INIT, Lifecycle, Op, State, Table


class Process:
    """What init and exec processes share; `InitProcess` and `ExecProcess` are the two kinds."""

    table: Table

    def __init__(self, container: Container, exec_id: str, stdin: str, stdout: str,
                 stderr: str, terminal: bool) -> None:
        self.container = container
        self.exec_id = exec_id
        self.stdin, self.stdout, self.stderr, self.terminal = stdin, stdout, stderr, terminal
        self.pid = 0
        self.io: ProcessIO | None = None
        self.life = Lifecycle(self.table, self.name)
        self.exit_status = 0
        self.exited_at: float | None = None
        self.exited = threading.Event()
        self.lock = threading.RLock()

    @property
    def id(self) -> str:
        return self.exec_id or self.container.id

    @property
    def name(self) -> str:
        """For messages: 'container c1' or 'exec e1 in container c1'."""
        return f"container {self.container.id}"

    @property
    def state(self) -> State:
        return self.life.state

    def check(self, op: Op) -> None:
        self.life.check(op)

    def apply(self, op: Op) -> State:
        return self.life.apply(op)


class InitProcess(Process):
    """A container's first process: runc creates, starts, pauses and deletes it."""

    table = INIT

    def __init__(self, container: Container, stdin: str, stdout: str, stderr: str,
                 terminal: bool) -> None:
        super().__init__(container, "", stdin, stdout, stderr, terminal)
        self.checkpoint: tuple[str, str] | None = None  # (image, parent) to restore in Start


class ExecProcess(Process):
    """A process added to a running container with `runc exec`."""

    table = EXEC

    def __init__(self, container: Container, exec_id: str, stdin: str, stdout: str,
                 stderr: str, terminal: bool, spec: bytes) -> None:
        super().__init__(container, exec_id, stdin, stdout, stderr, terminal)
        self.spec = spec  # the OCI process JSON runc exec reads

    @property
    def name(self) -> str:
        return f"exec {self.exec_id} in container {self.container.id}"

    @property
    def state(self) -> State:
        """An exec of a paused container is reported paused, as runc-v2 does."""
        own = self.life.state
        init = self.container.init
        if own is State.RUNNING and init is not None and init.state is State.PAUSED:
            return State.PAUSED
        return own


class Container:
    def __init__(self, cid: str, bundle: str, runc: Runc, host_pid_ns: bool) -> None:
        self.id = cid
        self.bundle = bundle
        self.runc = runc
        self.host_pid_ns = host_pid_ns
        self.init: InitProcess | None = None
        self.execs: dict[str, ExecProcess] = {}  # guarded by init.lock
        self.rootfs_mounted = False
        self.cgroup: Cgroup | None = None
        # An init exit waits here while execs are still running or starting, so that the
        # init's /tasks/exit is the container's last one (guarded by init.lock).
        self.pending_init_exit: tuple[int, float] | None = None
        # Execs inside Start(exec), whose pid is not known yet (guarded by init.lock).
        self.starting_execs = 0

    def running_execs(self) -> list[ExecProcess]:
        """Execs started and not yet exited; call with init.lock held."""
        return [p for p in self.execs.values() if p.pid and not p.exited.is_set()]

    def busy(self) -> bool:
        """Whether an exec is running or being started, so the init's exit must wait;
        call with init.lock held."""
        return self.starting_execs > 0 or bool(self.running_execs())
