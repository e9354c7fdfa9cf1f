"""Following a vault profile's versions: ``Watcher`` polls its ``current_version`` and keeps the broker's
token alive (renewal, AppRole re-login). Used by a run's rotation (``broker.rotation``) and by the signing
proxy's own rotation (``broker.proxy.follow``); it sits below both.

It is handed the run's Vault settings, resolved once. It resolves them again (``VaultSettings.reresolved``)
at two named moments only, because a run outlives a token: after Vault rejected the token (a `vault login`
during the run may have written a new ~/.vault-token), and for an AppRole re-login (without the dead
token, reading the id files again: an admin may have issued a new secret_id).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from .config import Profile
from .console import say
from .errors import BrokerError, VaultAuthError
from .events import Event, Recorder
from .vault.settings import VaultSettings

__all__ = ["MAX_BACKOFF", "Watcher"]

#: Backoff between failed attempts: doubles from the interval up to this.
MAX_BACKOFF = 300.0


class Watcher:
    """Polls a vault profile's ``current_version``; renews or replaces its token."""

    def __init__(self, profile: Profile, settings: VaultSettings, record: Recorder, version: int | None,
                 interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.profile = profile
        self.settings = settings
        self.record = record
        self.version = version  # the version the running bot holds
        self.interval = interval
        self.clock = clock
        self._client: Any = None
        self._token_expires: float | None = None  # monotonic time; None = no expiry / unknown
        self._renewable = False
        self._token_ttl = 0.0  # the lifetime the token was given at its last login or renewal
        self._renewal_extends = True  # False once Vault "renewed" without extending (the max TTL reached)
        self._acted: set[int] = set()
        self._next_try = 0.0
        self._backoff = interval
        self._vault_down = False
        self._token_rejected = False  # Vault said the token is no good: re-resolve before the next login
        self._lookup_warned = False
        self._lookup_failed = False  # the token's lifetime is unknown: ask again at the next poll

    @property
    def env(self) -> Mapping[str, str]:
        """What the settings were resolved from: what a daemon or the early fetch child resolves its own
        from when the rotation's read goes there (without the dead token after an AppRole re-login)."""
        return self.settings.inputs if self.settings.inputs is not None else {}

    # -- token lifecycle --------------------------------------------------------------
    def _login(self) -> Any:
        from .vault.token import open_client

        if self._token_rejected:  # the named re-resolve: a `vault login` may have written a new token file
            self.settings = self.settings.reresolved()
            self._token_rejected = False
        client = open_client(self.settings)
        self._learn_token(client)
        return client

    def _learn_token(self, client: Any) -> None:
        from .vault import token

        try:
            data = token.lookup_self(client, self.settings, action="look up the broker's token at",
                                     check_token=False)["data"]
            if not isinstance(data, dict):
                raise TypeError(type(data).__name__)
            ttl = float(data.get("ttl") or 0)
            self._renewable = bool(data.get("renewable"))
            self._lookup_failed = False
            self._token_ttl, self._renewal_extends = ttl, True
        except (BrokerError, KeyError, TypeError, ValueError) as exc:
            # Vault refused or answered something unusable: the token's lifetime is unknown, so it is
            # not renewed. Say so once (the run goes on; rotation stops being followed if it expires).
            ttl, self._renewable, self._lookup_failed = 0.0, False, True
            if not self._lookup_warned:
                self._lookup_warned = True
                reason = exc.message if isinstance(exc, BrokerError) else f"unexpected answer ({type(exc).__name__})"
                self.record(Event.TOKEN_LOOKUP_FAILED, {"profile": self.profile.name, "reason": reason})
                say(f"cannot look up the Vault token's lifetime, so it will not be renewed: {reason}")
        self._token_expires = self.clock() + ttl if ttl > 0 else None

    def _keep_token_alive(self) -> None:
        """Renew once half the token's lifetime is used up (or less than two intervals, at least 5 s, remain),
        so that a Vault outage or a leader election shorter than half the TTL never lets it expire (Vault's
        own lifetime watcher renews at about two thirds); else log in again. After a renewal that did not
        extend the token (its max TTL), only the last two intervals are tried again."""
        if self._client is None:
            self._client = self._login()
            return
        if self._token_expires is None:
            if self._lookup_failed:
                self._learn_token(self._client)
            return
        remaining = self._token_expires - self.clock()
        half_life = self._token_ttl / 2 if self._renewal_extends else 0.0
        if remaining > max(2 * self.interval, 5.0, half_life):
            return
        if self._renewable and remaining > 0:
            from .vault import token

            try:
                resp = token.renew_self(self._client, self.settings, action="renew the broker's token at")
                ttl = float(resp["auth"]["lease_duration"])
                if ttl > remaining:  # at max TTL, Vault "renews" without extending it
                    self._token_expires = self.clock() + ttl
                    self._token_ttl = ttl
                    self.record(Event.TOKEN_RENEWED, {"profile": self.profile.name, "ttl_s": int(ttl)})
                    return
                self._renewal_extends = False
            except (BrokerError, KeyError, TypeError, ValueError):
                pass  # not renewed: tried again at the next check; a fresh login in the last two intervals
        if remaining > max(2 * self.interval, 5.0):
            return  # an early renewal that did not take: no AppRole login yet (a secret_id may count its uses)
        if self.settings.role_id is None:  # no AppRole configured: nothing to log in again with
            if remaining <= 0:
                self.record(Event.TOKEN_FAILED, {"profile": self.profile.name,
                                                 "reason": "token expired and no AppRole credentials to log in again"})
                say("the Vault token expired and cannot be renewed; rotation is no longer followed "
                      "(configure AppRole for long runs)")
                self._token_expires = None
            return
        from .vault.token import relogin

        try:
            # The named re-resolve for a re-login: without the dead token, the id files read again.
            self.settings = self.settings.reresolved(drop_token=True)
            self._client = relogin(self.settings)
            self._learn_token(self._client)
        except BrokerError as exc:
            self.record(Event.TOKEN_FAILED, {"profile": self.profile.name, "reason": exc.message})
            say(f"AppRole login to keep following rotation failed: {exc}")
            raise
        self.record(Event.TOKEN_RELOGIN, {"profile": self.profile.name, "method": "approle"})

    # -- polling ----------------------------------------------------------------------
    def due(self) -> bool:
        return self.clock() >= self._next_try

    def _failed(self, what: str, exc: BrokerError) -> None:
        delay = self._backoff
        self._backoff = min(delay * 2, MAX_BACKOFF)
        if self._token_expires is not None:
            # A backoff never sleeps through the token's renewal (a leader election outlasting a short
            # token's last renewal window): the next try comes while the token is still alive.
            left = self._token_expires - self.clock()
            if left > 0:
                delay = min(delay, max(left / 2, 1.0))
        self._next_try = self.clock() + delay
        if not self._vault_down:
            self._vault_down = True
            say(f"{what} failed, retrying with backoff; the bot keeps running: {exc}")
        self.record(Event.ROTATION_CHECK_FAILED, {"profile": self.profile.name, "error": type(exc).__name__,
                                                  "reason": exc.message, "retry_in_s": delay})

    def poll(self) -> int | None:
        """A version newer than the bot's, not yet acted on; None otherwise (never raises BrokerError)."""
        if not self.due():
            return None
        from .sources.vault import current_version

        try:
            self._keep_token_alive()
            latest = current_version(self.profile, self.settings, client=self._client)
        except BrokerError as exc:
            if isinstance(exc, VaultAuthError):  # the token is no longer good: log in afresh next time
                self._client = None
                self._token_rejected = True
            self._failed("checking for a rotated key", exc)
            return None
        self._next_try = self.clock() + self.interval
        self._backoff = self.interval
        if self._vault_down:
            self._vault_down = False
            say("Vault answers again; following rotation")
        if latest is None or self.version is None or latest <= self.version or latest in self._acted:
            return None
        return latest

    def acted(self, version: int) -> None:
        """Remember that ``version`` was handled (restart done, signal sent, or ignored)."""
        self._acted.add(version)

    def fetch_failed(self, exc: BrokerError) -> None:
        """The new version could not be read: back off, keep the old bot."""
        self._failed("reading the rotated key", exc)

    def close(self) -> None:
        if self._client is not None:
            from .vault.session import close

            try:
                close(self._client)
            except OSError:
                pass


# -- off the supervising thread -------------------------------------------------------------
