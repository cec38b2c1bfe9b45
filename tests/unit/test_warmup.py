"""shim/binary/warmup.py: the zygote's rehearsal leaves nothing behind."""

import subprocess
import sys


def test_rehearsal_runs_clean():
    # In a fresh interpreter, as in the zygote: afterwards no child process is left
    # (every `true` was waited for) and no thread runs, so the zygote forks cleanly.
    code = """
import os, threading
from shim.binary import warmup
warmup.rehearse()
try:
    os.waitpid(-1, os.WNOHANG)
    print("child left")
except ChildProcessError:
    print("no children")
print(threading.active_count())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["no", "children", "1"]
