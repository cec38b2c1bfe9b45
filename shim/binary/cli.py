"""The binary contract: `containerd-shim-pyshim-v1 [flags] start|delete`, `-v`.

containerd runs the binary with Go-style flags (single dash, value as the next word or
after `=`), the bundle as cwd, and reads `start`'s combined stdout+stderr to EOF: so
nothing but the address may be written there, and the daemon must not keep that pipe.
Imports are deferred to the action that needs them: `start` and `delete` are on the
critical path of every container.
"""

from __future__ import annotations

import os
import sys

from shim import RUNTIME, VERSION

BOOL_FLAGS = {"debug", "v", "version", "info"}
VALUE_FLAGS = {"namespace", "address", "publish-binary", "id", "bundle", "socket",
               "debug-socket", "containerd-binary"}


class UsageError(Exception):
    pass


def parse(argv: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    """Go `flag` parsing: flags end at the first non-flag word or at `--`."""
    flags: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in BOOL_FLAGS:
            flags[name] = value.lower() not in ("false", "0") if eq else True
        elif name in VALUE_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
            flags[name] = value
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    return flags, argv[i:]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags, args = parse(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    if flags.get("v") or flags.get("version"):
        print(f"containerd-shim-pyshim-v1:\n  Runtime: {RUNTIME}\n  Version: {VERSION}\n"
              f"  Python: {sys.version.split()[0]}")
        return 0
    if flags.get("info"):  # containerd 2.x: options Any on stdin, RuntimeInfo on stdout
        from shim.binary.info import runtime_info
        try:
            sys.stdout.buffer.write(runtime_info(_read_stdin(), RUNTIME, VERSION))
        except ValueError as e:
            print(f"info: {e}", file=sys.stderr)
            return 1
        sys.stdout.flush()
        return 0
    action = args[0] if args else ""
    namespace = str(flags.get("namespace", ""))
    cid = str(flags.get("id", ""))
    if action in ("start", "delete") and (not namespace or not cid):
        print(f"{action}: -namespace and -id are required", file=sys.stderr)
        return 2
    if action == "start":
        return start(flags, namespace, cid)
    if action == "delete":
        from shim.binary.cleanup import delete
        phase("delete.begin", cid)
        code = delete(namespace, cid, str(flags.get("bundle") or os.getcwd()),
                      bool(flags.get("debug")))
        phase("delete.end", cid, code)
        return code
    print(f"unknown action {action!r}: expected start or delete", file=sys.stderr)
    return 2


def start(flags: dict[str, str | bool], namespace: str, cid: str) -> int:
    """Listen, write the address file, fork the daemon and print the address.

    Only what containerd must wait for happens here; the daemon does the rest (options,
    cgroup, OOM score, logging) before it serves its first request. Errors go to stderr,
    which containerd shows as the reason `start` failed.
    """
    from shim.binary import address

    phase("start.begin", cid)
    bundle = os.getcwd()
    stdin = _read_stdin()
    socket_dir = ""
    from shim.binary.wire import bootstrap_socket_dir, is_bootstrap_params
    if is_bootstrap_params(stdin, namespace, cid):  # containerd 2.3+
        socket_dir = bootstrap_socket_dir(stdin)
    containerd_address = str(flags.get("address", ""))
    path = address.socket_path(containerd_address, namespace,
                               address.group_id(bundle, cid), socket_dir or address.SOCKET_DIR)
    addr = "unix://" + path
    listener = address.listen(path)
    address.write_address_file(bundle, addr)
    phase("start.address", cid, addr)
    if listener is None:  # a shim of this group is running: containerd joins it
        phase("start.end", cid, "joined")
        _print(addr)
        return 0
    from shim.binary import zygote
    debug, containerd_pid = bool(flags.get("debug")), os.getppid()
    request = (bundle, dict(os.environ), debug, namespace, cid, stdin, containerd_pid)
    if zygote.handoff(containerd_address, listener, request):
        phase("start.end", cid, "zygote")
    else:
        if os.fork() == 0:
            from shim.binary import daemon
            daemon.run(listener.fileno(), debug, namespace, cid, bundle, stdin, containerd_pid)
        phase("start.end", cid, "forked")
        zygote.spawn(containerd_address)  # for the next start
    listener.close()
    _print(addr)
    return 0


def phase(name: str, cid: str, detail: object = None) -> None:
    """Trace a phase of `start` or `delete` when PYSHIM_TRACE (shim.probe.points.TRACE_ENV,
    not imported: these actions stay lean) names a trace file; nothing otherwise."""
    path = os.environ.get("PYSHIM_TRACE")
    if not path:
        return
    from shim.probe import trace
    try:
        tracer = trace.TRACER or trace.enable(path)
    except OSError:
        return  # the daemon logs why it cannot trace; start must not fail for it
    if detail is None:
        tracer.record("phase", cid, name=name)
    else:
        tracer.record("phase", cid, name=name, detail=detail)


def _read_stdin() -> bytes:
    try:
        if os.isatty(0):
            return b""
        return sys.stdin.buffer.read()
    except (OSError, ValueError):
        return b""


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run() -> None:
    """`main` for the installed binary: exits without the interpreter's own clean-up
    (module teardown, a last garbage collection), about 1 ms of every `start` and
    `delete` that containerd waits for. Nothing needs it: the output is flushed here,
    and no action leaves a thread or an atexit handler behind."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if not sys.flags.no_site:  # run through an installer's console script, not the launcher
        _upgrade_launcher()
    os._exit(code)


def _upgrade_launcher() -> None:
    """Replace the console script this run came through with the fast launcher, once
    (shim/binary/launcher.py). What prevents it is reported: to the bundle's log for
    `start` and `delete` (their output is containerd's to parse), else to stderr."""
    from shim.binary import launcher
    problem = launcher.upgrade(sys.argv[0])
    if problem is None:
        return
    try:
        _, args = parse(sys.argv[1:])
    except UsageError:
        args = []
    if args[:1] in (["start"], ["delete"]):
        from shim.binary import log as shimlog
        shimlog.report("warning", problem)
    else:
        print(f"warning: {problem}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    run()
