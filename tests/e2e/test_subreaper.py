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


def test_restartable_starts_the_command_again_on_sighup_and_keeps_its_descendants(tmp_path):
    # each run of the command leaves a `sleep` behind and records its own pid, then waits
    runs = tmp_path / "runs"
    script = f"(setsid sleep 300 &); echo $$ >>{runs}; exec sleep 100"
    proc = subprocess.Popen([*SUBREAPER, "--grace", "0.5", "--restartable", "--", "sh", "-c", script],
                            stderr=subprocess.PIPE, text=True)
    try:
        def command_pids(count):
            deadline = time.monotonic() + 10
            while not (runs.exists() and len(runs.read_text().split()) == count):
                assert time.monotonic() < deadline, f"the command did not run {count} times"
                time.sleep(0.02)
            return [int(pid) for pid in runs.read_text().split()]

        first = command_pids(1)[0]
        psutil.Process(first).send_signal(signal.SIGKILL)  # not through the subreaper
        time.sleep(0.5)
        assert proc.poll() is None, "the subreaper ended with its command"
        leftover = [p for p in psutil.Process(proc.pid).children() if p.cmdline() == ["sleep", "300"]]
        assert len(leftover) == 1, "the first run's descendant was not kept"
        proc.send_signal(signal.SIGHUP)
        second = command_pids(2)[1]
        assert second != first and psutil.Process(second).ppid() == proc.pid
        proc.send_signal(signal.SIGTERM)  # forwarded: ends the command, then the subreaper
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
        killed = [line for line in proc.stderr.read().splitlines() if "killing leftover" in line]
        assert len(killed) == 2  # both runs' `sleep 300`
    finally:
        proc.kill()
        proc.wait()
