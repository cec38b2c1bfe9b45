#!/usr/bin/env python3
"""Install the `containerd-shim-pyshim-v1` launcher and precompile pyshim's bytecode.

containerd starts the shim binary twice per container (`start`, then `delete`), so its
start-up is on every container's critical path. pip's console script imports `site`
(and, for an editable install, its path finder) on every run, and where
PYTHONDONTWRITEBYTECODE is set (containerd passes its environment on) nothing is ever
cached. This launcher runs the interpreter isolated and without `site` (`-I -S`), with
sys.path set to exactly what the shim needs, and the bytecode is compiled once here.

    install_shim.py [DIR ...]    (default: the interpreter's own bin dir, i.e. the venv)

Run it with the interpreter that has pyshim and protobuf installed.
"""

from __future__ import annotations

import compileall
import os
import sys
import sysconfig


def launcher_text() -> str:
    import google.protobuf
    import shim

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(shim.__file__)))
    # .../site-packages/google/protobuf/__init__.py -> .../site-packages
    google_root = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(google.protobuf.__file__))))
    paths = list(dict.fromkeys([package_root, google_root]))
    return (f"#!{sys.executable} -IS\n"
            "# containerd-shim-pyshim-v1: written by scripts/install_shim.py\n"
            "import sys\n"
            f"sys.path[:0] = {paths!r}\n"
            "from shim.binary.cli import run\n"
            "run()\n")


def install(directory: str, text: str) -> str:
    path = os.path.join(directory, "containerd-shim-pyshim-v1")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def main() -> int:
    import google.protobuf
    import shim

    for tree in (os.path.dirname(shim.__file__), os.path.dirname(google.protobuf.__file__)):
        compileall.compile_dir(tree, quiet=1, workers=0)
    text = launcher_text()
    for directory in sys.argv[1:] or [sysconfig.get_path("scripts")]:
        print(install(directory, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
