"""`pyshim-trace` (also `python -m shim.tools.trace`): read the traces pyshim and the proxy write.

    pyshim-trace summary TRACE               calls per method, latency percentiles, errors,
                                             failpoints, each container's calls in order
    pyshim-trace diff A B [--pair IDA=IDB]   two traces call by call, and latency per method
    pyshim-trace chrome TRACE [-o OUT]       Chrome trace-event JSON (Perfetto, chrome://tracing)
    pyshim-trace timeline TRACE [--id ID] -o OUT.svg [--png OUT.png]
                                             one container's life as an SVG picture

Exit status: 0; `diff` 1 when the call sequences differ; 2 for a bad trace or bad usage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

from shim.tools import chrome, timeline, tracestats
from shim.tools.tracefile import TraceError, containers, load


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyshim-trace", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="calls per method, latencies, errors, call order per container")
    s.add_argument("trace")
    d = sub.add_parser("diff", help="compare two traces call by call")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--pair", action="append", default=[], metavar="IDA=IDB",
                   help="compare container IDA of a with IDB of b (default: same ids, else in order)")
    d.add_argument("--src-a", choices=("pyshim", "proxy"), help="whose calls of a (default: the proxy's if any)")
    d.add_argument("--src-b", choices=("pyshim", "proxy"), help="whose calls of b")
    c = sub.add_parser("chrome", help="Chrome trace-event JSON")
    c.add_argument("trace")
    c.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    t = sub.add_parser("timeline", help="an SVG timeline of one container")
    t.add_argument("trace")
    t.add_argument("--id", help="the container (default: the first in the trace)")
    t.add_argument("-o", "--output", required=True, help="the SVG file to write")
    t.add_argument("--png", help="also convert it to this PNG (needs rsvg-convert or ImageMagick's convert)")
    t.add_argument("--title", default="")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "summary":
            sys.stdout.write(tracestats.summary(load(args.trace), args.trace))
            return 0
        if args.command == "diff":
            pairs = []
            for item in args.pair:
                left, eq, right = item.partition("=")
                if not eq or not left or not right:
                    print(f"pyshim-trace: --pair wants IDA=IDB, not {item!r}", file=sys.stderr)
                    return 2
                pairs.append((left, right))
            text, differ = tracestats.diff(load(args.a), load(args.b), args.a, args.b, pairs,
                                           args.src_a, args.src_b)
            sys.stdout.write(text)
            return 1 if differ else 0
        if args.command == "chrome":
            data = json.dumps(chrome.export(load(args.trace)))
            if args.output == "-":
                sys.stdout.write(data + "\n")
            else:
                with open(args.output, "w") as f:
                    f.write(data)
            return 0
        records = load(args.trace)
        cid = args.id or next(iter(containers(records)), None)
        if cid is None:
            raise TraceError(f"{args.trace}: no record names a container")
        try:
            svg = timeline.render(records, cid, args.title)
        except ValueError as e:
            raise TraceError(f"{args.trace}: {e}") from None
        with open(args.output, "w") as f:
            f.write(svg)
        if args.png:
            return _png(args.output, args.png)
        return 0
    except TraceError as e:
        print(f"pyshim-trace: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


def _png(svg: str, png: str) -> int:
    if shutil.which("rsvg-convert"):
        argv = ["rsvg-convert", "-o", png, svg]
    elif shutil.which("convert"):
        argv = ["convert", "-density", "110", svg, png]
    else:
        print("pyshim-trace: no rsvg-convert or convert to make a PNG; the SVG is written", file=sys.stderr)
        return 1
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"pyshim-trace: {argv[0]} failed: {result.stderr.strip()}", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
