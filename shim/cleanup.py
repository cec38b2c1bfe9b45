"""The `delete` action: clean up one container whose shim containerd cannot talk to.

containerd runs it after every task teardown (not only after a crash) and waits for
it, so the common case, where the task was deleted properly and nothing is left, must
cost no runc call: runc runs only when runc still has state for the id, and the rootfs
is unmounted only when it is mounted. It acts on its own id alone; a grouped shim may
still be serving other containers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

SIGKILL_STATUS = 128 + 9


def delete(namespace: str, cid: str, bundle: str, debug: bool) -> int:
    from shim import mount
    from shim.runc import RuncConfig

    config = RuncConfig.load(bundle)
    warnings: list[str] = []
    if os.path.exists(os.path.join(config.root, namespace, cid)):
        argv = config.command(namespace, bundle, "delete", "--force", cid)
        result = subprocess.run(argv, cwd=bundle,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, timeout=10)
        if result.returncode != 0:
            warnings.append(f"runc delete --force {cid}: "
                            f"{result.stderr.decode(errors='replace').strip()}")
    rootfs = os.path.join(bundle, "rootfs")
    try:
        if mount.is_mounted(rootfs):
            mount.unmount_all(rootfs)
    except OSError as e:
        warnings.append(f"unmount {rootfs}: {e}")
    pid = 0
    try:
        with open(os.path.join(bundle, "init.pid")) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        pass
    for w in warnings:
        print(f"delete {cid}: {w}", file=sys.stderr)
    sys.stdout.buffer.write(delete_response(pid, SIGKILL_STATUS, time.time()))
    sys.stdout.flush()
    return 0


def delete_response(pid: int, exit_status: int, when: float) -> bytes:
    from shim.api.task_pb2 import DeleteResponse
    from shim.events import timestamp_of

    return DeleteResponse(pid=pid, exit_status=exit_status,
                          exited_at=timestamp_of(when)).SerializeToString()
