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
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .config import BROKER_CREDENTIAL_VARS, Profile
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


def exit_status(returncode: int) -> int:
    """Popen's returncode as a shell reports it: 128+N when signal N ended the child."""
    return 128 - returncode if returncode < 0 else returncode


class Child:
    """A started child process and what the audit log wants to know about it."""

    __slots__ = ("proc", "argv", "started", "stopping")

    def __init__(self, proc: subprocess.Popen[bytes], argv: list[str]) -> None:
        self.proc = proc
        self.argv = argv
        self.started = time.monotonic()
        self.stopping = False  # a stop signal (INT/TERM/HUP/QUIT) was passed on

    @property
    def pid(self) -> int:
        return self.proc.pid


def spawn(argv: Sequence[str], executable: str, env: Mapping[bytes, bytes], stdio: Any = None,
          pass_fds: Sequence[int] = ()) -> Child:
    """Start the child with the forwarded signals unblocked and a parent-death signal.

    ``stdio`` (a ``broker.masking.ChildStdio``, for ``--mask``) gives the
    child a pty or pipes whose output the broker masks. ``pass_fds`` are
    inherited (the audit relay); every other descriptor is closed.
    """
    parent = os.getpid()
    from .hardening import die_with_parent

    def setup() -> None:  # runs in the child between fork and exec
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (*FORWARDED_SIGNALS, signal.SIGCHLD))
        die_with_parent(parent, signal.SIGTERM)
        if stdio is not None:
            stdio.in_child()

    try:
        proc = subprocess.Popen(  # noqa: S603 - the user's own command, no shell
            list(argv),
            executable=executable,
            env=env,
            close_fds=True,
            pass_fds=tuple(pass_fds),
            # PDEATHSIG and the signal mask can only be set in the child. The broker
            # may have threads by now (audit relay, agent, masking), so `setup` is
            # kept to C-level calls (pthread_sigmask, prctl through an already
            # loaded libc, getppid, ioctl): no import, no Python lock that another
            # thread could hold across the fork.
            preexec_fn=setup,  # noqa: PLW1509
            **(stdio.popen_args() if stdio is not None else {}),
        )
    except PermissionError as exc:
        raise CommandNotExecutable(f"permission denied executing {argv[0]}", "check its permissions") from exc
    except FileNotFoundError as exc:
        raise CommandNotFound(
            f"cannot execute {argv[0]}: it or its interpreter (#! line) was not found", "check the command"
        ) from exc
    except OSError as exc:
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


def supervise(child: Child, *, tick: Callable[[], bool] | None = None, interval: float | None = None
              ) -> int | None:
    """Forward signals to the child until it exits; return its exit status.

    The forwarded signals and SIGCHLD must already be blocked (``run`` does
    that before spawning, so that no signal is lost in between). ``tick`` is
    called every ``interval`` seconds while the child runs (rotation checks);
    when it returns True supervision stops and None is returned (the caller
    restarts the child). ``child.stopping`` is set once a stop signal
    (INT, TERM, HUP, QUIT) reached the child.
    """
    waitset = {*FORWARDED_SIGNALS, signal.SIGCHLD}
    while True:
        rc = child.proc.poll()
        if rc is not None:
            return exit_status(rc)
        info = signal.sigtimedwait(waitset, interval if tick is not None and interval else 3600.0)
        if info is None:
            if tick is not None and tick():
                return None
            continue
        if info.si_signo == signal.SIGCHLD:
            continue  # poll() at the top of the loop reaps it
        if info.si_signo in _STOP_SIGNALS:
            child.stopping = True
        if info.si_code == SI_KERNEL and os.getpgrp() == os.getpgid(child.pid):
            continue  # from the terminal: the child, in our process group, got it too
        try:
            os.kill(child.pid, info.si_signo)
        except ProcessLookupError:
            pass


def stop_gracefully(child: Child, grace: float) -> int:
    """SIGTERM, up to ``grace`` seconds to exit, then SIGKILL; returns the exit status."""
    deadline = time.monotonic() + grace
    try:
        os.kill(child.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    while child.proc.poll() is None:
        left = deadline - time.monotonic()
        if left <= 0:
            child.proc.kill()
            child.proc.wait()
            break
        signal.sigtimedwait({signal.SIGCHLD}, left)
    return exit_status(child.proc.returncode)


def _pause(seconds: float) -> int | None:
    """Sleep while no child runs; a forwarded signal ends the pause and is returned."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        info = signal.sigtimedwait(set(FORWARDED_SIGNALS), left)
        if info is not None and info.si_signo in _STOP_SIGNALS:
            return int(info.si_signo)
    return None


#: Called as record(event, fields); broker.audit.AuditLog.record fits.
Recorder = Callable[[str, dict[str, Any]], Any]

#: Restart policies for a child that exits by itself (like Docker's).
RESTART_POLICIES = ("no", "on-failure")
_MAX_RESTART_DELAY = 60.0
_HEALTHY_AFTER = 60.0  # a child that ran this long resets the restart backoff


def run(
    profile: Profile,
    command: Sequence[str],
    *,
    config: Any = None,
    environ: Mapping[str, str] | None = None,
    record: Recorder | None = None,
    verbose: bool = False,
    rotation: Any = None,
    restart: str = "no",
    agent: bool = False,
    preflight: Any = None,
    mask: bool = False,
    proxy: bool = False,
) -> int:
    """Fetch the profile's secrets, run ``command`` with them, return its exit status.

    ``rotation`` (a ``broker.rotation.RotationPolicy``) follows new versions of
    a vault secret; ``restart="on-failure"`` restarts a child that fails by
    itself, with backoff, from the secret already held (no new Vault read).
    ``agent=True`` (``--agent``, issue 6): the signing key stays in the broker;
    the child gets the public API key and ``CREDBROKER_AGENT_SOCKET`` only, and
    ``get_signer()`` there signs through ``broker.agent``. ``preflight`` (a
    ``broker.preflight.PreflightOptions``; ``auto`` by default in agent mode,
    off otherwise) checks the key's restrictions on the exchange first.
    ``mask=True`` replaces every injected value in the child's stdout and
    stderr with a marker (``broker.masking``; a pty when stdout is a terminal).
    ``proxy=True`` (``--proxy``): the key stays in the broker's signing proxy
    (``broker.proxy``); the child gets its URL and a per-run proxy secret.
    """
    from . import sources
    from .config import with_config_defaults
    from .hardening import harden_process

    if restart not in RESTART_POLICIES:
        raise RunError(f"unknown restart policy {restart!r}", f"use one of: {', '.join(RESTART_POLICIES)}")
    if mask and agent:  # the CLI refuses it too; library callers get the same one line
        from .masking import check_not_agent

        check_not_agent(mask, agent)
    env = dict(os.environ if environ is None else environ)
    check_not_nested(env)
    if not command:
        raise CommandNotFound("no command given", "put the command after --, e.g. credbroker run -p P -- python bot.py")
    harden_process()
    source_env = with_config_defaults(env, config)
    audit_log: Any = None
    if record is None:
        # Every access is audited; a log that cannot be written stops the run
        # here, before any secret is fetched (fail closed).
        from .audit import open_log

        audit_log = open_log(getattr(config, "audit", None), env=source_env)
        audit_log.check_writable()
        record = audit_log.record
    rec: Recorder = record
    signing: Any = None
    if agent or (preflight is not None and preflight.mode != "off"):
        from .agent import RunSigning

        signing = RunSigning.prepare(profile, agent=agent, preflight=preflight, env=env)
    elif profile.sections.get("policy") and not proxy:
        from .signing_policy import SigningPolicy

        SigningPolicy.for_profile(profile)  # a typo in it is still a one-line error
        # The bot holds the secret without --agent: nothing can enforce the policy. Say so every time.
        say(f"WARNING: {profile.where('policy')} is enforced only with --agent; this bot holds the secret")

    def refused(exc: BrokerError) -> None:
        try:
            rec("refused", {"profile": profile.name, "source": profile.source, "error": type(exc).__name__,
                            "reason": exc.message, "command": list(command)})
        except BrokerError:
            pass  # the original failure is what the operator must see

    try:
        executable = resolve_command(command[0], env.get("PATH"))
    except BrokerError as exc:
        refused(exc)
        raise
    try:
        creds = sources.fetch(profile, env=source_env)
    except BrokerError as exc:
        refused(exc)
        raise
    rec("secret_fetched", {"profile": profile.name, **creds.origin.to_dict(), "fields": list(profile.fields)})
    if signing is not None:
        try:
            signing.check_key(creds, record=rec, audit_config=getattr(config, "audit", None))
        except BrokerError as exc:
            creds.wipe()
            refused(exc)
            raise

    # What get_signer() needs in the child: the config (so its audit records go
    # to the same log) and, for a profile with a [signer] table, the signer
    # settings (and for transit a narrowly scoped token; never ours).
    extra: dict[str, str] = {}
    if getattr(config, "path", None):
        extra["CREDBROKER_CONFIG"] = str(os.path.abspath(config.path))
    if "signer" in profile.sections and not agent and not proxy:  # --proxy: the proxy signs, not the bot
        from .signing import child_env as signer_env

        try:
            extra.update(signer_env(profile, env=source_env))
        except BrokerError as exc:
            creds.wipe()
            refused(exc)
            raise

    if not agent and not proxy:  # the bot holds the key: tell it the kind (and an unmapped passphrase)
        from .signing import key_env

        extra.update(key_env(profile, creds))

    # Keep the secret (mlocked) only when the broker may need it again.
    keep = agent or restart != "no" or (rotation is not None and rotation.action == "restart")
    # In agent mode the child sees the API key variable only; the secret stays here.
    child_parent, child_profile = signing.child_view(env, profile) if agent else (env, profile)

    output = None
    if mask:
        from .masking import MaskedOutput

        output = MaskedOutput()

    def start(creds: Credentials) -> Child:
        try:
            if agent:
                signing.use(creds)
            child_env = child_environment(child_parent, child_profile, creds, extra)
            stdio = output.child_stdio(creds[f] for f in profile.env.values()) if output is not None else None
            child = spawn(command, executable, child_env, stdio, pass_fds=relay.child_fds)
        finally:
            child_env = {}  # drop our bytes copies of the secrets
            if not keep:
                creds.wipe()
        del child_env
        relay.child_pid = child.pid
        if agent:
            signing.started(child.pid)
        origin = creds.origin
        if verbose:
            version = f" v{origin.version}" if origin.version is not None else ""
            print(f"credbroker: started pid {child.pid} with {', '.join(child_profile.env)} "
                  f"from {origin.source} {origin.path}{version}", file=sys.stderr, flush=True)
        rec("secret_injected", {
            "profile": profile.name, "version": origin.version, "variables": list(child_profile.env),
            "command": list(command), "pid": child.pid, "user": _user(), "host": _host(), "cwd": os.getcwd(),
        })
        return child

    def exited(child: Child, status: int, reason: str) -> None:
        rec("child_exited", {"profile": profile.name, "pid": child.pid, "status": status, "reason": reason,
                             "duration_s": round(time.monotonic() - child.started, 3)})

    watcher = None
    if rotation is not None:
        from .rotation import Watcher

        watcher = Watcher(profile, source_env, rec, creds.origin.version, rotation.interval)
    pending: list[Credentials] = []  # the rotated credentials a restart will use

    def tick() -> bool:
        nonlocal creds
        assert watcher is not None and rotation is not None
        new_version = watcher.poll()
        if new_version is None:
            return False
        old_version = watcher.version
        event = {"profile": profile.name, "old_version": old_version, "new_version": new_version,
                 "action": rotation.action}
        if agent and rotation.action == "signal":
            # The bot keeps running and never held the secret: when only the secret
            # changed (the API key in its environment is the same), swap the
            # agent's key in place, then signal the bot as asked.
            try:
                new_creds = sources.fetch(profile, env=watcher.env)
            except BrokerError as exc:
                watcher.fetch_failed(exc)
                return False
            rec("secret_fetched", {"profile": profile.name, **new_creds.origin.to_dict(),
                                   "fields": list(profile.fields), "reason": "rotation"})
            if all(f in new_creds and new_creds[f] == creds[f] for f in child_profile.env.values()):
                signing.use(new_creds)
                creds.wipe()
                creds = new_creds
                watcher.version = new_version
                watcher.acted(new_version)
                rec("rotation_detected", {**event, "action": "agent_key_swapped"})
                say(f"key rotated (v{old_version} -> v{new_version}): the agent signs with the new key; "
                     "the bot keeps running")
                if rotation.signum:
                    try:
                        os.kill(child.pid, rotation.signum)
                    except ProcessLookupError:
                        pass
                return False
            # The API key changed too: the bot must restart to see the new one.
            pending.append(new_creds)
            rec("rotation_detected", {**event, "action": "restart"})
            watcher.acted(new_version)
            say(f"key rotated (v{old_version} -> v{new_version}) with a new API key: restarting the bot")
            return True
        if rotation.action == "restart":
            try:
                new_creds = sources.fetch(profile, env=watcher.env)
            except BrokerError as exc:
                watcher.fetch_failed(exc)
                return False
            rec("secret_fetched", {"profile": profile.name, **new_creds.origin.to_dict(),
                                   "fields": list(profile.fields), "reason": "rotation"})
            pending.append(new_creds)
        rec("rotation_detected", event)
        watcher.acted(new_version)
        say(f"key rotated (v{old_version} -> v{new_version}): "
             + {"restart": "restarting the bot", "ignore": "ignored by policy",
                "signal": f"sent {signal.Signals(rotation.signum or 0).name if rotation.signum else ''} to the bot"}
             [rotation.action])
        if rotation.action == "signal" and rotation.signum:
            watcher.version = new_version
            try:
                os.kill(child.pid, rotation.signum)
            except ProcessLookupError:
                pass
        return bool(rotation.action == "restart")

    blocked = (*FORWARDED_SIGNALS, signal.SIGCHLD)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    # Started with the signals blocked, so its thread never receives them: the
    # child's signature failures reach our (possibly keyed) log through it.
    from .relay import AuditRelay

    relay = AuditRelay(rec)
    extra.update(relay.child_env())
    proxy_run: Any = None
    try:
        if proxy:
            # --proxy, with the signals blocked (its threads inherit the mask): the real key goes to the
            # proxy; the child gets the proxy's URL and secret instead (broker.proxy).
            from .proxy import start_for_run

            try:
                proxy_run = start_for_run(profile, creds, record=rec, audit_log=audit_log, env=source_env)
            except BrokerError as exc:
                refused(exc)
                raise
            extra.update(proxy_run.child_env)
            child_profile = proxy_run.child_profile
        if agent:
            # With the signals blocked: the agent's thread inherits the mask and never receives them.
            extra.update(signing.start_agent(audit_log, rec))
        child = start(creds)
        delay = 1.0
        while True:
            status = supervise(child, tick=tick if watcher else None,
                               interval=rotation.interval if rotation is not None else None)
            if status is None:  # a rotation asked for a restart, with the new secret in hand
                exited(child, stop_gracefully(child, rotation.grace), "rotation")
                creds.wipe()
                creds = pending.pop()
                assert watcher is not None
                watcher.version = creds.origin.version
                child = start(creds)
                continue
            if restart == "on-failure" and status != 0 and not child.stopping:
                exited(child, status, "failed")
                if time.monotonic() - child.started >= _HEALTHY_AFTER:
                    delay = 1.0
                rec("child_restarting", {"profile": profile.name, "status": status, "delay_s": delay,
                                         "version": creds.origin.version})
                say(f"the bot exited with status {status}; restarting in {delay:g} s from the secret in memory")
                stop = _pause(delay)
                if stop is not None:
                    return 128 + stop
                delay = min(delay * 2, _MAX_RESTART_DELAY)
                child = start(creds)
                continue
            exited(child, status, "stopped" if child.stopping else "exited")
            return status
    finally:
        if proxy_run is not None:
            proxy_run.stop()
        relay.close()  # the child's last reports are recorded before we return
        if output is not None:
            output.close()  # drain the child's output, restore the terminal
        if signing is not None:
            signing.stop()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        creds.wipe()
        for c in pending:
            c.wipe()
        if watcher is not None:
            watcher.close()
        if "CREDBROKER_SIGNER_TOKEN" in extra:  # a transit profile's scoped token: revoke it now
            from .signing import release_child_env

            release_child_env(extra, env=source_env)


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
