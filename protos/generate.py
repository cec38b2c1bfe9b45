#!/usr/bin/env python3
"""Generate the Python protobuf modules from every .proto file under protos/.

Usage (from anywhere; paths are resolved relative to this file):

    python protos/generate.py            # write into the repository root
    python protos/generate.py --out DIR  # write the same tree under DIR instead

protos/shim/api/x.proto becomes shim/api/x_pb2.py and shim/api/x_pb2.pyi under the
output root. Imports between our .proto files use paths relative to protos/
("shim/api/mount.proto"), so the generated modules import each other as
``from shim.api import mount_pb2``. Well-known types (google/protobuf/*.proto) come
from the include directory bundled with grpcio-tools.

The tests' own clients are the exception: protos/tests/cri/x.proto becomes
tests/cri/x_pb2.py, x_pb2.pyi and the gRPC stubs x_pb2_grpc.py. These are compiled with
protos/tests as their root, so they import each other as ``from cri import x_pb2``, the
way the tests import their packages (tests/ is on sys.path, as for ``e2e``).

Needs grpcio-tools at the exact version pinned in pyproject.toml (the `dev` and
`test` extras): the generated code is committed and tests/unit/test_protos_fresh.py
checks that it equals a fresh run of this script, so run it after every .proto
change and commit the result.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTOS_DIR.parent

API_INIT = '"""Generated protobuf modules (see protos/generate.py); do not edit."""\n'
TESTS = "tests"  # protos/tests/...: test-side clients, generated into tests/ with gRPC stubs


def proto_files() -> list[str]:
    """All .proto files under protos/, as sorted paths relative to protos/."""
    return sorted(p.relative_to(PROTOS_DIR).as_posix() for p in PROTOS_DIR.rglob("*.proto"))


def grpc_tools_include() -> Path:
    """Directory with google/protobuf/*.proto shipped inside grpcio-tools."""
    try:
        import grpc_tools
    except ImportError:
        sys.exit("protos/generate.py: grpcio-tools is not installed (pip install -e '.[dev]')")
    return Path(grpc_tools.__file__).resolve().parent / "_proto"


def generate(out: Path) -> list[Path]:
    """Run protoc for all .proto files into `out`; return the files written, sorted."""
    include = grpc_tools_include()
    protos = proto_files()
    if not protos:
        sys.exit(f"protos/generate.py: no .proto files under {PROTOS_DIR}")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    shim_protos = [p for p in protos if not p.startswith(TESTS + "/")]
    test_protos = [p.removeprefix(TESTS + "/") for p in protos if p.startswith(TESTS + "/")]
    for root, dest, files, extra in ((PROTOS_DIR, out, shim_protos, []),
                                     (PROTOS_DIR / TESTS, out / TESTS, test_protos,
                                      [f"--grpc_python_out={out / TESTS}"])):
        if not files:
            continue
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={dest}",
            f"--pyi_out={dest}",
            *extra,
            *files,
        ]
        subprocess.run(cmd, check=True, cwd=root)

    init = out / "shim" / "api" / "__init__.py"
    if not init.exists():
        init.write_text(API_INIT)

    written = []
    for rel in protos:
        stem = Path(rel).with_suffix("")
        grpc = ("_pb2_grpc.py",) if rel.startswith(TESTS + "/") else ()
        for suffix in ("_pb2.py", "_pb2.pyi", *grpc):
            written.append(out / stem.parent / (stem.name + suffix))
    return sorted(written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT,
        help="output root (default: the repository root)",
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
