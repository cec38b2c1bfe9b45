"""The `delete` action: clean up one container whose shim containerd cannot talk to.

containerd runs it after every task teardown (not only after a crash) and waits for
it, so the common case, where the task was deleted properly and nothing is left, must
cost next to nothing: runc runs only when runc still has state for the id, the rootfs
is unmounted only when it is mounted, and the reply is encoded by hand rather than by
importing protobuf. It acts on its own id alone; a grouped shim may still be serving
other containers. When the shim died (SIGKILL, OOM) its socket file is left behind:
that is removed too, but only if nothing listens on it any more.
"""

from __future__ import annotations

import os
import sys
import time

SIGKILL_STATUS = 128 + 9


def delete(namespace: str, cid: str, bundle: str, debug: bool) -> int:
    from shim.runtime.config import RuncConfig

    config = RuncConfig.load(bundle)
    warnings: list[str] = []
    if os.path.exists(os.path.join(config.root, namespace, cid)):
        import subprocess
        argv = config.command(namespace, bundle, "delete", "--force", cid)
        result = subprocess.run(argv, cwd=bundle, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=10)
        if result.returncode != 0:
            warnings.append(f"runc delete --force {cid}: "
                            f"{result.stderr.decode(errors='replace').strip()}")
    rootfs = os.path.join(bundle, "rootfs")
    from shim.linux import mount
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
    _remove_stale_socket(bundle, warnings)
    for w in warnings:
        print(f"delete {cid}: {w}", file=sys.stderr)
    from shim.binary.wire import delete_response
    sys.stdout.buffer.write(delete_response(pid, SIGKILL_STATUS, time.time_ns()))
    sys.stdout.flush()
    return 0


def _remove_stale_socket(bundle: str, warnings: list[str]) -> None:
    """Unlink the socket named by <bundle>/address if no shim listens there (a live
    shim of the group keeps it; after a normal Shutdown it is already gone)."""
    try:
        with open(os.path.join(bundle, "address")) as f:
            address = f.read().strip()
    except OSError:
        return
    path = address.removeprefix("unix://")
    if path == address or not os.path.exists(path):
        return
    import stat

    from shim.binary.address import is_live
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode) and not is_live(path):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        warnings.append(f"removing the dead shim's socket {path}: {e}")
