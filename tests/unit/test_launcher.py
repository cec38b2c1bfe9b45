"""shim/binary/launcher.py: pip's console script becomes the fast launcher on its first run."""
import os
import subprocess
import sys

from shim.binary import launcher

PIP_CONSOLE_SCRIPT = f"""#!{sys.executable}
# -*- coding: utf-8 -*-
import re
import sys
from shim.binary.cli import run
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(run())
"""


def console_script(tmp_path):
    path = tmp_path / launcher.NAME
    path.write_text(PIP_CONSOLE_SCRIPT)
    path.chmod(0o755)
    return path


def test_the_console_script_replaces_itself_and_the_launcher_runs_isolated(tmp_path):
    path = console_script(tmp_path)
    out = subprocess.run([str(path), "-v"], capture_output=True, text=True, check=True).stdout
    assert "Runtime: io.containerd.pyshim.v1" in out
    assert launcher.is_launcher(str(path))
    first = path.read_text().splitlines()[0]
    assert first == f"#!{sys.executable} -IS"
    # The launcher imports shim and protobuf without site, from where they are installed.
    probe = path.read_text().replace(
        "from shim.binary.cli import run\nrun()\n",
        "import sys, google.protobuf, shim\nprint(sys.flags.no_site, 'site' in sys.modules)\n")
    (tmp_path / "probe").write_text(probe)
    assert subprocess.run([sys.executable, "-IS", str(tmp_path / "probe")], capture_output=True, text=True,
                          check=True).stdout == "1 False\n"


def test_through_a_symlink_the_target_is_replaced(tmp_path):
    target = console_script(tmp_path)
    link = tmp_path / "bin" / launcher.NAME
    link.parent.mkdir()
    link.symlink_to(target)
    assert launcher.upgrade(str(link)) is None
    assert link.is_symlink() and launcher.is_launcher(str(target))


def test_other_files_are_left_alone(tmp_path):
    other = tmp_path / "script"
    other.write_text("#!/bin/sh\necho hi\n")
    assert launcher.upgrade(str(other)) is None
    assert other.read_text() == "#!/bin/sh\necho hi\n"
    assert launcher.upgrade(str(tmp_path / "missing")) is None


def test_an_unwritable_place_is_reported_not_raised(tmp_path):
    path = console_script(tmp_path)
    os.chmod(tmp_path, 0o500)
    try:
        if os.access(tmp_path, os.W_OK):  # root ignores the mode: make the write itself fail
            os.chmod(tmp_path, 0o700)
            (tmp_path / f"{launcher.NAME}.{os.getpid()}.tmp").mkdir()
        problem = launcher.upgrade(str(path))
    finally:
        os.chmod(tmp_path, 0o700)
    assert problem and "cannot replace the console script" in problem
    assert path.read_text() == PIP_CONSOLE_SCRIPT


def test_an_interpreter_path_with_a_space_cannot_be_a_shebang():
    assert "white space" in launcher.shebang_problem("/opt/my venv/bin/python")
    assert "too long" in launcher.shebang_problem("/" + "x" * 300)
    assert launcher.shebang_problem(sys.executable) is None
