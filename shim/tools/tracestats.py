"""What `pyshim-trace summary` and `diff` say about traces: counts, latencies, errors, call orders."""

from __future__ import annotations

import difflib
from collections import defaultdict

from shim.tools.tracefile import Record, call_label, calls, containers, runc_verb, sources


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0-100), linearly interpolated between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def compact(labels: list[str]) -> str:
    """`Create Connect Connect Start` -> `Create Connect×2 Start`."""
    out: list[str] = []
    run = 0
    for i, label in enumerate(labels):
        run += 1
        if i + 1 == len(labels) or labels[i + 1] != label:
            out.append(label if run == 1 else f"{label}×{run}")
            run = 0
    return " ".join(out)


def per_method(records: list[Record], src: str) -> dict[str, list[Record]]:
    found: dict[str, list[Record]] = defaultdict(list)
    for r in calls(records, src=src):
        found[r["method"]].append(r)
    return dict(found)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def summary(records: list[Record], name: str) -> str:
    lines = []
    span = max(r["ts"] for r in records) - min(r["ts"] for r in records)
    ids = containers(records)
    kinds = defaultdict(int)
    for r in records:
        kinds[r["kind"]] += 1
    lines.append(f"{name}: {len(records)} records ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}), "
                 f"{len(ids)} containers, {span:.3f} s")
    for src in sources(records):
        methods = per_method(records, src)
        if not methods:
            continue
        lines.append("")
        lines.append(f"calls seen by {src}:")
        lines.append(f"  {'method':<12} {'count':>5} {'errors':>6} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'max ms':>9}")
        for method, rs in sorted(methods.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            d = [r["duration"] for r in rs]
            errors = sum(1 for r in rs if r["code"] != 0)
            lines.append(f"  {method:<12} {len(rs):>5} {errors:>6} {_ms(percentile(d, 50)):>9} "
                         f"{_ms(percentile(d, 90)):>9} {_ms(percentile(d, 99)):>9} {_ms(max(d)):>9}")
    failed = [r for r in calls(records) if r["code"] != 0]
    runc_failed = [r for r in records if r["kind"] == "runc" and r["exit_status"] != 0]
    events_failed = [r for r in records if r["kind"] == "event" and not r["ok"]]
    fired = [r for r in records if r["kind"] == "failpoint"]
    if failed or runc_failed or events_failed:
        lines.append("")
        lines.append("errors:")
        for r in failed:
            lines.append(f"  {r['src']:<6} {r.get('id') or '-'} {call_label(r)}: "
                         f"{r.get('code_name') or r['code']} {r.get('message') or ''}".rstrip())
        for r in runc_failed:
            lines.append(f"  {r['src']:<6} {r.get('id') or '-'} runc {runc_verb(r['argv'])}: "
                         f"exit {r['exit_status']} {r.get('error') or ''}".rstrip())
        for r in events_failed:
            lines.append(f"  {r['src']:<6} {r.get('id') or '-'} event {r['topic']}: not delivered "
                         f"({r.get('attempts', '?')} attempts)")
    if fired:
        lines.append("")
        lines.append("failpoints fired:")
        for r in sorted(fired, key=lambda r: r["ts"]):
            arg = f"({r['arg']})" if r.get("arg") not in (None, "") else ""
            lines.append(f"  {r['src']:<6} {r.get('id') or '-'} {r['point']}: {r['action']}{arg}")
    lines.append("")
    lines.append("calls per container, in order:")
    for cid in ids:
        for src in sources(records):
            seq = [call_label(r) for r in calls(records, cid, src)]
            if seq:
                lines.append(f"  {cid} ({src}): {compact(seq)}")
        for src in sources(records):
            topics = [r["topic"].rsplit("/", 1)[-1] for r in sorted(records, key=lambda r: r["ts"])
                      if r["kind"] == "event" and r.get("id") == cid and r["src"] == src]
            if topics:
                lines.append(f"  {cid} events ({src}): {compact(topics)}")
    return "\n".join(lines) + "\n"


def pair_containers(a: list[Record], b: list[Record], pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Which container of trace a to compare with which of b: those given, else the same id
    where both have it, else the n-th container of a with the n-th of b."""
    if pairs:
        return pairs
    ids_a, ids_b = containers(a), containers(b)
    common = [cid for cid in ids_a if cid in ids_b]
    if common:
        return [(cid, cid) for cid in common]
    return list(zip(ids_a, ids_b))


def _side_by_side(left: list[str], right: list[str], width: int) -> list[str]:
    lines = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=left, b=right, autojunk=False).get_opcodes():
        if op == "equal":
            lines += [f"    {x:<{width}}   {y}" for x, y in zip(left[i1:i2], right[j1:j2])]
            continue
        l, r = left[i1:i2], right[j1:j2]
        for k in range(max(len(l), len(r))):
            x = l[k] if k < len(l) else ""
            y = r[k] if k < len(r) else ""
            mark = {"replace": "|", "delete": "<", "insert": ">"}[op]
            lines.append(f"  {mark} {x:<{width}}   {y}")
    return lines


def diff(a: list[Record], b: list[Record], name_a: str, name_b: str,
         pairs: list[tuple[str, str]] = (), src_a: str | None = None, src_b: str | None = None) -> tuple[str, bool]:
    """The text of the comparison, and whether the call sequences differ."""
    src_a = src_a or _main_source(a)
    src_b = src_b or _main_source(b)
    lines = [f"a: {name_a} ({src_a})", f"b: {name_b} ({src_b})"]
    differ = False
    paired = pair_containers(a, b, list(pairs))
    for cid_a, cid_b in paired:
        left = [call_label(r) for r in calls(a, cid_a, src_a)]
        right = [call_label(r) for r in calls(b, cid_b, src_b)]
        same = left == right
        differ |= not same
        lines.append("")
        lines.append(f"calls of {cid_a} (a) and {cid_b} (b): {'same sequence' if same else 'sequences differ'}"
                     f" ({len(left)} and {len(right)} calls)")
        width = max([len(x) for x in left] + [len(f"a: {cid_a}")] + [8])
        lines.append(f"    {'a: ' + cid_a:<{width}}   b: {cid_b}")
        lines += _side_by_side(left, right, width)
        topics_a = [r["topic"] for r in sorted(a, key=lambda r: r["ts"])
                    if r["kind"] == "event" and r.get("id") == cid_a and r["src"] == src_a]
        topics_b = [r["topic"] for r in sorted(b, key=lambda r: r["ts"])
                    if r["kind"] == "event" and r.get("id") == cid_b and r["src"] == src_b]
        if topics_a or topics_b:
            lines.append(f"  events a: {compact(topics_a)}")
            lines.append(f"  events b: {compact(topics_b)}")
    # latencies of the compared containers only (a trace may hold other runs too)
    ids_a, ids_b = {x for x, _ in paired}, {y for _, y in paired}
    ma = per_method([r for r in a if r.get("id") in ids_a], src_a)
    mb = per_method([r for r in b if r.get("id") in ids_b], src_b)
    lines.append("")
    lines.append("latency per method, the compared containers (median ms; b/a):")
    lines.append(f"  {'method':<12} {'n a':>4} {'a':>9} {'n b':>4} {'b':>9} {'b/a':>6}")
    for method in sorted(set(ma) | set(mb)):
        da = [r["duration"] for r in ma.get(method, [])]
        db = [r["duration"] for r in mb.get(method, [])]
        pa = percentile(da, 50) if da else None
        pb = percentile(db, 50) if db else None
        ratio = f"{pb / pa:.2f}" if pa and pb is not None else "-"
        lines.append(f"  {method:<12} {len(da):>4} {_ms(pa) if pa is not None else '-':>9} "
                     f"{len(db):>4} {_ms(pb) if pb is not None else '-':>9} {ratio:>6}")
    return "\n".join(lines) + "\n", differ


def _main_source(records: list[Record]) -> str:
    """The source whose calls to compare: the proxy's (what containerd sent) if it traced calls."""
    for src in ("proxy", "pyshim"):
        if any(r["kind"] == "call" and r["src"] == src for r in records):
            return src
    return "pyshim"
