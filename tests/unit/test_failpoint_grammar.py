"""containerd's failpoint grammar as pyshim parses and evaluates it."""

from __future__ import annotations

import threading

import pytest

from shim.probe.failpoints import (CONTAINERD_TYPES, PYSHIM_TYPES, FailpointError, Term,
                                   parse)


def fire(value: str, times: int, types=CONTAINERD_TYPES) -> list[Term | None]:
    fp = parse("io.containerd.runtime.v2.shim.failpoint.Start", value, types)
    return [fp.evaluate() for _ in range(times)]


def test_count_fires_that_many_times_then_nothing():
    assert fire("2*error(please retry)", 4) == [Term("error", "please retry")] * 2 + [None, None]


def test_cascading_terms_fire_in_order():
    assert fire("1*off->1*error(oops)", 3) == [Term("off"), Term("error", "oops"), None]
    assert fire("1*delay(250)->2*panic(boom)->1*off", 5) == [
        Term("delay", 250), Term("panic", "boom"), Term("panic", "boom"), Term("off"), None]


def test_zero_count_never_fires():
    assert fire("0*error(x)->1*delay(5)", 2) == [Term("delay", 5), None]


def test_error_text_runs_to_the_first_parenthesis():
    assert fire("1*error(a b: c-d)", 1) == [Term("error", "a b: c-d")]


def test_state_is_printed_in_the_grammar():
    fp = parse("p", "1*off->2*delay(10)")
    fp.evaluate()
    fp.evaluate()
    assert str(fp) == "0*off->1*delay(10)"


@pytest.mark.parametrize("value", [
    "", "error(x)", "*error(x)", "1*", "1*error", "1*error()", "1*error(x", "1*delay(x)",
    "1*delay()", "1*delay(1.5)", "1*off(x)", "1*bogus", "1*error(x)->", "1*error(x)>1*off",
    "1*error(x) ", " 1*off", "1*Off", "-1*off", "1*error(x))",
])
def test_malformed_values_name_the_annotation(value):
    with pytest.raises(FailpointError, match="io.containerd.runtime.v2.shim.failpoint.Start"):
        fire(value, 1)


def test_pyshim_types_only_where_accepted():
    with pytest.raises(FailpointError, match="not accepted"):
        fire("1*hang", 1)
    assert fire("1*hang->1*kill->1*kill(50)->1*drop->1*dup->1*stop->1*close", 8, PYSHIM_TYPES) == [
        Term("hang"), Term("kill"), Term("kill", 50), Term("drop"), Term("dup"), Term("stop"),
        Term("close"), None]


def test_each_count_is_used_once_across_threads():
    fp = parse("p", "500*error(x)")
    fired: list[Term | None] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(100):
            t = fp.evaluate()
            with lock:
                fired.append(t)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(t is not None for t in fired) == 500 and len(fired) == 800
