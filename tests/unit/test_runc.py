"""runc command lines and errors, as containerd's runc shim runs them
(/work/shared/reference/runc-and-io.md, "exact runc command lines"), without runc.

A fake reaper records what the shim asks to spawn and runs a small shell script in
runc's place, with the same cwd, environment and stdio, so output, exit status and
log.json are real.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from shim.runtime.config import RuncConfig
from shim.runtime.runc import Runc, RuncError

NS = "ns1"
CID = "c1"
DEADLINE = 5.0  # only reached when something is broken


class FakeChild:
    """What Runc uses of shim.linux.reaper.Child."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait(self, timeout: float | None = 10) -> int:
        code = self.popen.wait(timeout)
        return 128 - code if code < 0 else code  # the reaper's exit_code: 128 + signal


class FakeReaper:
    """Records every spawn; runs `script` (sh) with runc's arguments instead of runc."""

    def __init__(self, tmp: Path) -> None:
        self.program = tmp / "fake-runc"
        self.calls: list[tuple[list[str], dict[str, Any]]] = []
        self.children: list[FakeChild] = []
        self.script = "exit 0"

    @property
    def script(self) -> str:
        return self.program.read_text()

    @script.setter
    def script(self, text: str) -> None:
        self.program.write_text("#!/bin/sh\n" + text + "\n")
        self.program.chmod(0o755)

    def spawn(self, argv: list[str], **kwargs: Any) -> FakeChild:
        self.calls.append((argv, kwargs))
        child = FakeChild(subprocess.Popen([str(self.program), *argv[1:]], close_fds=True,
                                           **kwargs))
        self.children.append(child)
        return child

    @property
    def argv(self) -> list[str]:
        [(argv, _)] = self.calls
        return argv

    @property
    def kwargs(self) -> dict[str, Any]:
        [(_, kwargs)] = self.calls
        return kwargs


@pytest.fixture
def bundle(tmp_path: Path) -> str:
    b = tmp_path / "bundle" / CID
    b.mkdir(parents=True)
    return str(b)


@pytest.fixture
def reaper(tmp_path: Path) -> FakeReaper:
    return FakeReaper(tmp_path)


@pytest.fixture
def make_runc(reaper: FakeReaper, bundle: str) -> Callable[..., Runc]:
    def make(**config: Any) -> Runc:
        return Runc(reaper, RuncConfig(**config), NS, bundle)  # type: ignore[arg-type]
    return make


def global_flags(bundle: str, binary: str = "runc",
                 root: str = "/run/containerd/runc") -> list[str]:
    return [binary, "--root", f"{root}/{NS}", "--log", f"{bundle}/log.json", "--log-format", "json"]


# -- global flags, cwd, environment -------------------------------------------------------


def test_every_command_gets_root_log_and_log_format_first(make_runc, reaper, bundle):
    make_runc().start(CID)
    assert reaper.argv == global_flags(bundle) + ["start", CID]


def test_binary_root_criu_and_systemd_cgroup_come_from_the_options(make_runc, reaper, bundle):
    make_runc(binary="crun", root="/run/other", criu_path="/opt/criu", systemd_cgroup=True) \
        .start(CID)
    assert reaper.argv == global_flags(bundle, "crun", "/run/other") + \
        ["--criu", "/opt/criu", "--systemd-cgroup", "start", CID]


def test_the_delete_action_command_line(bundle):
    # shim/binary/cleanup.py builds its `runc delete --force` with the same flags.
    assert RuncConfig(systemd_cgroup=True).command(NS, bundle, "delete", "--force", CID) == \
        global_flags(bundle) + ["--systemd-cgroup", "delete", "--force", CID]


def test_runc_runs_in_the_bundle_without_notify_socket(make_runc, reaper, bundle, monkeypatch,
                                                       tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("PYSHIM_TEST_KEPT", "yes")
    seen = tmp_path / "seen"
    reaper.script = (f'pwd > {seen}; '
                     f'echo "notify=${{NOTIFY_SOCKET-unset}} kept=$PYSHIM_TEST_KEPT" >> {seen}')
    make_runc().start(CID)
    assert reaper.kwargs["cwd"] == bundle
    assert "NOTIFY_SOCKET" not in reaper.kwargs["env"]
    assert reaper.kwargs["env"]["PYSHIM_TEST_KEPT"] == "yes"
    assert seen.read_text() == f"{bundle}\nnotify=unset kept=yes\n"


def test_commands_without_stdio_never_inherit_the_shims_fds(make_runc, reaper):
    make_runc().start(CID)
    kw = reaper.kwargs
    # stderr is captured (runc's message when log.json has none); nothing else is open.
    assert (kw["stdin"], kw["stdout"], kw["stderr"]) == \
        (subprocess.DEVNULL, subprocess.DEVNULL, subprocess.PIPE)


def test_given_stdio_goes_to_runc_and_unused_streams_to_dev_null(make_runc, reaper, bundle):
    r, w = os.pipe()
    try:
        make_runc().create(CID, f"{bundle}/init.pid", (None, w, None))
        kw = reaper.kwargs
        assert (kw["stdin"], kw["stdout"], kw["stderr"]) == \
            (subprocess.DEVNULL, w, subprocess.DEVNULL)
    finally:
        os.close(r)
        os.close(w)


# -- the verbs ------------------------------------------------------------------------

STDIO = (None, None, None)

VERBS: list[tuple[str, dict[str, Any], Callable[[Runc, str], None], list[str]]] = [
    ("create", {}, lambda r, b: r.create(CID, f"{b}/init.pid", STDIO),
     ["create", "--bundle", "{B}", "--pid-file", "{B}/init.pid", CID]),
    ("create tty", {},
     lambda r, b: r.create(CID, f"{b}/init.pid", STDIO, "/tmp/pty1/pty.sock"),
     ["create", "--bundle", "{B}", "--pid-file", "{B}/init.pid", "--console-socket",
      "/tmp/pty1/pty.sock", CID]),
    ("create options", {"no_pivot_root": True, "no_new_keyring": True},
     lambda r, b: r.create(CID, f"{b}/init.pid", STDIO, "/tmp/pty1/pty.sock"),
     ["create", "--bundle", "{B}", "--pid-file", "{B}/init.pid", "--console-socket",
      "/tmp/pty1/pty.sock", "--no-pivot", "--no-new-keyring", CID]),
    ("start", {}, lambda r, b: r.start(CID), ["start", CID]),
    ("exec", {}, lambda r, b: r.exec(CID, "/tmp/runc-process1", f"{b}/e1.pid", STDIO),
     ["exec", "--process", "/tmp/runc-process1", "--detach", "--pid-file", "{B}/e1.pid", CID]),
    ("exec tty", {},
     lambda r, b: r.exec(CID, "/tmp/runc-process1", f"{b}/e1.pid", STDIO, "/tmp/pty2/pty.sock"),
     ["exec", "--process", "/tmp/runc-process1", "--console-socket", "/tmp/pty2/pty.sock",
      "--detach", "--pid-file", "{B}/e1.pid", CID]),
    ("kill", {}, lambda r, b: r.kill(CID, 9), ["kill", CID, "9"]),
    ("kill all", {}, lambda r, b: r.kill(CID, 15, all=True), ["kill", "--all", CID, "15"]),
    ("delete", {}, lambda r, b: r.delete(CID), ["delete", CID]),
    ("pause", {}, lambda r, b: r.pause(CID), ["pause", CID]),
    ("resume", {}, lambda r, b: r.resume(CID), ["resume", CID]),
    ("update", {}, lambda r, b: r.update(CID, b"{}"), ["update", "--resources", "-", CID]),
    ("checkpoint", {}, lambda r, b: r.checkpoint(CID, "/img", "/work", leave_running=False),
     ["checkpoint", "--image-path", "/img", "--work-path", "/work", CID]),
    ("checkpoint leave running", {},
     lambda r, b: r.checkpoint(CID, "/img", "/work", leave_running=True),
     ["checkpoint", "--image-path", "/img", "--work-path", "/work", "--leave-running", CID]),
    ("checkpoint tcp", {},
     lambda r, b: r.checkpoint(CID, "/img", "/work", leave_running=False, tcp_established=True),
     ["checkpoint", "--image-path", "/img", "--work-path", "/work", "--tcp-established", CID]),
    ("checkpoint unix", {},
     lambda r, b: r.checkpoint(CID, "/img", "/work", leave_running=False, ext_unix_sk=True),
     ["checkpoint", "--image-path", "/img", "--work-path", "/work", "--ext-unix-sk", CID]),
    ("checkpoint shell job", {},
     lambda r, b: r.checkpoint(CID, "/img", "/work", leave_running=False, shell_job=True),
     ["checkpoint", "--image-path", "/img", "--work-path", "/work", "--shell-job", CID]),
    ("checkpoint file locks", {},
     lambda r, b: r.checkpoint(CID, "/img", "/work", leave_running=False, file_locks=True),
     ["checkpoint", "--image-path", "/img", "--work-path", "/work", "--file-locks", CID]),
    ("checkpoint cgroups mode", {},
     lambda r, b: r.checkpoint(CID, "/img", "/work", leave_running=False, cgroups_mode="soft"),
     ["checkpoint", "--image-path", "/img", "--work-path", "/work",
      "--manage-cgroups-mode", "soft", CID]),
    ("checkpoint empty ns", {},
     lambda r, b: r.checkpoint(CID, "/img", "/work", leave_running=False,
                               empty_ns=["network", "ipc"]),
     ["checkpoint", "--image-path", "/img", "--work-path", "/work",
      "--empty-ns", "network", "--empty-ns", "ipc", CID]),
    ("checkpoint everything", {},
     lambda r, b: r.checkpoint(CID, "/img", "/work", leave_running=True, tcp_established=True,
                               ext_unix_sk=True, shell_job=True, file_locks=True,
                               cgroups_mode="full", empty_ns=["network"]),
     ["checkpoint", "--image-path", "/img", "--work-path", "/work", "--tcp-established",
      "--ext-unix-sk", "--shell-job", "--file-locks", "--manage-cgroups-mode", "full",
      "--empty-ns", "network", "--leave-running", CID]),
    ("restore", {}, lambda r, b: r.restore(CID, "/img", "/work", f"{b}/init.pid", STDIO),
     ["restore", "--image-path", "/img", "--work-path", "/work", "--detach", "--pid-file",
      "{B}/init.pid", "-no-subreaper", "--bundle", "{B}", CID]),
    ("restore everything", {"no_pivot_root": True},
     lambda r, b: r.restore(CID, "/img", "/work", f"{b}/init.pid", STDIO,
                            parent_path="/parent", console_socket="/tmp/pty3/pty.sock"),
     ["restore", "--image-path", "/img", "--work-path", "/work", "--parent-path", "/parent",
      "--detach", "--pid-file", "{B}/init.pid", "--console-socket", "/tmp/pty3/pty.sock",
      "--no-pivot", "-no-subreaper", "--bundle", "{B}", CID]),
]


@pytest.mark.parametrize("options,call,args", [v[1:] for v in VERBS], ids=[v[0] for v in VERBS])
def test_command_lines(make_runc, reaper, bundle, options, call, args):
    call(make_runc(**options), bundle)
    assert reaper.argv == global_flags(bundle) + [a.replace("{B}", bundle) for a in args]


def test_update_sends_the_resources_on_stdin(make_runc, reaper, tmp_path):
    got = tmp_path / "stdin"
    reaper.script = f"cat > {got}"
    resources = json.dumps({"cpu": {"shares": 512}, "memory": {"limit": 1 << 26}}).encode()
    make_runc().update(CID, resources)
    assert reaper.kwargs["stdin"] == subprocess.PIPE
    assert got.read_bytes() == resources


def test_update_survives_a_runc_that_does_not_read_its_stdin(make_runc, reaper):
    reaper.script = "exit 0"  # exits before reading: the shim's write hits EPIPE
    make_runc().update(CID, b"x" * (1 << 20))


@pytest.mark.parametrize("output,pids", [
    ("[1234,1240,77]\n", [1234, 1240, 77]), ("[\n  1,\n  2\n]\n", [1, 2]), ("[]\n", []),
    ("null\n", []), ("", []), ("\n", []),
])
def test_ps_reads_the_pids_runc_prints(make_runc, reaper, output, pids):
    reaper.script = f"printf '{output}'"
    assert make_runc().ps(CID) == pids
    assert reaper.kwargs["stdout"] == subprocess.PIPE


@pytest.mark.parametrize("output", ["not json\n", '{"pids": [1]}\n', '["one"]\n'])
def test_ps_output_that_is_no_pid_list_is_a_runc_error(make_runc, reaper, output):
    reaper.script = f"printf '{output}'"
    with pytest.raises(RuncError, match="runc ps: unexpected output"):
        make_runc().ps(CID)


# -- errors -------------------------------------------------------------------------------


def log_line(level: str, msg: str) -> str:
    return json.dumps({"level": level, "msg": msg, "time": "2026-12-03T11:00:00Z"})


def test_last_error_is_the_last_error_or_fatal_line(make_runc, bundle):
    runc = make_runc()
    assert runc.last_error() == ""  # no log.json yet
    lines = [log_line("info", "starting"), log_line("error", "an older error"),
             log_line("fatal", "container_linux.go:380: starting container process caused: "
                               "exec: \"nope\": executable file not found in $PATH"),
             log_line("warning", "after the error"), "not json at all", '"a json string"',
             "[1, 2]", ""]
    Path(bundle, "log.json").write_text("\n".join(lines))
    assert runc.last_error().startswith("container_linux.go:380: starting container")
    with open(Path(bundle, "log.json"), "a") as f:
        f.write(log_line("error", "runc create failed: unable to start container process") + "\n")
    assert runc.last_error() == "runc create failed: unable to start container process"


def test_last_error_reads_only_the_tail_of_a_long_log(make_runc, bundle):
    noise = log_line("info", "x" * 200)
    Path(bundle, "log.json").write_text(log_line("error", "long ago") + "\n" +
                                        (noise + "\n") * 1000)
    assert make_runc().last_error() == ""
    with open(Path(bundle, "log.json"), "a") as f:
        f.write(log_line("error", "recent") + "\n" + (noise + "\n") * 100)
    assert make_runc().last_error() == "recent"


def test_a_failure_raises_runcs_log_json_error(make_runc, reaper):
    # runc runs in the bundle, so a relative log.json is the one --log names.
    line = log_line("error", "container \"c1\" does not exist")
    reaper.script = f"echo '{line}' >> log.json; echo 'something on stderr' >&2; exit 1"
    with pytest.raises(RuncError) as err:
        make_runc().delete(CID)
    assert str(err.value) == 'container "c1" does not exist'


def test_a_failure_without_a_log_line_raises_stderr(make_runc, reaper):
    reaper.script = "echo '  runc: unknown flag --frob  ' >&2; exit 2"
    with pytest.raises(RuncError) as err:
        make_runc().kill(CID, 9)
    assert str(err.value) == "runc: unknown flag --frob"


def test_a_silent_failure_names_the_command_and_status(make_runc, reaper):
    reaper.script = "exit 3"
    with pytest.raises(RuncError) as err:
        make_runc(binary="crun").pause(CID)
    assert str(err.value) == "crun pause exited with status 3"


def test_a_failure_caused_by_a_signal_says_128_plus_the_signal(make_runc, reaper):
    reaper.script = "kill -KILL $$"
    with pytest.raises(RuncError) as err:
        make_runc().resume(CID)
    assert str(err.value) == "runc resume exited with status 137"


def test_an_old_error_in_log_json_is_not_blamed_on_a_success(make_runc, reaper, bundle):
    Path(bundle, "log.json").write_text(log_line("error", "from an earlier command") + "\n")
    make_runc().start(CID)  # exit 0: no error at all


def test_a_missing_binary_raises_runc_error(bundle):
    class NoBinary:
        def spawn(self, argv: list[str], **kwargs: Any) -> FakeChild:
            return FakeChild(subprocess.Popen(argv, **kwargs))

    runc = Runc(NoBinary(), RuncConfig(binary="/nonexistent/runc"),  # type: ignore[arg-type]
                NS, bundle)
    with pytest.raises(RuncError) as err:
        runc.start(CID)
    assert str(err.value) == "/nonexistent/runc: No such file or directory"


def test_output_pipes_are_closed_after_the_command(make_runc, reaper):
    reaper.script = "echo '[1]'"
    make_runc().ps(CID)
    [child] = reaper.children
    assert child.popen.stdout is not None and child.popen.stdout.closed
    assert child.popen.stderr is not None and child.popen.stderr.closed


def test_a_chatty_stderr_does_not_block_captured_output(make_runc, reaper):
    # runc filling its stderr pipe while the shim waits for the end of stdout would
    # block both for ever: the two are read together.
    reaper.script = "head -c 200000 /dev/zero | tr '\\0' w >&2; echo '[7]'"
    result: list[list[int]] = []
    t = threading.Thread(target=lambda: result.append(make_runc().ps(CID)), daemon=True)
    t.start()
    t.join(DEADLINE)
    if t.is_alive():
        reaper.children[-1].popen.kill()  # let the test end
        t.join(DEADLINE)
    assert result == [[7]]


# -- the `running` hook -------------------------------------------------------------------


def test_running_is_called_while_runc_runs(make_runc, reaper, tmp_path):
    """create and exec call `running` once runc has started and before it has finished,
    so that the stdio copy loops start while runc does."""
    gate = tmp_path / "gate"
    reaper.script = f"while [ ! -e {gate} ]; do sleep 0.01; done"  # runs until released
    seen: list[bool] = []

    def running() -> None:
        child = reaper.children[-1]
        seen.append(child.popen.poll() is None)  # still running
        gate.touch()

    make_runc().exec(CID, "/p.json", "/pid", (None, None, None), running=running)
    assert seen == [True]
    gate.unlink()
    make_runc().create(CID, "/pid", (None, None, None), running=running)
    assert seen == [True, True]


def test_a_failing_running_hook_kills_runc_and_raises(make_runc, reaper):
    reaper.script = "sleep 30"

    def running() -> None:
        raise RuntimeError("can't start new thread")

    with pytest.raises(RuntimeError):
        make_runc().exec(CID, "/p.json", "/pid", (None, None, None), running=running)
    [child] = reaper.children
    assert child.popen.poll() is not None  # killed and reaped, not left running
