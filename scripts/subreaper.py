#!/usr/bin/env python3
"""Run a command as the child of a child subreaper that reaps every orphan.

PID 1 on the test machines never reaps orphans, so a shim daemon that
daemonizes (its `start` process exits) or a container process whose shim died
would stay a zombie forever. Running containerd under this program makes it the
nearest subreaper (prctl PR_SET_CHILD_SUBREAPER): such orphans are re-parented
here and reaped.

    subreaper.py [--grace SECONDS] [--restartable] -- COMMAND [ARG...]

* COMMAND runs with default signal dispositions and an empty signal mask.
* SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are forwarded to it.
* Every child (COMMAND, and every orphan re-parented here) is reaped.
* When COMMAND exits, the descendants still alive get GRACE seconds (default
  2) to exit on their own; then each one left is named on stderr as
  "subreaper: killing leftover pid PID (PPID ppid): ARGS" and sent SIGKILL, and
  all are reaped. A forwarded signal during the grace period ends it at once.
* The exit status is COMMAND's: its exit code, or 128 + the signal that ended it.

With --restartable (the end-to-end tests restart containerd while its shims run):
* SIGHUP is not forwarded; it asks for COMMAND to be started again once it has exited.
* When COMMAND exits other than after a forwarded SIGTERM, SIGINT or SIGQUIT (e.g. it
  was SIGKILLed), its descendants are left alone and reaped as usual: a pending or
  later SIGHUP starts COMMAND again, a SIGTERM, SIGINT or SIGQUIT ends the subreaper
  as above (grace period, leftovers killed, COMMAND's last exit status).

Standard library only; Linux only.
"""
import argparse
import ctypes
import os
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
HANDLED = set(FORWARDED) | {signal.SIGCHLD}
ENDING = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)  # forwarded, they end a --restartable run too
KILL_ROUNDS_TIMEOUT = 10.0


def log(msg):
    print(f"subreaper: {msg}", file=sys.stderr, flush=True)


def set_child_subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def spawn(argv):
    """fork + exec argv with default dispositions and an unblocked signal mask; return its pid."""
    pid = os.fork()
    if pid:
        return pid
    try:
        for sig in range(1, signal.NSIG):
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                continue
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass  # reserved realtime signals
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.execvp(argv[0], argv)
    except OSError as e:
        os.write(2, f"subreaper: cannot run {argv[0]}: {e.strerror}\n".encode())
    os._exit(127)


def wait_status_code(status):
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def reap(main_pid):
    """Reap every exited child. Returns (status of main_pid or None, whether children remain)."""
    main_status = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return main_status, False
        if pid == 0:
            return main_status, True
        if pid == main_pid:
            main_status = status


def descendants(root, zombies=False):
    """(pid, args) of every live descendant of root (with `zombies`, the unreaped dead too),
    parents before their children."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        comm_end = stat.rindex(b")")
        state, ppid = stat[comm_end + 2:].split()[:2]
        if zombies or state != b"Z":
            comm = stat[stat.index(b"(") + 1:comm_end].decode(errors="replace")
            children.setdefault(int(ppid), []).append((int(entry), args or comm))
    found, todo = [], [root]
    while todo:
        for pid, args in children.get(todo.pop(), []):
            found.append((pid, args))
            todo.append(pid)
    return found


def kill_leftovers():
    """SIGKILL every live descendant, naming each on stderr, until none is left to reap."""
    deadline = time.monotonic() + KILL_ROUNDS_TIMEOUT
    killed = set()
    while time.monotonic() < deadline:
        for pid, args in descendants(os.getpid()):
            if pid not in killed:  # a killed process may take a moment to become a zombie
                log(f"killing leftover pid {pid}: {args}")
                killed.add(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, remaining = reap(None)
        if not remaining:
            return
        signal.sigtimedwait([signal.SIGCHLD], 0.1)
    log("gave up: descendants still not reaped")


def run(argv, grace, restartable=False):
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    set_child_subreaper()
    ending = False  # a forwarded SIGTERM/SIGINT/SIGQUIT: no restart
    while True:
        main_pid = spawn(argv)
        main_status = None
        restart = False  # --restartable: SIGHUP seen
        while main_status is None:
            info = signal.sigwaitinfo(HANDLED)
            if info.si_signo == signal.SIGCHLD:
                main_status, _ = reap(main_pid)
            elif restartable and info.si_signo == signal.SIGHUP:
                restart = True
            else:
                ending = ending or info.si_signo in ENDING
                try:
                    os.kill(main_pid, info.si_signo)
                except ProcessLookupError:
                    pass
        if not restartable or ending:
            break
        log(f"{argv[0]} exited with status {wait_status_code(main_status)}; waiting for SIGHUP to start it again")
        while not (restart or ending):  # COMMAND is down: keep reaping orphans
            info = signal.sigwaitinfo(HANDLED)
            if info.si_signo == signal.SIGCHLD:
                reap(None)
            restart = info.si_signo == signal.SIGHUP
            ending = info.si_signo in ENDING
        if ending:
            break
    deadline = time.monotonic() + grace
    while True:
        _, remaining = reap(None)
        left = deadline - time.monotonic()
        if not remaining:
            break
        if left <= 0:
            kill_leftovers()
            break
        info = signal.sigtimedwait(HANDLED, left)
        if info is not None and info.si_signo != signal.SIGCHLD:
            kill_leftovers()
            break
    return wait_status_code(main_status)


def main(argv=None):
    parser = argparse.ArgumentParser(usage="%(prog)s [--grace SECONDS] [--restartable] -- COMMAND [ARG...]",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--grace", type=float, default=2.0,
                        help="seconds descendants get to exit after COMMAND exits (default %(default)s)")
    parser.add_argument("--restartable", action="store_true",
                        help="SIGHUP starts COMMAND again after it died; see above")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    return run(command, args.grace, args.restartable)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError as e:
        log(str(e))
        sys.exit(127)
