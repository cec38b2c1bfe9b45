"""The committed generated protobuf modules must equal a fresh run of protos/generate.py.

If this fails, run `python protos/generate.py` (with the grpcio-tools version pinned in
pyproject.toml) and commit the regenerated files.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GENERATOR = REPO / "protos" / "generate.py"
HINT = "run `python protos/generate.py` and commit the result"


def _generated_files(root: Path) -> set[Path]:
    """Generated modules (x_pb2.py, x_pb2.pyi, x_pb2_grpc.py) under root/shim and root/tests
    (the tests' CRI client), relative to root."""
    return {
        p.relative_to(root)
        for top in ("shim", "tests")
        for p in (root / top).rglob("*_pb2*.py*")
        if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    }


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("protos-fresh")
    proc = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"protos/generate.py failed:\n{proc.stdout}{proc.stderr}"
    return out


def test_generator_produces_one_module_pair_per_proto(fresh):
    protos = sorted((REPO / "protos").rglob("*.proto"))
    assert protos, "no .proto files under protos/"
    generated = _generated_files(fresh)
    for proto in protos:
        stem = proto.relative_to(REPO / "protos").with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi"):
            assert stem.parent / (stem.name + suffix) in generated


def test_committed_modules_are_fresh(fresh):
    problems = []
    for rel in sorted(_generated_files(fresh)):
        committed = REPO / rel
        if not committed.exists():
            problems.append(f"{rel} is missing")
        elif committed.read_bytes() != (fresh / rel).read_bytes():
            problems.append(f"{rel} is stale")
    assert not problems, "; ".join(problems) + f" -- {HINT}"


def test_no_orphaned_generated_modules(fresh):
    orphans = sorted(_generated_files(REPO) - _generated_files(fresh))
    assert not orphans, (
        f"generated modules without a .proto under protos/: {', '.join(map(str, orphans))}"
        " -- delete them, or restore their .proto and " + HINT
    )


def test_api_package_init_exists():
    init = REPO / "shim" / "api" / "__init__.py"
    assert init.exists(), f"{init.relative_to(REPO)} is missing -- {HINT}"
