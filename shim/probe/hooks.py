"""The hooks the shim's layers call to trace and to fire failpoints.

Every hook site is guarded by `if hooks.ON:` (a module attribute, False unless this
process traces or has a failpoint), so with both off a hot path pays one attribute test,
handlers are not wrapped (only Create's gate, see `install`), and the probe imports
neither json nor json_format.

Which trace a record goes to, most specific first: the container's annotation
io.pyshim.trace, then the runtime option PyshimTrace (the shim's default), then the
environment variable PYSHIM_TRACE (also what `start` and `delete` use).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from shim.ttrpc import Code, TTRPCError

from . import points, trace
from .failpoints import Failpoint, Term

log = logging.getLogger("shim.probe")

ON = False  # tracing or a failpoint is on in this process
PANIC_STATUS = 2  # what an unrecovered Go panic exits with

_failpoints: dict[str, dict[str, Failpoint]] = {}  # container id -> point -> failpoint
_lock = threading.Lock()
T = TypeVar("T")


def _update() -> None:
    global ON
    ON = trace.TRACER is not None or bool(_failpoints)


# -- set-up -------------------------------------------------------------------------------


def reset() -> None:
    """Forget a tracer and failpoints inherited through fork (`start` and the zygote
    may have traced with another process's settings)."""
    if trace.TRACER is not None:
        trace.TRACER.close()
        trace.TRACER = None
    _failpoints.clear()
    _update()


def enable_trace(path: str) -> None:
    """Trace this process (containers without a trace of their own) to `path`."""
    trace.enable(path)
    _update()


def configure(cid: str, annotations: Mapping[str, str] | None, trace_dir: str) -> None:
    """Arm the failpoints and the trace `annotations` (of container `cid`'s config.json)
    ask for, replacing what an earlier container of that id had. Raises
    ProbeConfigError, naming the annotation, for any it cannot honour; then nothing
    changes."""
    annotations = annotations or {}
    points.check_annotations(annotations)
    armed = points.failpoints(annotations)
    path = points.trace_path(annotations[points.TRACE_ANNOTATION], trace_dir) \
        if points.TRACE_ANNOTATION in annotations else None
    with _lock:
        if path is not None:
            trace.route(cid, path)
        else:
            trace.unroute(cid)
        if armed:
            _failpoints[cid] = armed
        else:
            _failpoints.pop(cid, None)
        _update()
    if armed:
        log.info("container %s: failpoints armed: %s", cid,
                 ", ".join(f"{p}={fp}" for p, fp in sorted(armed.items())))


# -- firing -------------------------------------------------------------------------------


class _FailpointError(Exception):
    """error(msg) at a point whose caller gave no error type of its own."""


def fire(cid: str | None, point: str, error: Callable[[str], BaseException] = _FailpointError,
         *, defer_kill: bool = False) -> Term | None:
    """Evaluate `point` of container `cid`; do what the fired term says. Returns the
    term (None if nothing fired) for the caller's own types (drop, dup, stop, close,
    and kill when `defer_kill`); raises error(msg) for error(msg)."""
    fp = _failpoints.get(cid or "", {}).get(point)
    if fp is None:
        return None
    term = fp.evaluate()
    if term is None:
        return None
    log.warning("failpoint %s of container %s fired: %s", point, cid, term)
    tracer = trace.TRACER
    if tracer is not None:
        tracer.record("failpoint", cid, point=point, action=term.type, arg=term.arg)
    if term.type == "delay":
        time.sleep(int(term.arg or 0) / 1000)
    elif term.type == "hang":
        threading.Event().wait()
    elif term.type == "kill" and not defer_kill:
        kill_self(term.arg)
    elif term.type == "panic":
        panic(str(term.arg))
    elif term.type == "error":
        raise error(str(term.arg))
    return term


def kill_self(after_ms: int | str | None = None) -> None:
    """SIGKILL this process, now or (without blocking) after `after_ms` milliseconds."""
    if after_ms:
        timer = threading.Timer(int(after_ms) / 1000, os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def panic(message: str) -> None:
    """End the process as an unrecovered panic ends a Go shim: no reply, status 2."""
    log.critical("panic: %s", message)
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:
            pass
    os._exit(PANIC_STATUS)


# -- ttrpc calls --------------------------------------------------------------------------


Table = dict[str, tuple[type, Callable[[Any, Any], Any]]]


def _call_error(message: str) -> TTRPCError:
    # containerd's failpoint shim returns a plain Go error: ttrpc sends it as Unknown.
    return TTRPCError(Code.UNKNOWN, message)


def _invalid(message: str) -> TTRPCError:
    # Worded as Go's errdefs words it: containerd 2.x shows the message alone, and this
    # keeps "invalid argument" in what the user reads (1.6 strips and re-adds it).
    return TTRPCError(Code.INVALID_ARGUMENT, f"{message}: invalid argument")


def wrap_methods(table: Table, arm: Callable[[Any], None] | None = None) -> Table:
    """The method table with every call traced and its failpoints evaluated; `arm`, if
    given, runs first in Create (see `install`)."""
    return {name: (req_type, _wrap(name, handler, arm if name == "Create" else None))
            for name, (req_type, handler) in table.items()}


def _wrap(method: str, handler: Callable[[Any, Any], Any],
          arm: Callable[[Any], None] | None = None) -> Callable[[Any, Any], Any]:
    before, after = f"{method}.before", f"{method}.after"

    def call(req: Any, ctx: Any) -> Any:
        began = time.monotonic()
        cid = getattr(req, "id", None)
        response = None
        code, message = Code.OK, ""
        try:
            if arm is not None:
                arm(req)
            if _failpoints:
                fire(cid, method, _call_error)
                fire(cid, before, _call_error)
            response = handler(req, ctx)
            if _failpoints:
                term = fire(cid, after, _call_error, defer_kill=True)
                if term is not None and term.type == "kill":
                    ctx.after_reply = (ctx.after_reply or []) + [lambda: kill_self(term.arg)]
            return response
        except TTRPCError as e:
            response, code, message = None, e.code, e.message
            raise
        except Exception as e:
            response, code, message = None, Code.UNKNOWN, str(e)
            raise
        finally:
            tracer = trace.TRACER
            if tracer is not None and tracer.wants(cid):
                fields: dict[str, Any] = {}
                if hasattr(req, "exec_id"):
                    fields["exec_id"] = req.exec_id
                tracer.record(
                    "call", cid, ts=began, **fields, service=getattr(ctx, "service", ""),
                    method=method, stream=getattr(ctx, "stream_id", 0),
                    request=trace.message_dict(req), response=trace.message_dict(response),
                    code=int(code), code_name=Code(code).name, message=message,
                    duration=time.monotonic() - began)

    call.__name__ = method
    call.__wrapped__ = handler  # type: ignore[attr-defined]
    return call


def install(table: Table, bundle_parent: str, trace_dir: str,
            swap: Callable[[Table], None]) -> Table:
    """The table the daemon serves. With probing on, every method is wrapped; with it off
    only Create is, by a gate that reads the new container's config.json for annotations
    (a byte search; parsed only if one is there) and, once one turns probing on, has
    `swap` serve the wrapped table from then on."""
    req_type, create = table["Create"]

    def arm(req: Any) -> None:
        """Read the new container's annotations; InvalidArgument for one it cannot honour."""
        cid = req.id
        if not cid or "/" in cid or cid in (".", ".."):
            return  # the service refuses it
        try:
            annotations = points.read_annotations(os.path.join(bundle_parent, cid, "config.json"))
            if annotations is not None or cid in _failpoints or \
                    (trace.TRACER is not None and trace.TRACER.routed(cid)):
                configure(cid, annotations, trace_dir)
        except points.ProbeConfigError as e:
            raise _invalid(str(e)) from None
        except OSError as e:  # the trace file cannot be opened
            raise _invalid(f"annotation {points.TRACE_ANNOTATION}: {e}") from None

    if ON:
        return wrap_methods(table, arm)

    def gate(req: Any, ctx: Any) -> Any:
        arm(req)
        if not ON:
            return create(req, ctx)
        # This Create turned probing on: wrap from now on (each Create arming first),
        # and this call itself, already armed.
        swap(wrap_methods(table, arm))
        return _wrap("Create", create)(req, ctx)

    return {**table, "Create": (req_type, gate)}


# -- the other happenings -----------------------------------------------------------------


def runc(cid: str, verb: str, argv: list[str], run: Callable[[], T],
         error: Callable[[str], BaseException]) -> T:
    """Run one runc command (`run`) between its before/after failpoints, traced."""
    began = time.monotonic()
    status, text = 0, None
    try:
        if _failpoints:
            fire(cid, f"runc.{verb}.before", error)
        result = run()
        if _failpoints:
            fire(cid, f"runc.{verb}.after", error)
        return result
    except BaseException as e:
        status = getattr(e, "status", -1)
        text = str(e)
        raise
    finally:
        tracer = trace.TRACER
        if tracer is not None:
            tracer.record("runc", cid, ts=began, argv=argv, duration=time.monotonic() - began,
                          exit_status=status, error=text)


def event(cid: str, topic: str, payload: Any, forward: Callable[[], tuple[int, bool]]) -> None:
    """Forward one event (`forward` returns attempts and success) under its failpoint
    (drop, dup, delay, ...), traced."""
    name = topic.rsplit("/", 1)[-1]
    term = fire(cid, f"event.{name}") if _failpoints else None
    tracer = trace.TRACER
    for _ in range(2 if term is not None and term.type == "dup" else 1):
        began = time.monotonic()
        attempts, ok = (0, False) if term is not None and term.type == "drop" else forward()
        if tracer is not None and tracer.wants(cid):
            tracer.record("event", cid, ts=began, topic=topic, payload=trace.message_dict(payload),
                          attempts=attempts, ok=ok, duration=time.monotonic() - began)


def reaped_exit(cid: str, exec_id: str, pid: int, status: int) -> None:
    """A reaped exit about to be delivered (Wait, /tasks/exit): traced, its failpoint fired."""
    tracer = trace.TRACER
    if tracer is not None:
        tracer.record("exit", cid, exec_id=exec_id, proc_pid=pid, status=status)
    if _failpoints:
        fire(cid, "exit")


def stdio_start(cid: str, exec_id: str, stream: str) -> Term | None:
    """A copy loop begins: traced; returns a fired stop/close term for the loop to act on."""
    tracer = trace.TRACER
    if tracer is not None:
        tracer.record("stdio", cid, exec_id=exec_id, stream=stream, phase="start")
    term = fire(cid, f"stdio.{stream}") if _failpoints else None
    return term if term is not None and term.type in ("stop", "close") else None


def stdio_end(cid: str, exec_id: str, stream: str, nbytes: int) -> None:
    tracer = trace.TRACER
    if tracer is not None:
        tracer.record("stdio", cid, exec_id=exec_id, stream=stream, phase="end", bytes=nbytes)


def phase(name: str, cid: str | None = None, detail: Any = None) -> None:
    """A start-up (or shut-down) phase of start, the daemon or delete."""
    tracer = trace.TRACER
    if tracer is not None:
        fields = {"detail": detail} if detail is not None else {}
        tracer.record("phase", cid, name=name, **fields)
