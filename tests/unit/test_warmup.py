"""shim/binary/warmup.py: the zygote's rehearsal leaves nothing behind."""

import subprocess
import sys


def test_rehearsal_runs_clean():
    # In a fresh interpreter, as in the zygote: afterwards no child process is left
    # (every `true` was waited for), no thread runs, so the zygote forks cleanly, and
    # every fd the rehearsed start-ups opened (pipes, epoll, eventfd) is closed again.
    code = """
import os, threading
from shim.binary import warmup
before = sorted(os.listdir("/proc/self/fd"))
env = dict(os.environ)
warmup.rehearse()
assert sorted(os.listdir("/proc/self/fd")) == before, (before, os.listdir("/proc/self/fd"))
assert dict(os.environ) == env
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
