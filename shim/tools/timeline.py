"""A picture of one container's life: an SVG timeline, written by hand (standard library only).

Lanes from top to bottom: the calls each writer saw (`calls (proxy)`, `calls (pyshim)`), runc
runs, events, stdio copies, and marks for exits, failpoints and phases. Bars that overlap in
time (a Wait spans the whole life) are stacked in rows of their lane. Time runs left to
right in milliseconds from the container's first record.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

from shim.tools.tracefile import Record, call_label, runc_verb, sources

WIDTH = 1100
LEFT = 150  # lane labels
RIGHT = 30
ROW = 18
LANE_GAP = 10
TOP = 46
COLOURS = {"call": "#4e79a7", "error": "#e15759", "runc": "#59a14f", "event": "#f28e2b",
           "stdio": "#76b7b2", "exit": "#b07aa1", "failpoint": "#e15759", "phase": "#9c9c9c"}


def _bars(records: list[Record]) -> list[tuple[float, float, str, str, str]]:
    """(start, end, label, colour, tooltip) of each record drawn as a bar."""
    bars = []
    stdio: dict[tuple, Record] = {}
    for r in records:
        kind = r["kind"]
        if kind == "call":
            colour = COLOURS["error"] if r["code"] else COLOURS["call"]
            tip = f"{call_label(r)} {r.get('code_name') or r['code']} {r['duration'] * 1000:.2f} ms"
            bars.append((r["ts"], r["ts"] + r["duration"], call_label(r), colour, tip))
        elif kind == "runc":
            verb = runc_verb(r["argv"])
            tip = f"runc {' '.join(r['argv'][1:])} exit {r['exit_status']} {r['duration'] * 1000:.2f} ms"
            bars.append((r["ts"], r["ts"] + r["duration"], verb,
                         COLOURS["error"] if r["exit_status"] else COLOURS["runc"], tip))
        elif kind == "event":
            topic = r["topic"].rsplit("/", 1)[-1]
            bars.append((r["ts"], r["ts"] + (r.get("duration") or 0), topic,
                         COLOURS["event"] if r["ok"] else COLOURS["error"],
                         f"{r['topic']} attempts {r.get('attempts')} ok {r['ok']}"))
        elif kind == "stdio":
            key = (r.get("exec_id"), r["stream"])
            if r["phase"] == "start":
                stdio[key] = r
            else:
                began = stdio.pop(key, r)
                bars.append((began["ts"], r["ts"], r["stream"], COLOURS["stdio"],
                             f"{r['stream']} copy: {r.get('bytes')} bytes"))
    return bars


def _pack(bars: list[tuple[float, float, str, str, str]], min_gap: float) -> list[list[tuple]]:
    """Greedy interval packing: each bar in the first row where it does not overlap."""
    rows: list[list[tuple]] = []
    ends: list[float] = []
    for bar in sorted(bars, key=lambda b: b[0]):
        for i, end in enumerate(ends):
            if bar[0] >= end + min_gap:
                rows[i].append(bar)
                ends[i] = max(bar[1], bar[0] + min_gap)
                break
        else:
            rows.append([bar])
            ends.append(max(bar[1], bar[0] + min_gap))
    return rows


def render(records: list[Record], cid: str, title: str = "") -> str:
    mine = sorted((r for r in records if r.get("id") == cid), key=lambda r: r["ts"])
    if not mine:
        raise ValueError(f"no records of container {cid!r}")
    t0 = mine[0]["ts"]
    t1 = max(r["ts"] + (r.get("duration") or 0) for r in mine)
    span = max(t1 - t0, 1e-3)
    scale = (WIDTH - LEFT - RIGHT) / span

    def x(t: float) -> float:
        return LEFT + (t - t0) * scale

    lanes: list[tuple[str, list[Record]]] = []
    writers = sorted(sources(mine), key=lambda s: s != "proxy")  # the proxy sees containerd's side first
    for src in writers:
        lanes.append((f"calls ({src})", [r for r in mine if r["kind"] == "call" and r["src"] == src]))
    lanes.append(("runc", [r for r in mine if r["kind"] == "runc"]))
    for src in writers:
        lanes.append((f"events ({src})" if len(writers) > 1 else "events",
                      [r for r in mine if r["kind"] == "event" and r["src"] == src]))
    lanes.append(("stdio", [r for r in mine if r["kind"] == "stdio"]))
    marks = [r for r in mine if r["kind"] in ("exit", "failpoint", "phase")]
    # labels need about 7 px per character: bars closer than that share no row
    min_gap = 64 / scale
    body: list[str] = []
    y = TOP
    for name, rs in lanes:
        if not rs:
            continue
        rows = _pack(_bars(rs), min_gap)
        height = len(rows) * ROW
        body.append(f'<rect x="0" y="{y - 3}" width="{WIDTH}" height="{height + 6}" fill="#f4f4f4"/>')
        body.append(f'<text x="8" y="{y + 13}" class="lane">{escape(name)}</text>')
        for i, row in enumerate(rows):
            for start, end, label, colour, tip in row:
                bx, bw = x(start), max((end - start) * scale, 2.0)
                by = y + i * ROW
                inside = bw >= 6.5 * len(label) + 4  # else the label goes right of the bar
                lx, cls = (bx + 2, "bar") if inside else (bx + bw + 2, "out")
                body.append(f'<g><title>{escape(tip)}</title><rect x="{bx:.1f}" y="{by + 2}" width="{bw:.1f}" '
                            f'height="{ROW - 4}" fill="{colour}" rx="2"/>'
                            f'<text x="{lx:.1f}" y="{by + 13}" class="{cls}">{escape(label)}</text></g>')
        y += height + LANE_GAP
    if marks:
        body.append(f'<rect x="0" y="{y - 3}" width="{WIDTH}" height="{ROW * 2 + 6}" fill="#f4f4f4"/>')
        body.append(f'<text x="8" y="{y + 13}" class="lane">exits, failpoints</text>')
        for i, r in enumerate(marks):
            mx = x(r["ts"])
            label = {"exit": lambda: f"exit {r['status']}", "failpoint": lambda: f"{r['point']}: {r['action']}",
                     "phase": lambda: r["name"]}[r["kind"]]()
            row = 0 if r["kind"] != "phase" else 1
            body.append(f'<g><title>{escape(label)}</title><line x1="{mx:.1f}" x2="{mx:.1f}" y1="{TOP - 6}" '
                        f'y2="{y + ROW * 2}" stroke="{COLOURS[r["kind"]]}" stroke-dasharray="3,3"/>'
                        f'<text x="{mx + 3:.1f}" y="{y + row * ROW + 13}" class="mark" '
                        f'fill="{COLOURS[r["kind"]]}">{escape(label)}</text></g>')
        y += ROW * 2 + LANE_GAP
    axis = [f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y + 4}" y2="{y + 4}" stroke="#333"/>']
    step = _step(span * 1000)
    tick = 0.0
    while tick <= span * 1000 + 1e-9:
        tx = x(t0 + tick / 1000)
        axis.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{y}" y2="{y + 8}" stroke="#333"/>'
                    f'<text x="{tx:.1f}" y="{y + 22}" class="tick">{tick:g}</text>')
        tick += step
    axis.append(f'<text x="{WIDTH - RIGHT}" y="{y + 38}" class="tick" text-anchor="end">ms since the first record</text>')
    height = y + 48
    heading = escape(title or f"container {cid}: {span * 1000:.1f} ms")
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
        'font-family="sans-serif">',
        "<style>.lane{font-size:12px;fill:#333}.bar{font-size:10px;fill:#fff}.out{font-size:10px;fill:#222}.mark{font-size:10px}"
        ".tick{font-size:10px;fill:#333;text-anchor:middle}.title{font-size:14px;font-weight:bold}</style>",
        f'<rect width="{WIDTH}" height="{height}" fill="#fff"/>',
        f'<text x="8" y="22" class="title">{heading}</text>',
        *body, *axis, "</svg>", ""])


def _step(span_ms: float) -> float:
    for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 60000):
        if span_ms / step <= 12:
            return step
    return span_ms / 10
