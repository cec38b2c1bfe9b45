"""A trace as Chrome's trace-event JSON (opens in Perfetto's UI and chrome://tracing).

One process row per writer (`proxy 1234`, `pyshim 1240`), one thread row per container within
it (plus `events`, `runc` and `-` for records of no container); calls, runc runs and events
are complete events ("X") with their durations, exits, phases and failpoints instants ("i"),
and stdio copies spans from their start record to their end record.
"""

from __future__ import annotations

from shim.tools.tracefile import Record, call_label, runc_verb


def export(records: list[Record]) -> dict:
    t0 = min(r["ts"] for r in records)
    events: list[dict] = []
    threads: dict[tuple[int, str], int] = {}
    processes: dict[int, str] = {}

    def tid(pid: int, lane: str) -> int:
        key = (pid, lane)
        if key not in threads:
            threads[key] = len(threads) + 1
        return threads[key]

    def us(seconds: float) -> float:
        return round(seconds * 1e6, 3)

    stdio_open: dict[tuple, Record] = {}
    for r in sorted(records, key=lambda r: r["ts"]):
        pid = r["pid"]
        processes.setdefault(pid, f"{r['src']} {pid}")
        cid = r.get("id") or "-"
        base = {"pid": pid, "ts": us(r["ts"] - t0)}
        kind = r["kind"]
        if kind == "call":
            events.append({**base, "ph": "X", "cat": "call", "name": call_label(r), "tid": tid(pid, cid),
                           "dur": us(r["duration"]),
                           "args": {"code": r.get("code_name") or r["code"], "message": r.get("message"),
                                    "stream": r.get("stream"), "service": r["service"],
                                    "request": r.get("request"), "response": r.get("response")}})
        elif kind == "runc":
            verb = runc_verb(r["argv"])
            events.append({**base, "ph": "X", "cat": "runc", "name": f"runc {verb}", "tid": tid(pid, f"{cid} runc"),
                           "dur": us(r["duration"]),
                           "args": {"argv": r["argv"], "exit_status": r["exit_status"], "error": r.get("error")}})
        elif kind == "event":
            events.append({**base, "ph": "X", "cat": "event", "name": r["topic"], "tid": tid(pid, f"{cid} events"),
                           "dur": us(r.get("duration") or 0),
                           "args": {"ok": r["ok"], "attempts": r.get("attempts"), "payload": r.get("payload")}})
        elif kind == "stdio":
            key = (pid, cid, r.get("exec_id"), r["stream"])
            if r["phase"] == "start":
                stdio_open[key] = r
            else:
                began = stdio_open.pop(key, r)
                events.append({"pid": pid, "ts": us(began["ts"] - t0), "ph": "X", "cat": "stdio",
                               "name": f"copy {r['stream']}", "tid": tid(pid, f"{cid} stdio"),
                               "dur": us(r["ts"] - began["ts"]), "args": {"bytes": r.get("bytes")}})
        else:
            name = {"exit": lambda: f"exit {r['proc_pid']} status {r['status']}",
                    "phase": lambda: r["name"],
                    "failpoint": lambda: f"failpoint {r['point']} {r['action']}"}[kind]()
            events.append({**base, "ph": "i", "s": "t", "cat": kind, "name": name, "tid": tid(pid, cid),
                           "args": {k: v for k, v in r.items() if k not in ("ts", "wall", "pid", "src", "kind")}})
    for (pid, cid, exec_id, stream), began in stdio_open.items():  # copies still going when the trace ended
        events.append({"pid": pid, "ts": us(began["ts"] - t0), "ph": "i", "s": "t", "cat": "stdio",
                       "name": f"copy {stream} (no end)", "tid": tid(pid, f"{cid} stdio")})
    meta = [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}}
            for pid, name in processes.items()]
    meta += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": t, "args": {"name": lane}}
             for (pid, lane), t in threads.items()]
    return {"traceEvents": meta + events, "displayTimeUnit": "ms",
            "otherData": {"t0_monotonic": t0, "t0_wall": min(r["wall"] for r in records)}}
