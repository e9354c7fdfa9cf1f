"""`credbroker run`: fetch, inject, start, supervise, return the child's status.

The order is chosen so that nothing is fetched for a run that cannot start:

1. refuse to nest (``CREDBROKER_RUN`` is set in a child of ``credbroker run``);
2. harden the broker (no core dumps, not dumpable);
3. resolve the command on the child's PATH (127 not found, 126 not executable);
4. fetch every field the profile names (fail closed: exit 125 on any failure);
5. build the child's environment: the broker's own, minus its Vault
   credentials and stale copies of the injected names, plus the secrets;
6. start the child with the forwarded signals unblocked and a parent-death
   signal, wipe the broker's copies of the secrets, and supervise it.

Signals: SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are blocked in
the broker and read with ``sigtimedwait``, which tells who sent each one. A
signal some process sent to the broker is forwarded to the child. A signal
the terminal sent (``si_code == SI_KERNEL``: Ctrl-C, Ctrl-\\, hang-up) already
went to the whole foreground process group, child included, so it is not sent
a second time.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, closing
from enum import StrEnum
from typing import Any

from .config import BROKER_CREDENTIAL_VARS, ENV_CONFIG, Profile
from .errors import BrokerError, CommandNotExecutable, CommandNotFound, NestedRunError, RunError
from .secret import Credentials

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
NEST_VAR = "CREDBROKER_RUN"


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
        "CREDBROKER_PROFILE": profile.name,
        "CREDBROKER_ENV_MAP": json.dumps(dict(profile.env), separators=(",", ":")),
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


def check_profiles(profiles: Sequence[Profile]) -> None:
    """Several profiles in one run: refused before anything is fetched when a profile is named twice or two
    profiles would set the same variable (one would silently overwrite the other's secret)."""
    seen: dict[str, str] = {}
    names: set[str] = set()
    for p in profiles:
        if p.name in names:
            raise RunError(f"profile {p.name!r} is named twice", "give each profile once")
        names.add(p.name)
        for var in p.env:
            if var in seen:
                raise RunError(
                    f"profiles {seen[var]!r} and {p.name!r} both set {var}: one would overwrite the other's secret",
                    f"map {var} in one profile only (rename it in the other's env table)",
                )
            seen[var] = p.name


#: The separator of a combined profile's field names (``profile/field``): keys of the run's own view, never parsed back.
_SEP = "/"


def combine(profiles: Sequence[Profile], creds: Sequence[Credentials]) -> tuple[Profile, Credentials]:
    """One view of several profiles for the child's environment: every variable mapped to its profile's
    field, the secrets shared (not copied), so wiping the view wipes them all. One profile is itself."""
    if len(profiles) == 1:
        return profiles[0], creds[0]
    view = combined_profile(profiles)
    fields = {f"{p.name}{_SEP}{fld}": c[fld] for p, c in zip(profiles, creds) for fld in c}
    return view, Credentials(view.name, creds[0].origin, fields)


def combined_profile(profiles: Sequence[Profile]) -> Profile:
    """The profile half of ``combine``: each variable mapped to ``profile/field``."""
    if len(profiles) == 1:
        return profiles[0]
    env = {var: f"{p.name}{_SEP}{fld}" for p in profiles for var, fld in p.env.items()}
    # The source the separation check looks at: the keyring when any profile reads it (the bot could ask it).
    source = "keyring" if any(p.source == "keyring" for p in profiles) else profiles[0].source
    return Profile(name=",".join(p.name for p in profiles), source=source, env=env)


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
    parent = os.getpid()
    from .hardening import die_with_parent

    procs = os.path.join(cgroup, "cgroup.procs") if cgroup else None

    def setup() -> None:  # runs in the child between fork and exec
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
    except PermissionError as exc:
        raise CommandNotExecutable(f"permission denied executing {argv[0]}", "check its permissions") from exc
    except FileNotFoundError as exc:
        raise CommandNotFound(
            f"cannot execute {argv[0]}: it or its interpreter (#! line) was not found", "check the command"
        ) from exc
    except OSError as exc:
        if exc.errno == errno.E2BIG:
            raise RunError(f"cannot start {argv[0]}: the command line and environment are too long for the kernel",
                           "pass large data through a file or stdin") from exc
        if exc.errno == errno.ENOEXEC:
            raise CommandNotExecutable(f"cannot execute {argv[0]}: not a valid executable (exec format error)",
                                       "add a #! line or run it through its interpreter") from exc
        raise RunError(f"cannot start {argv[0]}: {exc.strerror}", "check the command") from exc
    finally:
        if stdio is not None:
            stdio.spawned()  # close the child's ends here; the masking thread starts now
    return Child(proc=proc, argv=list(argv))


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
            from .watchdog import signal_group

            signal_group(child.pgid, signal.SIGCONT)
            continue
        if info.si_code == SI_KERNEL:
            # From the terminal: it went to our (foreground) group; the bot's
            # group is not the terminal's, so it gets it from us, once, whole.
            from .watchdog import signal_group

            signal_group(child.pgid, info.si_signo)
            continue
        try:
            os.kill(child.pid, info.si_signo)
        except ProcessLookupError:
            pass


def _job_stop(child: Child) -> None:
    """Ctrl-Z (or SIGTSTP): stop the bot's group, then ourselves, as a shell's job would stop."""
    from .watchdog import signal_group

    signal_group(child.pgid, signal.SIGTSTP)
    os.kill(os.getpid(), signal.SIGSTOP)  # SIGCONT (`fg`, `bg`) resumes us; supervise() passes it on


def stop_gracefully(child: Child, grace: float) -> int:
    """SIGTERM to the bot's whole group, up to ``grace`` seconds, then SIGKILL; the bot's exit status."""
    from .watchdog import stop_group

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
    from .cmdline import check_exec_size

    if box is None:
        check_exec_size(command, env)
        return spawn(command, executable, env, stdio, pass_fds=fds, as_user=as_user, cgroup=cgroup)
    from .separation import read_bot_pid

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


def _stop(child: Child, grace: float, watchdog: Any, cgroup: str | None) -> int:
    """Stop the bot's whole group and what is left in its cgroup (no-ops once empty); its exit status."""
    status = stop_gracefully(child, grace)
    watchdog.release(child.pgid)
    if cgroup is not None:
        from .watchdog import stop_cgroup

        stop_cgroup(cgroup, grace)
    return status


def _pause(seconds: float) -> int | None:
    """Sleep while no child runs; a forwarded signal ends the pause and is returned."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        info = signal.sigtimedwait(set(FORWARDED_SIGNALS), left)
        if info is not None and info.si_signo in _STOP_SIGNALS:
            return int(info.si_signo)
    return None


from .run.options import RESTART_POLICIES, Recorder, RestartPolicy, RunOptions  # noqa: E402

__all__ = ["RESTART_POLICIES", "Recorder", "RestartPolicy", "RunOptions", "run"]

_MAX_RESTART_DELAY = 60.0
_HEALTHY_AFTER = 60.0  # a child that ran this long resets the restart backoff


class Handling(StrEnum):
    """How the supervisor acts on a rotation the worker found (``broker.rotation.Handover.kind``)."""

    RESTART = "restart"  # stop the bot, start it again on the new secrets (once per batch)
    SWAP = "swap"  # --agent, same API key: the agent signs with the new key, the bot keeps running
    SIGNAL = "signal"  # send the policy's signal to the bot (once per kind per batch)
    IGNORE = "ignore"  # record it, nothing else


def run(options: RunOptions) -> int:
    """Fetch the profiles' secrets, run the command with them, return its exit status.

    Several profiles (``-p spot -p um-futures``) are fetched all or none (the
    bot never starts with a partial set), a variable two of them would set is
    refused before anything is fetched, each fetch is an audit record of its
    own, and a batch of rotations found in one check acts once. A rotation
    policy (``broker.rotation.RotationPolicy``) follows new versions of a
    vault secret; ``restart="on-failure"`` restarts a child that fails by
    itself, with backoff, from the secret already held (no new Vault read).
    ``agent`` (``--agent``): the signing key stays in the broker; the child
    gets the public API key and ``CREDBROKER_AGENT_SOCKET`` only, and
    ``get_signer()`` there signs through ``broker.agent``. ``preflight`` (a
    ``broker.preflight.PreflightOptions``; ``auto`` by default in agent mode,
    off otherwise) checks the key's restrictions on the exchange first.
    ``mask`` replaces every injected value in the child's stdout and stderr
    with a marker (``broker.masking``; a pty when stdout is a terminal).
    ``grace``: when the bot's process group is stopped (the run ends, a
    restart, the broker's death), seconds between SIGTERM and SIGKILL.
    ``user``/``group`` run the bot as another user, ``sandbox`` under
    bubblewrap; with ``agent`` one of them must keep the broker's own
    credentials from the bot, unless ``unsafe_shared_credentials``
    (``broker.separation``). ``proxy`` (``--proxy``): the key stays in the
    broker's signing proxy (``broker.proxy``); the child gets its URL and a
    per-run proxy secret.
    """
    return Run(options).execute()


class Run:
    """One `credbroker run`: ``execute`` reads top to bottom like the README's list of promises.

    Every resource is released by the ``ExitStack`` that took it, in the
    reverse order of taking: nothing of the bot's tree outlives the run, the
    secrets are wiped, scoped tokens revoked, the signal mask restored.
    """

    def __init__(self, options: RunOptions) -> None:
        self.o = options
        self.profiles: list[Profile] = list(options.profiles)
        self.command: list[str] = list(options.command)
        self.config: Any = options.config
        self.many = options.many
        self.policies: list[Any] = list(options.rotation)
        self.env: dict[str, str] = dict(os.environ if options.environ is None else options.environ)
        self.source_env: Mapping[str, str] = self.env
        self.audit_log: Any = None
        self.rec: Recorder = options.record or _no_record
        self.signings: list[Any] = []  # one per profile: its key check, and with --agent its agent
        self.executable = ""
        self.as_user: Any = None
        self.box: Any = None
        self.held: list[Credentials] = []  # each profile's secrets, as the running bot has them
        self.profile: Profile = self.profiles[0]
        self.creds: Credentials | None = None  # the combined view of ``held`` the child's environment is built from
        self.extra: dict[str, str] = {}  # what get_signer() needs in the child (never a secret of the broker's)
        self.signer_extras: list[dict[str, str]] = []  # each profile's, for revoking its scoped token at the end
        self.per_profile: list[dict[str, str]] = []
        self.visible: list[Profile] = self.profiles  # what the child sees of each profile
        self.child_parent: Mapping[str, str] = self.env
        self.child_profile: Profile = self.profile
        self.keep = False
        self.notifier: Any = None
        self.output: Any = None
        self.watchers: list[Any] = [None] * len(self.profiles)
        self.worker: Any = None
        self.pending: dict[int, Credentials] = {}  # the rotated credentials a restart will use, by profile index
        self.relay: Any = None
        self.proxy_run: Any = None
        self.watchdog: Any = None
        self.cgroup: str | None = None
        self.child: Child | None = None

    def execute(self) -> int:
        """The promises, in order; every resource taken is released on the way out, whatever happens."""
        self.harden()
        self.open_log()
        with ExitStack() as stack:
            self.prepare_signing(stack)
            self.resolve_command()
            self.fetch(stack)
            self.prepare_child_env(stack)
            self.prepare_rotation(stack)
            self.start_services(stack)
            self.start_first_child(stack)
            return self.supervise()

    # -- 1. before anything is fetched ----------------------------------------------------------------
    def harden(self) -> None:
        """Refuse to nest, refuse an empty command, then no core dumps and not dumpable."""
        from .config import with_config_defaults
        from .hardening import harden_process

        check_not_nested(self.env)
        if not self.command:
            raise CommandNotFound("no command given",
                                  "put the command after --, e.g. credbroker run -p P -- python bot.py")
        harden_process()
        self.source_env = with_config_defaults(self.env, self.config)

    def open_log(self) -> None:
        """Every access is audited; a log that cannot be written stops the run here, before any fetch."""
        if self.o.record is not None:
            return
        from .audit import open_log

        self.audit_log = open_log(getattr(self.config, "audit", None), env=self.source_env)
        self.audit_log.check_writable()
        self.rec = self.audit_log.record

    def prepare_signing(self, stack: ExitStack) -> None:
        """Each profile's key check (and with --agent its agent), validated before any fetch."""
        o = self.o
        if o.agent or (o.preflight is not None and o.preflight.mode != "off"):
            from .agent import RunSigning

            self.signings = [RunSigning.prepare(p, agent=o.agent, preflight=o.preflight, env=self.env)
                             for p in self.profiles]
            stack.callback(self._stop_signings)
            return
        for p in self.profiles:
            if p.sections.get("policy") and not o.proxy:
                from .signing_policy import SigningPolicy

                SigningPolicy.for_profile(p)  # a typo in it is still a one-line error
                # The bot holds the secret without --agent: nothing can enforce the policy. Say so every time.
                say(f"WARNING: {p.where('policy')} is enforced only with --agent; this bot holds the secret")

    def refused(self, exc: BrokerError, only: Profile | None = None) -> None:
        """Record why the run stops (for ``only``, else for every profile); the original error still wins."""
        from .access import refusal  # the one schema of a refusal (with Vault's request id when it answered)
        from .cmdline import audit_fields

        for p in [only] if only is not None else self.profiles:
            try:
                self.rec("refused", {**_refused_secret(p, self.source_env),
                                     **refusal(p, exc, "run", command=audit_fields(self.command)[0])})
            except BrokerError:
                pass  # the original failure is what the operator must see

    def resolve_command(self) -> None:
        """Profiles that collide, a command not found or too long, no separation: refused, nothing fetched."""
        from .cmdline import check_exec_size

        o = self.o
        try:
            if self.many:
                check_profiles(self.profiles)  # a collision is refused here: nothing has been fetched
            self.executable = resolve_command(self.command[0], self.env.get("PATH"))
            check_exec_size(self.command, self.env)  # a command line the kernel refuses: nothing fetched
            # The proxy, like the agent, keeps the key from the bot: the same separation from the broker's
            # own credentials applies to both.
            self.as_user, self.box = _separate(combined_profile(self.profiles), self.config, self.source_env,
                                               agent=o.agent or o.proxy, user=o.user, group=o.group,
                                               sandbox=o.sandbox, unsafe=o.unsafe_shared_credentials)
        except BrokerError as exc:
            self.refused(exc)
            raise

    # -- 2. fetch: all or nothing ----------------------------------------------------------------------
    def fetch(self, stack: ExitStack) -> None:
        """Every profile's secrets (wiped on the way out), their warnings, each key's check."""
        from . import sources
        from .access import value_warnings

        self.held = _fetch_all(self.profiles, self.source_env, self.rec, self.refused, sources.fetch)
        stack.callback(self._wipe)
        self.profile, self.creds = combine(self.profiles, self.held)
        self.child_profile = self.profile
        for p, c in zip(self.profiles, self.held):
            for line in value_warnings(p, c):  # a stored newline signs wrong on every request: say so
                say(f"WARNING: {line}")
        for i, signing in enumerate(self.signings):
            try:
                signing.check_key(self.held[i], record=self.rec, audit_config=getattr(self.config, "audit", None))
            except BrokerError as exc:
                self.refused(exc, self.profiles[i] if self.many else None)
                raise

    # -- 3. what the child gets ------------------------------------------------------------------------
    def prepare_child_env(self, stack: ExitStack) -> None:
        """What get_signer() needs in the child, and the environment the child's is built from."""
        o = self.o
        stack.callback(self._release_signer_tokens)
        if getattr(self.config, "path", None) and not o.agent and not o.proxy:
            # Not in agent mode: the config names the broker's credential files, and the
            # bot signs through the agent, whose relay records for it.
            self.extra["CREDBROKER_CONFIG"] = str(os.path.abspath(self.config.path))
        self.per_profile = [self._signer_env(p, c) for p, c in zip(self.profiles, self.held)]
        if not self.many:
            self.extra.update(self.per_profile[0])
        # Keep the secret (mlocked) only when the broker may need it again.
        self.keep = (o.agent or o.restart != RestartPolicy.NO
                     or any(p.action == "restart" for p in o.watched))
        self.child_parent = self._child_parent()

    def _signer_env(self, p: Profile, c: Credentials) -> dict[str, str]:
        """One profile's signer variables for the child: a transit profile's scoped token, the key's kind."""
        own: dict[str, str] = {}
        if self.o.agent or self.o.proxy:  # the broker signs, not the bot
            return own
        if "signer" in p.sections:
            from .signing import child_env as signer_env

            try:
                issued = signer_env(p, env=self.source_env)
            except BrokerError as exc:
                self.refused(exc, p if self.many else None)
                raise
            self.signer_extras.append(issued)
            own.update(issued)
        from .signing import key_env

        own.update(key_env(p, c))  # the bot holds the key: tell it the kind (and an unmapped passphrase)
        return own

    def _child_parent(self) -> dict[str, str]:
        """The broker's environment as the child may inherit it (the secrets are added at each start)."""
        o, parent = self.o, self.env
        if o.agent:  # the child sees each profile's API key variable only; the secret stays here
            views = [signing.child_view(self.env, p) for signing, p in zip(self.signings, self.profiles)]
            self.visible = [v[1] for v in views]
            dropped = {var for p in self.profiles for var in p.env}
            parent = {k: v for k, v in views[0][0].items() if k not in dropped}
            self.child_profile = combined_profile(self.visible)
        if self.env.get("NOTIFY_SOCKET"):  # under systemd: READY/STOPPING/watchdog are ours, never the bot's
            from .sdnotify import SD_VARIABLES, Notifier

            self.notifier = Notifier(self.env)
            parent = {k: v for k, v in parent.items() if k not in SD_VARIABLES}
        if o.proxy:  # a config path would name the broker's credential files: the bot under --proxy gets none
            parent = {k: v for k, v in parent.items() if k != "CREDBROKER_CONFIG"}
        if o.agent:
            parent = {k: v for k, v in parent.items() if k != ENV_CONFIG}
        if self.as_user is not None:
            parent = {**parent, **self.as_user.environment()}
        return dict(parent)

    # -- 4. follow rotation (off the supervising thread) -----------------------------------------------
    def prepare_rotation(self, stack: ExitStack) -> None:
        """One worker, one pass over every watched profile: what one pass finds is acted on once."""
        watched = self.o.watched
        if not watched:
            return
        from .rotation import BatchCheck, RotationChecker, RotationWorker, Watcher

        checkers: list[tuple[int, Callable[[], Any]]] = []
        for i, (p, pol) in enumerate(zip(self.profiles, self.policies)):
            if pol is None:
                continue
            self.watchers[i] = Watcher(p, self.source_env, self.rec, self.held[i].origin.version, pol.interval)
            agent_fields = tuple(self.visible[i].env.values()) if self.o.agent else None
            checkers.append((i, RotationChecker(p, pol, self.watchers[i], self.rec, current=self._running(i),
                                                agent_fields=agent_fields)))
        self.worker = RotationWorker(BatchCheck(checkers), min(p.interval for p in watched), threading.get_ident())
        stack.callback(self._close_rotation)

    def _running(self, i: int) -> Callable[[], Credentials]:
        return lambda: self.held[i]  # what the bot of profile i runs on now (read while the supervisor waits)

    # -- 5. start ----------------------------------------------------------------------------------------
    def start_services(self, stack: ExitStack) -> None:
        """With the signals blocked (every thread started now inherits the mask): relay, masking, proxy,
        the watchdog and cgroup, the agents."""
        from .relay import AuditRelay

        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED_SIGNALS)
        stack.callback(signal.pthread_sigmask, signal.SIG_SETMASK, old_mask)
        if self.o.mask:
            from .masking import MaskedOutput

            self.output = stack.enter_context(closing(MaskedOutput()))  # drain the output, restore the tty
        # The child's signature failures reach our (possibly keyed) log through the relay.
        self.relay = AuditRelay(self.rec, profile=self.profile.name, host=_host(), user=_user(),
                                profiles=tuple(p.name for p in self.profiles) if self.many else ())
        stack.callback(self.relay.close)  # the child's last reports are recorded before we return
        self.extra.update(self.relay.child_env())
        if self.o.proxy:
            self._start_proxy(stack)
        self._start_watchdog(stack)
        if self.o.agent:
            self._start_agents()
        if self.many:
            self.extra.update(_profiles_env(self.visible, self.per_profile))

    def _start_proxy(self, stack: ExitStack) -> None:
        """--proxy: the real key goes to the proxy; the child gets the proxy's URL and secret instead."""
        from .proxy import start_for_run

        assert self.creds is not None
        try:
            self.proxy_run = start_for_run(self.profile, self.creds, record=self.rec, audit_log=self.audit_log,
                                           env=self.source_env)
        except BrokerError as exc:
            self.refused(exc)
            raise
        stack.callback(self.proxy_run.stop)
        self.extra.update(self.proxy_run.child_env)
        self.child_profile = self.proxy_run.child_profile

    def _start_watchdog(self, stack: ExitStack) -> None:
        """Before the first bot: from here on the broker's death stops the bot's whole group."""
        from .watchdog import Watchdog, make_cgroup, remove_cgroup

        self.watchdog = stack.enter_context(closing(Watchdog(self.o.grace)))
        self.cgroup = make_cgroup()  # where one can be made: also catches processes that leave the group
        if self.cgroup is not None:
            stack.callback(remove_cgroup, self.cgroup)
            self.watchdog.guard_cgroup(self.cgroup)
        stack.callback(self._stop_child)  # any exit path: nothing of the bot's tree outlives the run

    def _start_agents(self) -> None:
        """One agent (one socket) per profile: get_signer("spot") in the bot picks spot's."""
        peer_uid = self.as_user.uid if self.as_user else None
        for signing, own in zip(self.signings, self.per_profile):
            own.update(signing.start_agent(self.audit_log, self.rec, peer_uid=peer_uid))
        if not self.many:
            self.extra.update(self.per_profile[0])

    def start_first_child(self, stack: ExitStack) -> None:
        """The bot, with its secrets; systemd told it is ready; the rotation worker started."""
        assert self.creds is not None
        if self.notifier is not None:
            stack.callback(self.notifier.stopping, "the run ends")
        self.child = self.start(self.creds)
        if self.notifier is not None:
            self.notifier.ready(self.child.pid)  # systemd: started, with its secret (never before the fetch)
        if self.worker is not None:
            self.worker.start()  # inherits the blocked signals: every signal stays with this thread

    def start(self, creds: Credentials) -> Child:
        """Start the bot on ``creds`` (wiped after, unless the broker may need them again) and record it."""
        child_env: dict[bytes, bytes] = {}
        try:
            for signing, c in zip(self.signings, self.held):
                signing.use(c)  # with --agent: sign with these (a rotation brings new ones); else a no-op
            child_env = child_environment(self.child_parent, self.child_profile, creds, self.extra)
            stdio = (self.output.child_stdio(creds[f] for f in self.profile.env.values())
                     if self.output is not None else None)
            child = launch(self.command, self.executable, child_env, stdio, self.relay.child_fds, self.as_user,
                           self.box, self.cgroup)
        finally:
            child_env = {}  # drop our bytes copies of the secrets
            if not self.keep:
                creds.wipe()
        del child_env
        self.watchdog.guard(child.pgid)
        self.relay.child_pid = child.pid
        for signing in self.signings:
            signing.started(child.pid)
        self._record_started(child)
        return child

    def _record_started(self, child: Child) -> None:
        """``secret_injected`` per profile (and the long command line in parts); with --verbose, one line."""
        from .cmdline import COMMAND_ARGS, audit_fields

        shown, more = audit_fields(self.command)
        for p, c, v in zip(self.profiles, self.held, self.visible):
            origin = c.origin
            variables = list(v.env) if self.many else list(self.child_profile.env)
            if self.o.verbose:
                _say_started(child.pid, variables, origin)
            self.rec("secret_injected", {
                "profile": p.name, "version": origin.version, **_secret_identity(origin),
                "variables": variables,
                "command": shown, "pid": child.pid, "user": _user(), "host": _host(), "cwd": os.getcwd(),
                **({"as_user": self.as_user.name} if self.as_user is not None else {}),
                **({"sandbox": "bwrap"} if self.box else {}),
            })
        for part, chunk in enumerate(more, 1):  # a long command line, in full, over several records
            self.rec(COMMAND_ARGS, {"profile": self.profiles[0].name, "pid": child.pid, "part": part,
                                    "parts": len(more), "json": chunk})

    def exited(self, child: Child, status: int, reason: str) -> None:
        for p in self.profiles:
            self.rec("child_exited", {"profile": p.name, "pid": child.pid, "status": status, "reason": reason,
                                      "duration_s": round(time.monotonic() - child.started, 3)})

    # -- 6. supervise, follow rotation, restart --------------------------------------------------------
    def supervise(self) -> int:
        """Until the bot is done: a rotation restarts it on the new secrets, ``on-failure`` after a failure."""
        delay = 1.0
        on_wake = self.on_wake if self.worker is not None else None
        while True:
            assert self.child is not None
            status = supervise(self.child, on_wake=on_wake, notifier=self.notifier)
            if status is None:  # a rotation asked for a restart, with the new secrets in hand
                self.restart_on_new_key()
                continue
            child = self.child
            _stop(child, self.o.grace, self.watchdog, self.cgroup)  # what the bot left behind in its group
            if self.o.restart == RestartPolicy.ON_FAILURE and status != 0 and not child.stopping:
                if time.monotonic() - child.started >= _HEALTHY_AFTER:
                    delay = 1.0
                stop = self.restart_after_failure(child, status, delay)
                if stop is not None:
                    return 128 + stop
                delay = min(delay * 2, _MAX_RESTART_DELAY)
                continue
            self.exited(child, status, "stopped" if child.stopping else "exited")
            return status

    def restart_on_new_key(self) -> None:
        """Stop the bot (grace, then SIGKILL), swap in the rotated profiles' secrets, start it again."""
        assert self.child is not None and self.worker is not None
        restart_grace = max(self.policies[i].grace for i in self.pending)
        stopped = _stop(self.child, restart_grace, self.watchdog, self.cgroup)
        if stopped == 128 + signal.SIGKILL:
            say(f"the bot did not exit within the {restart_grace:g} s grace after SIGTERM: "
                "killed it (SIGKILL) before restarting it on the new key")
        self.exited(self.child, stopped, "rotation")
        for i, new_creds in self.pending.items():
            self.held[i].wipe()  # only the rotated profiles' old secrets: the others' serve the new bot
            self.held[i] = new_creds
            self.watchers[i].version = new_creds.origin.version
        self.pending.clear()
        self.creds = combine(self.profiles, self.held)[1]
        self.child = self.start(self.creds)
        self.worker.done()
        if self.notifier is not None:
            versions = ", ".join(f"{c.origin.version}" for c in self.held)
            self.notifier.status(f"bot restarted on key version {versions} (pid {self.child.pid})")

    def restart_after_failure(self, child: Child, status: int, delay: float) -> int | None:
        """``--restart on-failure``: wait ``delay`` then start again from the secret in memory; a stop
        signal during the wait ends the run (its number is returned)."""
        self.exited(child, status, "failed")
        for p, c in zip(self.profiles, self.held):
            self.rec("child_restarting", {"profile": p.name, "status": status, "delay_s": delay,
                                          "version": c.origin.version})
        say(f"the bot exited with status {status}; restarting in {delay:g} s from the secret in memory")
        stop = _pause(delay)
        if stop is not None:
            return stop
        assert self.creds is not None
        self.child = self.start(self.creds)
        return None

    def on_wake(self) -> bool:
        """On the supervising thread: act on what the rotation worker handed over; True = restart."""
        assert self.worker is not None
        batch = self.worker.take()
        if batch is None:
            return False
        signals: list[int] = []
        for i, found in batch:
            signum = self._handle(i, found, Handling(found.kind))
            if signum and signum not in signals:
                signals.append(signum)  # one signal of a kind per batch
        if self.pending:
            return True  # one restart for the whole batch: the new bot gets every new key (no signal needed)
        for signum in signals:
            if self.child is not None:
                try:
                    os.kill(self.child.pid, signum)
                except ProcessLookupError:
                    pass
        self.worker.done()
        return False

    def _handle(self, i: int, found: Any, how: Handling) -> int | None:
        """Act on one profile's rotation; the signal to send the bot, if any."""
        p, watcher, policy = self.profiles[i], self.watchers[i], self.policies[i]
        whose = f"profile {p.name}: " if self.many else ""
        old, new = found.old_version, found.new_version
        event = {"profile": p.name, "old_version": old, "new_version": new,
                 **_secret_identity(self.held[i].origin), "action": policy.action}
        watcher.acted(new)
        rotated = f"{whose}key rotated (v{old} -> v{new})"
        if how is Handling.RESTART:
            assert found.creds is not None
            self.pending[i] = found.creds  # worker.done() once the new bot runs
            self.rec("rotation_detected", {**event, "action": "restart"} if found.new_api_key else event)
            say(rotated + (" with a new API key" if found.new_api_key else "") + ": restarting the bot")
            return None
        if how is Handling.SWAP:
            self._swap_key(i, found.creds)
            self.rec("rotation_detected", {**event, "action": "agent_key_swapped"})
            say(f"{rotated}: the agent signs with the new key; the bot keeps running")
        elif how is Handling.SIGNAL:
            self.rec("rotation_detected", event)
            say(f"{rotated}: sent {signal.Signals(policy.signum).name if policy.signum else ''} to the bot")
        else:
            self.rec("rotation_detected", event)
            say(f"{rotated}: ignored by policy")
            return None
        watcher.version = new
        return int(policy.signum) if policy.signum else None

    def _swap_key(self, i: int, new_creds: Credentials | None) -> None:
        """The bot keeps running and never held the secret: only the secret changed (the API key in its
        environment is the same), so the agent swaps keys in place."""
        assert new_creds is not None
        self.signings[i].use(new_creds)
        self.held[i].wipe()
        self.held[i] = new_creds
        self.creds = combine(self.profiles, self.held)[1]

    # -- 7. tear down (each registered on the ExitStack when its resource was taken) -------------------
    def _stop_child(self) -> None:
        if self.child is not None:
            _stop(self.child, self.o.grace, self.watchdog, self.cgroup)

    def _close_rotation(self) -> None:
        """Stop the worker, then the watchers' Vault clients (unless a check stuck on Vault still holds
        one: the process exit ends it)."""
        assert self.worker is not None
        if not self.worker.close():
            return
        for w in self.watchers:
            if w is not None:
                w.close()

    def _release_signer_tokens(self) -> None:
        for issued in self.signer_extras:  # a transit profile's scoped token: revoke it now
            _release(issued, self.source_env)

    def _wipe(self) -> None:
        if self.creds is not None:
            self.creds.wipe()
        for c in self.held:
            c.wipe()
        for c in self.pending.values():
            c.wipe()

    def _stop_signings(self) -> None:
        for signing in self.signings:
            signing.stop()


def _no_record(event: str, fields: dict[str, Any]) -> None:
    raise AssertionError("the audit log is opened before any record")  # pragma: no cover


def _say_started(pid: int, variables: Sequence[str], origin: Any) -> None:
    """--verbose: which variables the bot got, from which secret and version, fetched how."""
    version = f" v{origin.version}" if origin.version is not None else ""
    via = {"daemon": " (fetched by credbroker daemon)", "child": " (fetched in a throwaway child)"}.get(
        origin.via or "", " (fetched in-process)")
    print(f"credbroker: started pid {pid} with {', '.join(variables)} "
          f"from {origin.source} {origin.path}{version}{via}", file=sys.stderr, flush=True)


def _fetch_all(profiles: Sequence[Profile], env: Mapping[str, str], rec: Recorder,
               refused: Callable[[BrokerError, Profile | None], None],
               fetch: Callable[..., Credentials]) -> list[Credentials]:
    """Every profile's secrets, or none: on the first failure what was fetched is wiped (each read that
    happened is still recorded, so the review never lists it as a read from outside) and the error raised."""
    try:
        return _fetch_each(profiles, env, rec, refused, fetch)
    finally:
        daemon = sys.modules.get(f"{__package__}.daemon")
        if daemon is not None:
            daemon.discard_prefork()  # an early fetch child no profile used (a keyring profile, a failure)


def _fetch_each(profiles: Sequence[Profile], env: Mapping[str, str], rec: Recorder,
                refused: Callable[[BrokerError, Profile | None], None],
                fetch: Callable[..., Credentials]) -> list[Credentials]:
    held: list[Credentials] = []
    for p in profiles:
        try:
            c = fetch(p, env=env, isolate=True)
        except BrokerError as exc:
            for done in held:
                done.wipe()
            refused(exc, p)
            if len(profiles) > 1 and f"{p.name!r}" not in exc.message:
                exc.message = f"profile {p.name!r}: {exc.message}"  # which of the run's profiles failed
                exc.args = (exc.message,)
            raise
        held.append(c)
        try:
            rec("secret_fetched", {"profile": p.name, **c.origin.to_dict(), "fields": list(p.fields)})
        except BaseException:
            for done in held:
                done.wipe()
            raise
    return held


def _profiles_env(profiles: Sequence[Profile], per_profile: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """The child's map of a several-profile run: ``CREDBROKER_PROFILES`` (JSON, no secret) tells
    ``get_signer("spot")`` which variables are whose; a secret one (a transit profile's scoped token, a
    passphrase) moves to a numbered variable the map names."""
    from .signing import PROFILES_VAR, SECRET_CHILD_VARS

    out: dict[str, str] = {}
    table: dict[str, dict[str, Any]] = {}
    for n, (p, own) in enumerate(zip(profiles, per_profile), 1):
        values = {"CREDBROKER_ENV_MAP": json.dumps(dict(p.env), separators=(",", ":")), **own}
        values.pop("CREDBROKER_CONFIG", None)  # one config for the run: the shared variable
        moved: dict[str, str] = {}
        for var in SECRET_CHILD_VARS:
            if var in values:
                moved[var] = f"{var}_{n}"
                out[moved[var]] = values.pop(var)
        table[p.name] = {"vars": values, "moved": moved}
    out[PROFILES_VAR] = json.dumps(table, separators=(",", ":"))
    env_map: dict[str, str] = {}
    for p in profiles:
        env_map.update(p.env)
    out["CREDBROKER_ENV_MAP"] = json.dumps(env_map, separators=(",", ":"))
    out["CREDBROKER_PROFILE"] = ",".join(p.name for p in profiles)
    return out


def _release(issued: Mapping[str, str], env: Mapping[str, str]) -> None:
    if "CREDBROKER_SIGNER_TOKEN" in issued:
        from .signing import release_child_env

        release_child_env(issued, env=env)


def _refused_secret(profile: Profile, env: Mapping[str, str]) -> dict[str, Any]:
    """Which Vault and path a refused run was for (as far as the settings say): the review files the
    refusal under that secret, not under whichever Vault the profile used last."""
    if profile.source != "vault" or not profile.options.get("path"):
        return {}
    from .sources.settings import VaultSettings
    from .sources.vault import split_path

    try:
        settings = VaultSettings.from_env(env)
        mount, path = split_path(profile)
    except BrokerError:
        return {}  # the settings are what was wrong: the reason says so
    out: dict[str, Any] = {"address": settings.addr, "path": f"{mount}/{path}"}
    if settings.namespace:
        out["namespace"] = settings.namespace
    return out


def _secret_identity(origin: Any) -> dict[str, Any]:
    """Which secret (source, Vault address, namespace, path): the review keys versions by it, not by profile."""
    out = {"source": origin.source, "path": origin.path, "address": origin.address}
    if origin.namespace:
        out["namespace"] = origin.namespace
    return out


def _separate(profile: Profile, config: Any, env: Mapping[str, str], *, agent: bool, user: str | None,
              group: str | None, sandbox: bool, unsafe: bool) -> tuple[Any, Any]:
    """(the bot's UserSwitch, its Sandbox): what keeps the broker's credentials from it; refuses when nothing does."""
    if not (agent or user or group or sandbox):
        return None, None
    from .separation import Sandbox, broker_credentials, bwrap_binary, check_separation, resolve_user

    as_user = resolve_user(user, group)
    audit = getattr(config, "audit", None)
    key_spec = audit.get("key") if isinstance(audit, Mapping) else None
    at_rest = broker_credentials(env, profile.source, key_spec if isinstance(key_spec, str) else None)
    box = Sandbox(bwrap_binary(), tuple(c.path for c in at_rest if c.path is not None)) if sandbox else None
    warning = check_separation(at_rest, user=as_user, sandbox=sandbox, agent=agent, unsafe=unsafe)
    if warning:
        say(warning)
    return as_user, box


def say(message: str) -> None:
    """One line for the operator on stderr, as credbroker (never a secret value)."""
    print(f"credbroker: {message}", file=sys.stderr, flush=True)


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


def _host() -> str:
    return os.uname().nodename
