"""The proxy's `delete`: the target's `delete`, and whatever the proxy's death left behind.

containerd runs `delete` after every teardown and whenever it lost its shim. When it lost
the proxy but the target still runs, the target would serve its container forever (no
containerd ever talks to it again), so `delete` first stops this container in the target
through its task API: Kill, Wait, Delete, Shutdown (Shutdown is a no-op while the target
serves other containers of a group). Then it runs the target's own `delete` and passes its
output on unchanged, and removes the proxy's sockets if nothing listens on them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from google.protobuf.message import Message

from shim.binary import address
from shim.proxy import record, target
from shim.proxy.target import State

STOP_TIMEOUT = 3.0
TASK_SERVICES = ("containerd.task.v2.Task", "containerd.task.v3.Task")


def delete(argv: list[str], flags: dict[str, str | bool], namespace: str, cid: str, bundle: str) -> int:
    trace = record.open_trace(dict(os.environ))
    began = time.monotonic()
    state = target.read_state(bundle)
    if state is None:  # `start` never got that far: the target the configuration names
        binary = target.resolve(target.configured(target.annotations_of(bundle), dict(os.environ)),
                                str(flags.get("publish-binary", ""))).binary
    else:
        binary = state.target_binary
        proxy_path = state.proxy_address.removeprefix("unix://")
        target_path = state.target_address.removeprefix("unix://")
        if not address.is_live(proxy_path) and address.is_live(target_path):
            stopped = stop_in_target(target_path, namespace, cid)
            if trace is not None:
                record.phase(trace, "stop-orphaned-target", cid, {"steps": stopped})
    result = subprocess.run([binary, *argv], cwd=bundle, stdin=subprocess.DEVNULL, capture_output=True)
    if state is not None:
        _remove_stale(state, _target_debug_socket(state, str(flags.get("address", "")), namespace,
                                                  address.group_id(bundle, cid)))
    if trace is not None:
        record.phase(trace, "target-delete", cid, {"binary": binary, "exit_status": result.returncode,
                                                   "duration": time.monotonic() - began}, ts=began)
    sys.stderr.buffer.write(result.stderr)
    sys.stdout.buffer.write(result.stdout)
    return result.returncode


def stop_in_target(target_path: str, namespace: str, cid: str) -> list[str]:
    """Kill, wait for, delete and shut down container `cid` in the target; what each step said."""
    from shim.api import task_pb2 as pb
    from shim.ttrpc import Client, TTRPCError, Code
    from google.protobuf.empty_pb2 import Empty

    steps: list[str] = []
    metadata = {"containerd-namespace-ttrpc": namespace}
    try:
        client = Client(target_path, connect_timeout=STOP_TIMEOUT)
    except OSError as e:
        return [f"connect: {e}"]
    with client:
        service = TASK_SERVICES[0]

        def call(method: str, req: Message, resp_type: type[Message],
                 timeout: float = STOP_TIMEOUT) -> None:
            nonlocal service
            for attempt in (0, 1):
                try:
                    client.call(service, method, req, resp_type, timeout=timeout, metadata=metadata)
                    steps.append(f"{method}: ok")
                    return
                except TTRPCError as e:
                    if e.code == Code.UNIMPLEMENTED and attempt == 0 and service == TASK_SERVICES[0]:
                        service = TASK_SERVICES[1]  # a shim that serves only task v3
                        continue
                    steps.append(f"{method}: {e.code.name} {e.message}")
                    return

        call("Kill", pb.KillRequest(id=cid, signal=9, all=True), Empty)
        call("Wait", pb.WaitRequest(id=cid), pb.WaitResponse)
        call("Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)
        call("Shutdown", pb.ShutdownRequest(id=cid), Empty)
    return steps


def _target_debug_socket(state: State, containerd_address: str, namespace: str, group: str) -> str:
    """Where runc-v2 started with -debug (containerd at debug level) also listens: its own
    socket's name with "/debug" appended to what is hashed. Its `delete` removes only the
    main socket, so a target that was killed leaves this one (seen with containerd 2.1)."""
    directory = os.path.dirname(state.target_address.removeprefix("unix://"))
    return address.socket_path(containerd_address, namespace, os.path.join(group, "debug"),
                               directory)


def _remove_stale(state: State, *more: str) -> None:
    for path in (state.proxy_address.removeprefix("unix://"), state.events_socket,
                 state.target_address.removeprefix("unix://"), *more):  # a dead target's too
        try:
            if os.path.exists(path) and not address.is_live(path):
                os.unlink(path)
        except OSError:
            pass
