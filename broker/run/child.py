"""The child of `credbroker run`: resolve it, build its environment, spawn it, supervise it, stop its tree.

Signals: SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are blocked in
the broker and read with ``sigtimedwait``, which tells who sent each one. A
signal some process sent to the broker is forwarded to the child. A signal
the terminal sent (``si_code == SI_KERNEL``: Ctrl-C, Ctrl-\\, hang-up) already
went to the whole foreground process group, child included, so it is not sent
a second time.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..config import BROKER_CREDENTIAL_VARS, Profile
from ..errors import CommandNotExecutable, CommandNotFound, NestedRunError, RunError
from ..secret import Credentials
from .. import childenv

FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

#: Job control from the terminal: Ctrl-Z stops the bot's group and the broker; `fg` continues both.
JOB_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTSTP, signal.SIGCONT)

#: Every signal the broker blocks and reads with sigtimedwait while a child runs.
BLOCKED_SIGNALS: tuple[signal.Signals, ...] = (*FORWARDED_SIGNALS, *JOB_SIGNALS, signal.SIGCHLD)

SI_KERNEL = 0x80  # Linux: the signal came from the kernel (a terminal), not kill(2)

#: Set in every child; its presence makes a nested `credbroker run` refuse.
NEST_VAR = childenv.RUN

def check_not_nested(environ: Mapping[str, str]) -> None:
    """Refuse to run inside a child of `credbroker run` (as aws-vault does)."""
    if environ.get(NEST_VAR):
        raise NestedRunError(
            f"already inside `credbroker run` ({NEST_VAR}={environ[NEST_VAR]}: this shell is a child of that broker)",
            f"run the command directly (its secrets are already in the environment), or `env -u {NEST_VAR}` "
            "to nest on purpose",
        )

def resolve_command(name: str, path: str | None) -> str:
    """The executable to run, resolved like execvp; raises 127/126 errors as `env` does."""
    if not name:
        raise CommandNotFound("empty command", "give the command to run after --")
    if "/" in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d or ".", name) for d in (path or os.defpath).split(os.pathsep)]
    not_executable: str | None = None
    directory: str | None = None
    for cand in candidates:
        try:
            st = os.stat(cand)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            directory = directory or cand
            continue
        if os.access(cand, os.X_OK):
            return cand
        not_executable = not_executable or cand
    if not_executable:
        raise CommandNotExecutable(f"command not executable: {not_executable}", "check its permissions (chmod +x)")
    if directory:
        raise CommandNotExecutable(f"command is a directory: {directory}",
                                   f"name the program to run, e.g. -- python {directory.rstrip('/')}/bot.py")
    raise CommandNotFound(f"command not found: {name}", "check the name and PATH")

def child_environment(
    parent: Mapping[str, str],
    profile: Profile,
    creds: Credentials,
    extra: Mapping[str, str] | None = None,
) -> dict[bytes, bytes]:
    """The child's environment, as bytes (the only place secrets leave ``Secret``).

    The broker's own powers (``VAULT_TOKEN``, ``BAO_TOKEN``, AppRole ids, the
    audit key) and any stale copy of an injected name are removed first.
    """
    env: dict[bytes, bytes] = {}
    drop = BROKER_CREDENTIAL_VARS | set(profile.env) | {"CREDBROKER_ROLE_ID_FILE", "CREDBROKER_SECRET_ID_FILE"}
    for key, value in parent.items():
        if key in drop:
            continue
        env[os.fsencode(key)] = os.fsencode(value)
    markers = {
        NEST_VAR: str(os.getpid()),
        childenv.PROFILE: profile.name,
        childenv.ENV_MAP: childenv.encode_env_map(profile.env),
        **(extra or {}),
    }
    for key, value in markers.items():
        env[key.encode()] = value.encode()
    for var, field_name in profile.env.items():
        secret_bytes = creds[field_name].reveal()
        if b"\0" in secret_bytes:
            raise RunError(
                f"field {field_name!r} contains a NUL byte and cannot be passed in the environment variable {var}",
                "store the value as text (e.g. base64)",
            )
        env[var.encode()] = secret_bytes
    return env

def exit_status(returncode: int) -> int:
    """Popen's returncode as a shell reports it: 128+N when signal N ended the child."""
    return 128 - returncode if returncode < 0 else returncode

class Child:
    """A started child process and what the audit log wants to know about it.

    ``pid`` is the bot (signals go there); ``pgid`` its process group, which
    holds its whole tree and is what gets stopped. They differ from
    ``proc.pid`` only in a sandbox, where ``proc`` is bubblewrap.
    """

    __slots__ = ("proc", "argv", "started", "stopping", "bot_pid")

    def __init__(self, proc: subprocess.Popen[bytes], argv: list[str], bot_pid: int | None = None) -> None:
        self.proc = proc
        self.argv = argv
        self.started = time.monotonic()
        self.stopping = False  # a stop signal (INT/TERM/HUP/QUIT) was passed on
        self.bot_pid = bot_pid

    @property
    def pid(self) -> int:
        return self.bot_pid or self.proc.pid

    @property
    def pgid(self) -> int:
        return self.proc.pid  # the child leads its own group (or session)

    def reap(self) -> None:
        """Collect the direct child if it has exited (it then stops counting as a group member)."""
        self.proc.poll()

def spawn(argv: Sequence[str], executable: str, env: Mapping[bytes, bytes], stdio: Any = None,
          pass_fds: Sequence[int] = (), as_user: Any = None, cgroup: str | None = None) -> Child:
    """Start the child in a process group of its own, forwarded signals unblocked, a parent-death signal.

    ``stdio`` (a ``broker.masking.ChildStdio``, for ``--mask``) gives the
    child a pty or pipes whose output the broker masks. ``pass_fds`` are
    inherited (the audit relay); every other descriptor is closed.
    ``as_user`` (a ``broker.separation.UserSwitch``) runs it as another user.
    ``cgroup`` (a cgroup v2 folder) receives the child before it executes.
    """
    setup = _child_setup(os.getpid(), stdio, as_user, cgroup)
    options: dict[str, Any] = dict(stdio.popen_args()) if stdio is not None else {}
    if not options.get("start_new_session"):
        # Its own group, so that its whole tree can be stopped (and the watchdog
        # can do it after our death); a pty session leads one anyway.
        options["process_group"] = 0
    try:
        proc = subprocess.Popen(  # noqa: S603 - the user's own command, no shell
            list(argv),
            executable=executable,
            env=env,
            close_fds=True,
            pass_fds=tuple(pass_fds),
            # PDEATHSIG and the signal mask can only be set in the child. The broker
            # may have threads by now (audit relay, agent, masking), so `setup` is
            # kept to C-level calls (pthread_sigmask, open/write/close, setgroups/
            # setresgid/setresuid, prctl through an already loaded libc, getppid,
            # ioctl): no import, no Python lock that another thread could hold
            # across the fork.
            preexec_fn=setup,  # noqa: PLW1509
            **options,
        )
    except OSError as exc:
        raise _start_error(argv[0], exc) from exc
    finally:
        if stdio is not None:
            stdio.spawned()  # close the child's ends here; the masking thread starts now
    return Child(proc=proc, argv=list(argv))

def _child_setup(parent: int, stdio: Any, as_user: Any, cgroup: str | None) -> Callable[[], None]:
    """What runs in the child between fork and exec (``preexec_fn``): C-level calls only (see ``spawn``)."""
    from ..hardening import die_with_parent

    procs = os.path.join(cgroup, "cgroup.procs") if cgroup else None

    def setup() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED_SIGNALS)
        if procs is not None:  # first, while we may still move ourselves; before exec, so no fork escapes it
            try:
                fd = os.open(procs, os.O_WRONLY)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)
            except OSError:
                pass  # the process group still holds the tree
        if as_user is not None:
            as_user.switch()
        die_with_parent(parent, signal.SIGTERM)  # after the switch, which would clear it
        if stdio is not None:
            stdio.in_child()

    return setup


def _start_error(name: str, exc: OSError) -> RunError:
    """Why the kernel would not start ``name``, as ``env`` reports it (126 not executable, 127 not found)."""
    if isinstance(exc, PermissionError):
        return CommandNotExecutable(f"permission denied executing {name}", "check its permissions")
    if isinstance(exc, FileNotFoundError):
        return CommandNotFound(f"cannot execute {name}: it or its interpreter (#! line) was not found",
                               "check the command")
    if exc.errno == errno.E2BIG:
        return RunError(f"cannot start {name}: the command line and environment are too long for the kernel",
                        "pass large data through a file or stdin")
    if exc.errno == errno.ENOEXEC:
        return CommandNotExecutable(f"cannot execute {name}: not a valid executable (exec format error)",
                                    "add a #! line or run it through its interpreter")
    return RunError(f"cannot start {name}: {exc.strerror}", "check the command")


#: Signals after which a child's exit is an intended stop, never restarted.
_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})

def supervise(child: Child, *, on_wake: Callable[[], bool] | None = None, notifier: Any = None) -> int | None:
    """Forward signals to the child until it exits; return its exit status.

    ``BLOCKED_SIGNALS`` must already be blocked (``run`` does that before
    spawning, so that no signal is lost in between). Vault work never runs
    here: a rotation worker thread wakes this loop with SIGCHLD
    (``pthread_kill``) when it has something to hand over, and ``on_wake``
    applies it; when it returns True supervision stops and None is returned
    (the caller restarts the child). ``child.stopping`` is set once a stop
    signal (INT, TERM, HUP, QUIT) reached the child. ``notifier``
    (``broker.sdnotify``, under systemd) is fed its watchdog between signals
    and told when a stop signal arrives.
    """
    waitset = set(BLOCKED_SIGNALS)
    # Wake at least once a second: should a signal ever land on a thread that does not block it, Python
    # records it there and raises it here only when this thread runs again (never inside a long wait).
    wait = min(notifier.watchdog_interval, 1.0) if notifier is not None and notifier.watchdog_interval else 1.0
    while True:
        rc = child.proc.poll()
        if rc is not None:
            return exit_status(rc)
        if on_wake is not None and on_wake():
            return None
        info = signal.sigtimedwait(waitset, wait)
        if notifier is not None:
            notifier.watchdog()  # this loop is alive: a hung supervisor is what the watchdog is for
        if info is None or info.si_signo == signal.SIGCHLD:
            continue  # poll() and on_wake() at the top of the loop
        if info.si_signo in _STOP_SIGNALS:
            child.stopping = True
            if notifier is not None:
                notifier.stopping(f"{signal.Signals(info.si_signo).name} received")
        if info.si_signo == signal.SIGTSTP:
            _job_stop(child)
            continue
        if info.si_signo == signal.SIGCONT:
            from ..watchdog import signal_group

            signal_group(child.pgid, signal.SIGCONT)
            continue
        if info.si_code == SI_KERNEL:
            # From the terminal: it went to our (foreground) group; the bot's
            # group is not the terminal's, so it gets it from us, once, whole.
            from ..watchdog import signal_group

            signal_group(child.pgid, info.si_signo)
            continue
        try:
            os.kill(child.pid, info.si_signo)
        except ProcessLookupError:
            pass

def _job_stop(child: Child) -> None:
    """Ctrl-Z (or SIGTSTP): stop the bot's group, then ourselves, as a shell's job would stop."""
    from ..watchdog import signal_group

    signal_group(child.pgid, signal.SIGTSTP)
    os.kill(os.getpid(), signal.SIGSTOP)  # SIGCONT (`fg`, `bg`) resumes us; supervise() passes it on

def stop_gracefully(child: Child, grace: float) -> int:
    """SIGTERM to the bot's whole group, up to ``grace`` seconds, then SIGKILL; the bot's exit status."""
    from ..watchdog import stop_group

    if child.proc.poll() is None:
        try:
            os.kill(child.pid, signal.SIGTERM)  # the bot first, as before; its group right after
        except ProcessLookupError:
            pass
    stop_group(child.pgid, grace, reap=child.reap)
    if child.proc.poll() is None:
        child.proc.kill()
    return exit_status(child.proc.wait())

def launch(command: Sequence[str], executable: str, env: Mapping[bytes, bytes], stdio: Any,
           fds: Sequence[int], as_user: Any, box: Any, cgroup: str | None = None) -> Child:
    """``spawn`` the bot, as another user (``as_user``) and/or in a sandbox (``box``) when asked."""
    from ..cmdline import check_exec_size

    if box is None:
        check_exec_size(command, env)
        return spawn(command, executable, env, stdio, pass_fds=fds, as_user=as_user, cgroup=cgroup)
    from ..separation import read_bot_pid

    info_r, info_w = os.pipe2(os.O_CLOEXEC)
    try:
        argv = box.argv(executable, command, info_w)
        check_exec_size(argv, env)
        child = spawn(argv, box.bwrap, env, stdio, pass_fds=(*fds, info_w), as_user=as_user, cgroup=cgroup)
    except BaseException:
        os.close(info_r)
        raise
    finally:
        os.close(info_w)
    child.argv = list(command)
    child.bot_pid = read_bot_pid(info_r)  # bwrap passes no signal on: they go to the bot itself
    return child

def stop_tree(child: Child, grace: float, watchdog: Any, cgroup: str | None) -> int:
    """Stop the bot's whole group and what is left in its cgroup (no-ops once empty); its exit status."""
    status = stop_gracefully(child, grace)
    watchdog.release(child.pgid)
    if cgroup is not None:
        from ..watchdog import stop_cgroup

        stop_cgroup(cgroup, grace)
    return status

def pause(seconds: float) -> int | None:
    """Sleep while no child runs; a forwarded signal ends the pause and is returned."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        info = signal.sigtimedwait(set(FORWARDED_SIGNALS), left)
        if info is not None and info.si_signo in _STOP_SIGNALS:
            return int(info.si_signo)
    return None
