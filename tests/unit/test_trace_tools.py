"""pyshim-trace on recorded traces (tests/unit/data/traces: `ctr run --rm … echo hi` through the proxy
in front of runc-v2 on containerd 1.6.20 and 2.1.9, and a shim killed right after Create), and on
bad trace files."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from shim.tools import trace as cli
from shim.tools.tracefile import TraceError, load, parse
from shim.tools.tracestats import compact, percentile

DATA = Path(__file__).parent / "data" / "traces"
# `ctr run --rm … echo hi` twice (warm, echo-hi) through the proxy in front of pyshim, both tracing
BOTH = str(DATA / "proxy-pyshim.jsonl")
V16, V21, DIES = (str(DATA / n) for n in ("ctr-run-rm-1.6.jsonl", "ctr-run-rm-2.1.jsonl", "dies-after-create.jsonl"))
RUN_RM = ["Create", "Connect", "Connect", "Start", "Wait", "State", "State", "Delete", "Shutdown"]


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_summary_counts_calls_and_orders_them_per_container(capsys):
    code, out, _ = run(capsys, "summary", V16)
    assert code == 0
    assert "18 records" in out and "1 containers" in out
    create = next(line for line in out.splitlines() if line.strip().startswith("Create "))
    count, errors = create.split()[1:3]
    assert (count, errors) == ("1", "0")
    assert "ctr-run-rm (proxy): Create Connect×2 Start Wait State×2 Delete Shutdown" in out
    assert "ctr-run-rm events (proxy): create start exit delete" in out


def test_summary_lists_errors_and_failpoints(capsys):
    code, out, _ = run(capsys, "summary", DIES)
    assert code == 0
    assert "dies-after-create Start: UNAVAILABLE connection closed before the response" in out
    assert "dies-after-create Create.after: kill" in out


def test_diff_aligns_the_sequences_and_compares_latency(capsys):
    code, out, _ = run(capsys, "diff", V16, V16)
    assert code == 0 and "same sequence (9 and 9 calls)" in out
    create = next(line for line in out.splitlines() if line.startswith("  Create "))
    assert create.split()[1] == "1" and create.split()[-1] == "1.00"
    code, out, _ = run(capsys, "diff", V16, DIES, "--pair", "ctr-run-rm=dies-after-create")
    assert code == 1 and "sequences differ (9 and 3 calls)" in out
    assert "  < Wait" in out  # only in a


def test_diff_of_1_6_and_2_1_pairs_the_same_container(capsys):
    code, out, _ = run(capsys, "diff", V16, V21)
    assert "calls of ctr-run-rm (a) and ctr-run-rm (b)" in out
    table = out.split("latency per method")[1]
    assert all(method in table for method in set(RUN_RM))


def test_chrome_export_has_a_complete_event_per_call(capsys, tmp_path):
    out = tmp_path / "t.json"
    assert run(capsys, "chrome", V16, "-o", str(out))[0] == 0
    data = json.loads(out.read_text())
    calls = [e for e in data["traceEvents"] if e.get("cat") == "call"]
    assert sorted(e["name"] for e in calls) == sorted(RUN_RM)
    assert all(e["ph"] == "X" and e["dur"] > 0 and e["ts"] >= 0 for e in calls)
    names = {e["args"]["name"] for e in data["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"}
    assert names and all(n.startswith("proxy ") for n in names)
    assert {e["name"] for e in data["traceEvents"] if e.get("cat") == "event"} == {
        "/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"}


def test_timeline_is_an_svg_with_every_call_and_event(capsys, tmp_path):
    out = tmp_path / "t.svg"
    assert run(capsys, "timeline", V21, "-o", str(out))[0] == 0
    root = ET.parse(out).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert {"calls (proxy)", "events"} <= set(texts)
    titles = [t.text for t in root.iter("{http://www.w3.org/2000/svg}title")]
    assert sum(1 for t in titles if t.split()[0] in RUN_RM) == len(RUN_RM)
    assert sum(1 for t in titles if t.startswith("/tasks/")) == 4


def test_timeline_across_proxy_pyshim_runc_and_events(capsys, tmp_path):
    out = tmp_path / "t.svg"
    assert run(capsys, "timeline", BOTH, "--id", "echo-hi", "-o", str(out))[0] == 0
    root = ET.parse(out).getroot()
    lanes = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text") if t.get("class") == "lane"]
    assert lanes[:5] == ["calls (proxy)", "calls (pyshim)", "runc", "events (proxy)", "events (pyshim)"]
    titles = [t.text for t in root.iter("{http://www.w3.org/2000/svg}title")]
    assert any(t.startswith("runc ") and " create " in f" {t} " for t in titles), titles
    bars = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text") if t.get("class") in ("bar", "out")]
    assert {"create", "start", "delete"} <= set(bars), bars  # runc's verbs, not its flags' values


def test_summary_of_two_writers_keeps_them_apart(capsys):
    code, out, _ = run(capsys, "summary", BOTH)
    assert code == 0 and "calls seen by pyshim:" in out and "calls seen by proxy:" in out
    assert "echo-hi events (pyshim): create start exit delete" in out
    assert "echo-hi events (proxy): create start exit delete" in out
    code, out, _ = run(capsys, "diff", BOTH, BOTH, "--src-a", "proxy", "--src-b", "pyshim", "--pair", "echo-hi=echo-hi")
    assert "calls of echo-hi (a) and echo-hi (b)" in out and "(proxy)" in out and "(pyshim)" in out


def test_timeline_of_an_unknown_container_is_an_error(capsys, tmp_path):
    code, _, err = run(capsys, "timeline", V16, "--id", "nope", "-o", str(tmp_path / "t.svg"))
    assert code == 2 and "no records of container 'nope'" in err


@pytest.mark.parametrize("content,message", [
    ("", "empty trace"),
    ("\n\n", "empty trace"),
    ("not json\n", ":1: not JSON"),
    ('[1, 2]\n', ":1: a record must be a JSON object"),
    ('{"ts": 1, "wall": 2, "pid": 3, "src": "proxy", "kind": "nap", "id": null}\n', ":1: unknown kind 'nap'"),
    ('{"ts": 1, "wall": 2, "pid": 3, "src": "proxy", "kind": "phase", "id": null, "name": "x"}\n'
     '{"ts": 1, "wall": 2, "pid": 3, "src": "proxy", "kind": "call", "id": "c"}\n', ":2: call record without key 'service'"),
    ('{"wall": 2, "pid": 3, "src": "proxy", "kind": "phase", "id": null, "name": "x"}\n', ":1: record without key 'ts'"),
    ('{"ts": "1", "wall": 2, "pid": 3, "src": "proxy", "kind": "phase", "id": null, "name": "x"}\n',
     ":1: key 'ts' must be a number"),
    ('{"ts": 1, "wall": 2, "pid": 3, "src": "proxy", "kind": "phase", "name": "x"}\n', ":1: missing key 'id'"),
    ('{"ts": 1, "wall": 2, "pid": 3, "src": "me", "kind": "phase", "id": null, "name": "x"}\n', ":1: unknown src 'me'"),
])
def test_bad_trace_files_are_named_with_their_line(capsys, tmp_path, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    for command in (["summary", str(bad)], ["chrome", str(bad)], ["diff", V16, str(bad)],
                    ["timeline", str(bad), "-o", str(tmp_path / "x.svg")]):
        code, out, err = run(capsys, *command)
        assert code == 2, command
        assert err.startswith(f"pyshim-trace: {bad}") and message in err, err


def test_a_missing_file_is_a_clear_error(capsys, tmp_path):
    code, _, err = run(capsys, "summary", str(tmp_path / "none.jsonl"))
    assert code == 2 and "none.jsonl: cannot read" in err


def test_the_module_and_the_console_script_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "shim.tools.trace", "summary", V16], capture_output=True, text=True)
    assert result.returncode == 0 and "calls seen by proxy" in result.stdout
    script = Path(sys.executable).parent / "pyshim-trace"
    result = subprocess.run([str(script), "summary", "/nonexistent"], capture_output=True, text=True)
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_helpers():
    assert compact(["a", "a", "b", "a"]) == "a×2 b a"
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 90) == 5
    with pytest.raises(TraceError):
        parse(["{}"], "x")
    assert len(load(V16)) == 18
