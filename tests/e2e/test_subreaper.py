"""scripts/subreaper.py, black-box: exit statuses, signal forwarding, reaping, leftovers."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

SUBREAPER = [sys.executable, str(Path(__file__).resolve().parents[2] / "scripts" / "subreaper.py")]


def subreaper(*args, **kwargs):
    return subprocess.run([*SUBREAPER, *args], capture_output=True, text=True, timeout=30, **kwargs)


def test_exit_status_is_the_commands():
    assert subreaper("--", "sh", "-c", "exit 7").returncode == 7


def test_command_killed_by_a_signal_gives_128_plus_signal():
    assert subreaper("--", "sh", "-c", "kill -KILL $$").returncode == 128 + signal.SIGKILL


def test_missing_command_gives_127():
    result = subreaper("--", "/nonexistent/command")
    assert result.returncode == 127
    assert "cannot run /nonexistent/command" in result.stderr


def test_command_gets_default_signal_dispositions():
    # CPython ignores SIGPIPE and SIGXFSZ; the command must not inherit that, nor a blocked mask
    result = subreaper("--", "grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status")
    assert result.stdout.split() == ["SigBlk:", "0000000000000000", "SigIgn:", "0000000000000000"]


def test_sigterm_is_forwarded():
    proc = subprocess.Popen([*SUBREAPER, "--", "sleep", "100"])
    try:
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


def test_orphans_are_reaped():
    # the orphaned `sleep 0.2` exits while the command still runs: no zombie may stay
    script = "(sleep 0.2 &); sleep 1; ps -o stat= --ppid $PPID | grep -c Z || true"
    result = subreaper("--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


def test_leftovers_are_killed_after_the_grace_period_and_named():
    started = time.monotonic()
    result = subreaper("--grace", "0.5", "--", "sh", "-c", "(setsid sleep 300 &); (sleep 301 &); exit 3")
    assert result.returncode == 3
    assert 0.5 <= time.monotonic() - started < 10
    killed = [line for line in result.stderr.splitlines() if line.startswith("subreaper: killing leftover pid")]
    assert sorted(line.split(": ", 2)[2] for line in killed) == ["sleep 300", "sleep 301"]
    pids = [int(line.split()[4].rstrip(":")) for line in killed]
    assert not [pid for pid in pids if psutil.pid_exists(pid)]


def test_descendants_that_exit_in_time_are_not_killed():
    result = subreaper("--grace", "5", "--", "sh", "-c", "(sleep 0.3 &); exit 0")
    assert result.returncode == 0
    assert "killing" not in result.stderr
