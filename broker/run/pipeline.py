"""`credbroker run` as a pipeline: ``Run.execute`` reads top to bottom like the README's promises.

The order is chosen so that nothing is fetched for a run that cannot start:

1. harden: refuse to nest (``CREDBROKER_RUN`` is set in a child of
   ``credbroker run``), no core dumps, not dumpable;
2. open the audit log (a log that cannot be written stops the run here);
3. prepare signing (the key checks, the agents) and resolve the command on the
   child's PATH (127 not found, 126 not executable), profiles that collide,
   the separation from the broker's own credentials;
4. fetch every field the profiles name (fail closed: exit 125 on any failure);
5. build what the child gets: the broker's environment minus its Vault
   credentials and stale copies of the injected names, plus the secrets;
6. start the relay, masking, proxy, watchdog and agents with the signals
   blocked, then the child (forwarded signals unblocked, a parent-death signal);
7. supervise it, follow rotation, restart it by policy;
8. tear down: every resource is released by the ``ExitStack`` that took it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, closing
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from ..config import ENV_CONFIG, Profile
from ..errors import BrokerError, CommandNotFound
from ..secret import Credentials
from .. import childenv
from ..events import Event
from .child import BLOCKED_SIGNALS, Child, check_not_nested, child_environment, launch, pause, resolve_command, \
    stop_tree, supervise
from .console import say
from .options import Recorder, RestartPolicy, RunOptions
from ..config import check_profiles
from .profiles import combine, combined_profile, fetch_all, profiles_env

if TYPE_CHECKING:  # pragma: no cover
    from ..vault.settings import VaultSettings

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
        self.vault: VaultSettings | None = None  # resolved once, on first need (``vault_settings``)
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
        from ..config import with_config_defaults
        from ..hardening import harden_process

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
        from ..audit import open_log

        self.audit_log = open_log(getattr(self.config, "audit", None), env=self.source_env)
        self.audit_log.check_writable()
        self.rec = self.audit_log.record

    def prepare_signing(self, stack: ExitStack) -> None:
        """Each profile's key check (and with --agent its agent), validated before any fetch."""
        o = self.o
        if o.agent or o.proxy or (o.preflight is not None and o.preflight.mode != "off"):
            from ..agent.run import RunSigning

            self.signings = [RunSigning.prepare(p, agent=o.agent, preflight=o.preflight, env=self.env, proxy=o.proxy)
                             for p in self.profiles]
            stack.callback(self._stop_signings)
            return
        for p in self.profiles:
            if p.sections.get("policy") and not o.proxy:
                from ..signing_policy import SigningPolicy

                SigningPolicy.for_profile(p)  # a typo in it is still a one-line error
                # The bot holds the secret without --agent: nothing can enforce the policy. Say so every time.
                say(f"WARNING: {p.where('policy')} is enforced only with --agent; this bot holds the secret")

    def vault_settings(self) -> VaultSettings:
        """The run's Vault settings: resolved once, on first need, from the environment and ``[vault]``;
        every step that needs them (the scoped signing token, rotation, the proxy, a refusal's context)
        uses this value. The fetch itself runs in a throwaway child that resolves its own from the same
        environment. The rotation watcher re-resolves only at its own named moments (``broker.watch``)."""
        if self.vault is None:
            from ..vault.settings import VaultSettings

            self.vault = VaultSettings.from_env(self.source_env)
        return self.vault

    def refused(self, exc: BrokerError, only: Profile | None = None) -> None:
        """Record why the run stops (for ``only``, else for every profile); the original error still wins."""
        from ..access import refusal  # the one schema of a refusal (with Vault's request id when it answered)
        from ..cmdline import audit_fields

        for p in [only] if only is not None else self.profiles:
            try:
                self.rec(Event.REFUSED, {**_refused_secret(p, self.vault_settings),
                                     **refusal(p, exc, "run", command=audit_fields(self.command)[0])})
            except BrokerError:
                pass  # the original failure is what the operator must see

    def resolve_command(self) -> None:
        """Profiles that collide, a command not found or too long, no separation: refused, nothing fetched."""
        from ..cmdline import check_exec_size

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
        from ..access import value_warnings

        # The fetch runs in a throwaway child, which resolves the settings from the environment and
        # [vault] it is given; this process resolves them only when a later step needs them.
        self.held = fetch_all(self.profiles, self.source_env, self.rec, self.refused, settings=self.vault)
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
            from ..signing import child_env as signer_env

            try:
                transit = (p.sections.get("signer") or {}).get("type") == "transit"
                issued = signer_env(p, vault_settings=self.vault_settings() if transit else None)
            except BrokerError as exc:
                self.refused(exc, p if self.many else None)
                raise
            self.signer_extras.append(issued)
            own.update(issued)
        from ..signing import key_env

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
            from ..sdnotify import SD_VARIABLES, Notifier

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
        from ..access import read
        from ..rotation import BatchCheck, RotationChecker, RotationWorker
        from ..watch import Watcher

        checkers: list[tuple[int, Callable[[], Any]]] = []
        for i, (p, pol) in enumerate(zip(self.profiles, self.policies)):
            if pol is None:
                continue
            self.watchers[i] = Watcher(p, self.vault_settings(), self.rec, self.held[i].origin.version,
                                       pol.interval)
            agent_fields = tuple(self.visible[i].env.values()) if self.o.agent else None
            checkers.append((i, RotationChecker(p, pol, self.watchers[i], self.rec, current=self._running(i),
                                                agent_fields=agent_fields, read=read)))
        self.worker = RotationWorker(BatchCheck(checkers), min(p.interval for p in watched), threading.get_ident())
        stack.callback(self._close_rotation)

    def _running(self, i: int) -> Callable[[], Credentials]:
        return lambda: self.held[i]  # what the bot of profile i runs on now (read while the supervisor waits)

    # -- 5. start ----------------------------------------------------------------------------------------
    def start_services(self, stack: ExitStack) -> None:
        """With the signals blocked (every thread started now inherits the mask): relay, masking, proxy,
        the watchdog and cgroup, the agents."""
        from ..relay import AuditRelay

        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED_SIGNALS)
        stack.callback(signal.pthread_sigmask, signal.SIG_SETMASK, old_mask)
        if self.o.mask:
            from ..masking import MaskedOutput

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
            self.extra.update(profiles_env(self.visible, self.per_profile))

    def _start_proxy(self, stack: ExitStack) -> None:
        """--proxy: the real key goes to the proxy; the child gets the proxy's URL and secret instead."""
        from ..proxy import start_for_run

        assert self.creds is not None
        try:
            uses_vault = self.profile.source == "vault" or "signer" in self.profile.sections
            self.proxy_run = start_for_run(self.profile, self.creds, record=self.rec, audit_log=self.audit_log,
                                           vault_settings=self.vault_settings() if uses_vault else None)
        except BrokerError as exc:
            self.refused(exc)
            raise
        stack.callback(self.proxy_run.stop)
        self.extra.update(self.proxy_run.child_env)
        self.child_profile = self.proxy_run.child_profile

    def _start_watchdog(self, stack: ExitStack) -> None:
        """Before the first bot: from here on the broker's death stops the bot's whole group."""
        from ..watchdog import Watchdog, make_cgroup, remove_cgroup

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
        from ..cmdline import COMMAND_ARGS, audit_fields

        shown, more = audit_fields(self.command)
        for p, c, v in zip(self.profiles, self.held, self.visible):
            origin = c.origin
            variables = list(v.env) if self.many else list(self.child_profile.env)
            if self.o.verbose:
                _say_started(child.pid, variables, origin)
            self.rec(Event.SECRET_INJECTED, {
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
            self.rec(Event.CHILD_EXITED, {"profile": p.name, "pid": child.pid, "status": status, "reason": reason,
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
            stop_tree(child, self.o.grace, self.watchdog, self.cgroup)  # what the bot left behind in its group
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
        stopped = stop_tree(self.child, restart_grace, self.watchdog, self.cgroup)
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
            self.rec(Event.CHILD_RESTARTING, {"profile": p.name, "status": status, "delay_s": delay,
                                          "version": c.origin.version})
        say(f"the bot exited with status {status}; restarting in {delay:g} s from the secret in memory")
        stop = pause(delay)
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
            self.rec(Event.ROTATION_DETECTED, {**event, "action": "restart"} if found.new_api_key else event)
            say(rotated + (" with a new API key" if found.new_api_key else "") + ": restarting the bot")
            return None
        if how is Handling.SWAP:
            self._swap_key(i, found.creds)
            self.rec(Event.ROTATION_DETECTED, {**event, "action": "agent_key_swapped"})
            say(f"{rotated}: the agent signs with the new key; the bot keeps running")
        elif how is Handling.SIGNAL:
            self.rec(Event.ROTATION_DETECTED, event)
            say(f"{rotated}: sent {signal.Signals(policy.signum).name if policy.signum else ''} to the bot")
        else:
            self.rec(Event.ROTATION_DETECTED, event)
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
            stop_tree(self.child, self.o.grace, self.watchdog, self.cgroup)

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

def _release(issued: Mapping[str, str], env: Mapping[str, str]) -> None:
    if childenv.SIGNER_TOKEN in issued:
        from ..signing import release_child_env

        release_child_env(issued, env=env)

def _refused_secret(profile: Profile, resolve: Callable[[], VaultSettings]) -> dict[str, Any]:
    """Which Vault and path a refused run was for (as far as the settings say): the review files the
    refusal under that secret, not under whichever Vault the profile used last."""
    if profile.source != "vault" or not profile.options.get("path"):
        return {}
    from ..sources.vault import split_path

    try:
        settings = resolve()
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
    from ..separation import Sandbox, broker_credentials, bwrap_binary, check_separation, resolve_user

    as_user = resolve_user(user, group)
    audit = getattr(config, "audit", None)
    key_spec = audit.get("key") if isinstance(audit, Mapping) else None
    at_rest = broker_credentials(env, profile.source, key_spec if isinstance(key_spec, str) else None)
    box = Sandbox(bwrap_binary(), tuple(c.path for c in at_rest if c.path is not None)) if sandbox else None
    warning = check_separation(at_rest, user=as_user, sandbox=sandbox, agent=agent, unsafe=unsafe)
    if warning:
        say(warning)
    return as_user, box

def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())

def _host() -> str:
    return os.uname().nodename
