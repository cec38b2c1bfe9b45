"""The fast `containerd-shim-pyshim-v1`: an isolated interpreter without `site`.

containerd runs the shim binary twice per container (`start`, then `delete`) and waits
for both, so the interpreter's start-up is on every container's critical path. The
console script that pip writes (for `pip install .`, a wheel, or an editable install)
runs the interpreter with `site`, which reads the environment's .pth files (an editable
install's import hook, setuptools' distutils shim): that about doubles the start-up.
The launcher written here runs `python -IS`, with sys.path set to exactly the
directories the shim imports from (where `shim` and `google.protobuf` are installed,
found at run time), so it serves any install.

No installer writes such a script (pip drops the flags of a `#!python` line), so the
console script replaces itself: its first run writes the launcher over itself
(`upgrade`, atomically, from `shim.binary.cli.run`). `pyshim install` writes the same
launcher into a directory of the operator's choice (`write`). The bytecode is compiled
at the same time: containerd passes PYTHONDONTWRITEBYTECODE on from its environment when
it is set, and then nothing would ever be cached (pip compiles a wheel's modules; an
editable install's are not).
"""

from __future__ import annotations

import os
import sys

NAME = "containerd-shim-pyshim-v1"
MARK = f"# {NAME}: the fast launcher (shim/binary/launcher.py)"
# What pip's console script for `shim.binary.cli:run` contains (and no other file does).
CONSOLE_SCRIPT_LINE = "from shim.binary.cli import run"
# The kernel reads this much of a `#!` line (Linux >= 5.1; 127 before).
SHEBANG_MAX = 255


def package_root(name: str) -> str:
    """The sys.path entry that `name` (a package) is imported from, without importing it."""
    import importlib.util
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        raise ImportError(f"{name} is not installed for {sys.executable}")
    depth = name.count(".") + 2  # .../root/google/protobuf/__init__.py -> .../root
    root = os.path.abspath(spec.origin)
    for _ in range(depth):
        root = os.path.dirname(root)
    return root


def search_path() -> list[str]:
    """The directories the shim (and its zygote) imports from, beyond the standard library."""
    return list(dict.fromkeys([package_root("shim"), package_root("google.protobuf")]))


def text(executable: str, paths: list[str]) -> str:
    return (f"#!{executable} -IS\n"
            f"{MARK}\n"
            "import sys\n"
            f"sys.path[:0] = {paths!r}\n"
            "from shim.binary.cli import run\n"
            "run()\n")


def is_launcher(path: str) -> bool:
    try:
        with open(path, errors="replace") as f:
            return f.readline().startswith("#!") and f.readline().rstrip("\n") == MARK
    except OSError:
        return False


def shebang_problem(executable: str) -> str | None:
    if any(c.isspace() for c in executable):
        return f"the interpreter's path {executable!r} contains white space"
    if len(f"#!{executable} -IS") > SHEBANG_MAX:
        return f"the interpreter's path {executable!r} is too long for a #! line"
    return None


def write(path: str, executable: str | None = None) -> None:
    """Write the launcher at `path` (atomically) and compile the bytecode it will load.
    Raises OSError (or ImportError, ValueError) with the reason it cannot."""
    executable = executable or sys.executable
    problem = shebang_problem(executable)
    if problem:
        raise ValueError(problem)
    content = text(executable, search_path())
    compile_bytecode()
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(content)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)  # a concurrent run still executes the old file, complete
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def compile_bytecode() -> None:
    """Compile what the shim imports (already compiled: only a stat per module)."""
    import compileall
    for name in ("shim", "google.protobuf"):
        root = package_root(name)
        compileall.compile_dir(os.path.join(root, *name.split(".")), quiet=2)


def upgrade(argv0: str) -> str | None:
    """Called by a run that did not start through the launcher: if `argv0` is pip's
    console script for the shim, replace it with the launcher. Returns why it could
    not, or None (done, or nothing to do)."""
    path = os.path.realpath(argv0)  # a symlink on containerd's PATH: replace its target
    try:
        with open(path, errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return None  # not a file we were run from (`python -c`, `-m`)
    if not head.startswith("#!") or MARK in head or CONSOLE_SCRIPT_LINE not in head:
        return None
    try:
        write(path)
    except (OSError, ImportError, ValueError) as e:
        return f"cannot replace the console script {path} with the fast launcher: {e}"
    return None
