"""The package's layers: a module imports only its own subpackage and the layers below it,
and no two modules import each other, directly or through others (deferred imports count).

A new subpackage must be given a rank here; an import that goes up a layer, or across to a
subpackage of the same rank, fails this test with the line that does it.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "shim"

# Lowest first. Subpackages of one rank may not import each other.
RANKS: dict[str, int] = {
    "api": 0,       # generated protobuf modules
    "ttrpc": 0,     # the ttrpc library, usable without the rest of the package
    "probe": 1,     # tracing and failpoints, reachable from every layer above
    "linux": 2,     # libc, mounts, reaper, cgroups, OOM, placement
    "runtime": 3,   # runc, runtime options, stdio
    "task": 4,      # the Task service and its lifecycle
    "binary": 5,    # start, delete, daemon, zygote
    "proxy": 6,     # the tracing proxy in front of any shim
    "tools": 6,     # commands for people: traces, the node installer
}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import of a shim module in the file, deferred ones too."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from shim.x import y` may name a module y: count it as an import of shim.x.y
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            found.append((node.lineno, target))
    return [(line, mod) for line, mod in found if mod == "shim" or mod.startswith("shim.")]


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def resolve(mod: str, known: dict[str, pathlib.Path]) -> str | None:
    """The module file an imported name lives in (names inside a module map to the module)."""
    while mod and mod not in known:
        mod = mod.rpartition(".")[0]
    return mod or None


def layer(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package root (names only)


def test_every_subpackage_has_a_rank() -> None:
    subpackages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert subpackages <= set(RANKS), f"give these a rank in RANKS: {subpackages - set(RANKS)}"


def test_imports_go_down_the_layers() -> None:
    known = modules()
    wrong = []
    for name, path in known.items():
        own = layer(name)
        for line, imported in imports(path):
            target = resolve(imported, known)
            if target is None:
                continue
            other = layer(target)
            if own is None or other == own:
                continue
            if other is None:  # the package root holds only constants (RUNTIME, VERSION)
                ok = own != "ttrpc"
            else:
                ok = RANKS[other] < RANKS[own]
            if not ok:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} ({own}) imports {target} ({other})")
    assert not wrong, "imports that go up or across the layers:\n" + "\n".join(wrong)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles() -> None:
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = {resolve(mod, known) for _, mod in imports(path)}
        # a package's __init__ is run by importing any of its modules: not an edge of its own
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


@pytest.mark.parametrize("package", ["ttrpc"])
def test_ttrpc_stands_alone(package: str) -> None:
    """The ttrpc library imports nothing of the shim outside itself, not even the root."""
    for path in (ROOT / package).rglob("*.py"):
        for line, mod in imports(path):
            assert mod.startswith(f"shim.{package}"), f"{path}:{line} imports {mod}"
