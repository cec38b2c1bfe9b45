"""`containerd-shim-pyshimproxy-v1 [flags] start|delete`: the proxy's binary contract.

`start` runs the target's `start` with the same flags, stdin, cwd and environment, except
TTRPC_ADDRESS, which names the proxy's events socket; takes the address the target printed
(and wrote to the bundle's `address`), keeps it in the proxy's state file, writes the
proxy's own address to `address` instead, makes sure a proxy daemon serves that target,
and prints what the target printed with the proxy's address in it. `delete` runs the
target's `delete` and passes its DeleteResponse on, after stopping a target whose proxy
died (nothing else would ever tell it to go).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from shim import VERSION
from shim.binary import address
from shim.binary.cli import UsageError, parse
from shim.proxy import PROXY_BINARY, PROXY_RUNTIME, record, target
from shim.proxy.target import State, TargetError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags, args = parse(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    if flags.get("v") or flags.get("version"):
        print(f"{PROXY_BINARY}:\n  Runtime: {PROXY_RUNTIME}\n  Version: {VERSION}\n"
              f"  Python: {sys.version.split()[0]}")
        return 0
    action = args[0] if args else ""
    namespace, cid = str(flags.get("namespace", "")), str(flags.get("id", ""))
    if action in ("start", "delete") and (not namespace or not cid):
        print(f"{action}: -namespace and -id are required", file=sys.stderr)
        return 2
    try:
        if action == "start":
            return start(argv, flags, namespace, cid)
        if action == "delete":
            from shim.proxy.cleanup import delete
            return delete(argv, flags, namespace, cid, str(flags.get("bundle") or os.getcwd()))
    except TargetError as e:
        print(f"{PROXY_RUNTIME}: {e}", file=sys.stderr)
        return 1
    print(f"unknown action {action!r}: expected start or delete", file=sys.stderr)
    return 2


def start(argv: list[str], flags: dict[str, str | bool], namespace: str, cid: str) -> int:
    bundle = os.getcwd()
    stdin = _read_stdin()
    trace = record.open_trace(dict(os.environ))
    if trace is not None:
        record.phase(trace, "proxy-start", cid)
    chosen = target.resolve(target.configured(target.annotations_of(bundle), dict(os.environ)),
                            str(flags.get("publish-binary", "")))
    from shim.binary.wire import bootstrap_socket_dir, is_bootstrap_params
    socket_dir = (bootstrap_socket_dir(stdin) if is_bootstrap_params(stdin, namespace, cid) else "") \
        or address.SOCKET_DIR
    containerd_address = str(flags.get("address", ""))
    # The events socket must exist before the target starts (it may connect at once). It is
    # named after this container; it serves only if this start makes a new target daemon.
    events_path = address.socket_path(containerd_address, namespace, cid + "#pyshimproxy-events",
                                      socket_dir)
    events_listener = address.listen(events_path)
    serving = False  # whether a daemon of this start serves events_path
    try:
        env = dict(os.environ, TTRPC_ADDRESS=events_path)
        began = time.monotonic()
        result = subprocess.run([chosen.binary, *argv], cwd=bundle, input=stdin, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if trace is not None:
            record.phase(trace, "target-start", cid, {"binary": chosen.binary, "exit_status": result.returncode,
                                                      "duration": time.monotonic() - began}, ts=began)
        if result.returncode != 0:
            sys.stdout.buffer.write(result.stdout)  # containerd shows it as the reason
            return result.returncode
        output = target.parse_start_output(result.stdout)
        proxy_path = address.socket_path(output.address, "pyshimproxy", "", socket_dir)
        proxy_address = "unix://" + proxy_path
        state = State(chosen.runtime, chosen.binary, output.address, proxy_address, events_path)
        target.write_state(bundle, state)
        listener = address.listen(proxy_path)
        address.write_address_file(bundle, proxy_address)
        if listener is not None:  # a new target: a proxy daemon of its own
            if os.fork() == 0:
                from shim.proxy import daemon
                daemon.run(listener, events_listener, state,
                           os.environ.get("TTRPC_ADDRESS", ""), namespace, cid, bool(flags.get("debug")))
            serving = True
            listener.close()
    finally:
        if events_listener is not None:
            events_listener.close()
            if not serving:  # the target failed, or joined a group whose proxy already serves it
                _unlink(events_path)
    sys.stdout.write(output.with_address(proxy_address))
    sys.stdout.flush()
    return 0


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _read_stdin() -> bytes:
    try:
        if os.isatty(0):
            return b""
        return sys.stdin.buffer.read()
    except (OSError, ValueError):
        return b""


def run() -> None:
    """`main` for the installed binary (console script `containerd-shim-pyshimproxy-v1`)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
