"""Following key rotation while a bot runs, and keeping the broker's Vault token alive.

An admin rotates with the Vault CLI (`vault kv put`, or `scripts/rotate-key`);
the running broker notices a new ``current_version`` in the secret's KV v2
metadata and acts by policy:

* ``restart``: fetch the new version first (the old bot keeps running if that
  fails), then stop the bot gracefully (SIGTERM, a grace period, SIGKILL) and
  start it again with the new environment;
* ``signal:NAME``: send the bot that signal (for bots that re-read their key
  themselves, e.g. through ``get_signer()``);
* ``ignore``: record it and carry on.

Each new version is acted on once (no restart storms), and a failure to read
it is retried with backoff. Vault being unreachable never touches a healthy
bot: it is recorded and retried.

For runs of days the watcher renews its token before it expires; when the
token can no longer be renewed (not renewable, at its max TTL, revoked) it
logs in again with AppRole if AppRole credentials are configured. Every such
step is an audit event (``token_renewed``, ``token_relogin``,
``token_failed``).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

from . import units
from .config import Profile
from .errors import BrokerError, ConfigError
from .secret import Credentials
from .events import Recorder
from .watch import Watcher




class RotationPolicy(NamedTuple):
    """What to do when the secret's version changes. ``action`` is restart|signal|ignore."""

    action: str
    signum: int | None = None
    interval: float = 60.0
    grace: float = 10.0

    @classmethod
    def parse(cls, spec: str, *, interval: float = 60.0, grace: float = 10.0,
              what: str = "--on-rotate") -> RotationPolicy:
        """``restart``, ``ignore`` or ``signal:HUP`` (any signal name, with or without SIG).

        ``what`` names where ``spec`` came from (the flag, or the config file and key) for errors."""
        text = spec.strip()
        if text in ("restart", "ignore"):
            return cls(text, None, interval, grace)
        if text.startswith("signal:"):
            name = text.split(":", 1)[1].upper()
            name = name if name.startswith("SIG") else "SIG" + name
            try:
                signum = int(signal.Signals[name])
            except KeyError:
                raise ConfigError(f"{what}: {spec!r}: unknown signal {name}", "e.g. signal:HUP") from None
            return cls("signal", signum, interval, grace)
        raise ConfigError(f"{what}: {spec!r} is not a rotation policy", "use restart, signal:HUP or ignore")


def policy_from(profile: Profile, on_rotate: str | None, interval: str | None, grace: str | None
                ) -> RotationPolicy | None:
    """The rotation policy from flags, else the profile's ``[rotation]`` table; None = do not watch."""
    table = profile.sections.get("rotation") or {}
    if not isinstance(table, dict):
        raise ConfigError(f"{profile.where('rotation')}: expected a table", "write [profiles.NAME.rotation]")
    unknown = set(table) - {"on_rotate", "interval", "grace"}
    if unknown:
        raise ConfigError(f"{profile.where('rotation')}: unknown key {sorted(unknown)[0]!r}",
                          "expected on_rotate, interval, grace")
    spec = on_rotate or table.get("on_rotate")
    if not spec:
        return None
    # Errors name what the user wrote: the flag, or the config file and key.
    spec_from = "--on-rotate" if on_rotate else profile.where("rotation.on_rotate")
    if profile.source != "vault":
        raise ConfigError(f"{spec_from}: rotation is watched in Vault; profile {profile.name!r} reads the "
                          f"{profile.source}", f"remove {spec_from}, or use a vault profile")
    if profile.options.get("version"):
        raise ConfigError(f"{spec_from}: profile {profile.name!r} pins version {profile.options['version']}: "
                          "nothing to follow", "remove the pinned version to follow rotation")
    return RotationPolicy.parse(
        str(spec),
        interval=units.seconds(interval or table.get("interval", 60),
                               "--rotate-interval" if interval else profile.where("rotation.interval")),
        grace=units.seconds(grace or table.get("grace", 10),
                            "--grace" if grace else profile.where("rotation.grace")),
        what=spec_from,
    )


class Handover(NamedTuple):
    """What a rotation check found, for the supervising thread to act on.

    ``kind``: ``swap`` (agent mode, same API key: sign with ``creds`` and
    signal the bot), ``restart`` (start the bot again with ``creds``; ``new_api_key``
    says the agent could not swap in place), ``signal`` or ``ignore``.
    """

    kind: str
    old_version: int | None
    new_version: int
    creds: Credentials | None = None
    new_api_key: bool = False


class RotationChecker:
    """The Vault side of following rotation: runs on the worker thread only.

    ``agent_fields`` (agent mode) are the fields the bot sees (its API key):
    when they are unchanged the agent can swap keys in place. ``current``
    returns the credentials the running bot was started with; it is read only
    while the supervising thread waits for this check (see ``RotationWorker``).
    """

    def __init__(self, profile: Profile, policy: RotationPolicy, watcher: Watcher, record: Recorder, *,
                 agent_fields: tuple[str, ...] | None, current: Callable[[], Credentials],
                 read: Callable[..., Credentials]) -> None:
        self.profile = profile
        self.read = read  # broker.access.read, the one audited read (handed in: access sits below rotation)
        self.policy = policy
        self.watcher = watcher
        self.record = record
        self.agent_fields = agent_fields
        self.current = current

    def __call__(self) -> Handover | None:
        new_version = self.watcher.poll()
        if new_version is None:
            return None
        old_version = self.watcher.version
        swap_possible = self.agent_fields is not None and self.policy.action == "signal"
        if self.policy.action != "restart" and not swap_possible:
            return Handover(self.policy.action, old_version, new_version)
        try:
            # The one audited read; a failure is the watcher's to say and retry (rotation_check_failed).
            new_creds = self.read(self.profile, env=self.watcher.env, settings=self.watcher.settings,
                                  record=self.record, by="rotation",
                                  context={"reason": "rotation"}, isolate=True, on_refused=lambda exc: None)
        except BrokerError as exc:
            self.watcher.fetch_failed(exc)
            return None
        if swap_possible:
            assert self.agent_fields is not None
            current = self.current()
            if all(f in new_creds and new_creds[f] == current[f] for f in self.agent_fields):
                return Handover("swap", old_version, new_version, new_creds)
            return Handover("restart", old_version, new_version, new_creds, new_api_key=True)
        return Handover("restart", old_version, new_version, new_creds)


#: What one pass over a run's watched profiles found: (the profile's index in the run, its handover).
Batch = list[tuple[int, Handover]]


class BatchCheck:
    """One pass over every watched profile of a run (``-p spot -p um-futures``).

    Whatever the pass finds is handed over together, so the supervisor acts
    once on a batch: one restart for two keys rotated at the same time, never
    one per profile. A profile whose interval has not come yet is skipped by
    its watcher (``Watcher.due``)."""

    def __init__(self, checks: Sequence[tuple[int, Callable[[], Handover | None]]]) -> None:
        self._checks = list(checks)

    def __call__(self) -> Batch | None:
        found: Batch = []
        for index, check in self._checks:
            handover = check()
            if handover is not None:
                found.append((index, handover))
        return found or None


class RotationWorker:
    """A thread that runs rotation checks and token renewal, so Vault never delays the supervisor.

    Every ``interval`` it calls ``check``; a result is handed over in a
    one-slot box and the supervising thread is woken with SIGCHLD (which it
    blocks and reads with ``sigtimedwait``; ``pthread_kill`` aims it at that
    thread). The worker then waits until the supervisor calls ``done()``, so
    one rotation is acted on at a time and the running bot's credentials are
    never read while they are being replaced. A check stuck on a silent Vault
    stalls only this thread. Start it with the broker's signals blocked.
    """

    def __init__(self, check: Callable[[], Batch | None], interval: float, wake_thread: int) -> None:
        self._check = check
        self._interval = interval
        self._wake_thread = wake_thread
        self._stop = threading.Event()
        self._idle = threading.Event()  # set: nothing handed over is waiting to be acted on
        self._idle.set()
        self._lock = threading.Lock()
        self._box: Batch | None = None
        self.busy = threading.Event()  # set while a check runs (for tests and --verbose)
        self._thread = threading.Thread(target=self._run, name="credbroker-rotation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            while not self._idle.wait(1.0):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            self.busy.set()
            try:
                result = self._check()
            finally:
                self.busy.clear()
            if result is None or self._stop.is_set():
                continue
            with self._lock:
                self._box = result
                self._idle.clear()
            try:
                signal.pthread_kill(self._wake_thread, signal.SIGCHLD)
            except ProcessLookupError:
                return

    def take(self) -> Batch | None:
        """What a check handed over (once), or None. Call ``done()`` after acting on it."""
        with self._lock:
            result, self._box = self._box, None
        return result

    def done(self) -> None:
        """The handed-over result was acted on: the next check may run."""
        self._idle.set()

    def close(self, timeout: float = 0.5) -> bool:
        """Stop checking; True when the thread has ended (a check stuck on Vault may still hold it)."""
        self._stop.set()
        self._idle.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()
