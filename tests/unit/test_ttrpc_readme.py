"""The server and client example in shim/ttrpc/README.md runs as written, with nothing of
pyshim on the path but the package itself."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_readme_example_runs():
    text = (ROOT / "shim" / "ttrpc" / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "no python example in shim/ttrpc/README.md"
    code = blocks[0]
    statements = [line for line in code.splitlines() if line.strip() and not line.startswith("import")
                  and not line.startswith("from ")]
    assert len(statements) <= 10, "the example promises ten lines of code"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30, cwd=ROOT)
    assert (result.returncode, result.stdout) == (0, "hello, ttrpc\n"), result.stderr
