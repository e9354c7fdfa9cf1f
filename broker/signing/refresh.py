"""A signer that follows key rotation in-process, with no restart (issue 5).

``get_signer(profile=...)`` returns a ``RefreshingSigner``: it signs with an
inner signer of the right kind and swaps in a new one when the profile's
secret has a new version:

* on ``signer.refresh()`` (returns True when it switched keys);
* by itself, every ``refresh_interval`` seconds (``[profiles.P.signer]
  refresh_interval``, or ``get_signer(..., refresh_interval=...)``), checked
  on the next signature after the interval passed: for a vault profile one
  metadata read, and a fetch only when the version changed;
* when the exchange answers with a key error (-2015, -2014, -1022, HTTP 401:
  the key may have been rotated under us), right after recording the
  failure.

A failed refresh never breaks signing with the key in hand: the error is
recorded (``rotation_check_failed``) and retried at the next interval; an
explicit ``refresh()`` raises it. Every switch is a ``rotation_detected``
audit event with the old and new version, and the new fetch is audited like
the first (``secret_fetched``). A pinned version (``version = N``) never
changes, so such a signer does not look.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import BrokerError
from .base import Signer
from .failures import SignatureFailure
from ..events import Event, Recorder

#: build() -> (a new inner signer, the secret's version or None)
Builder = Callable[[], tuple[Signer, int | None]]
#: latest() -> the secret's current version, cheaply (None: the source has no versions)
Latest = Callable[[], int | None]

_REFRESH_ON = frozenset({-2015, -2014, -1022})


class RefreshingSigner(Signer):
    """Delegates to an inner signer; ``refresh()`` replaces it when the key was rotated."""

    def __init__(self, build: Builder, *, latest: Latest | None, record: Recorder, profile: str | None,
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        inner, version = build()
        super().__init__(None, recv_window=inner.recv_window, profile=profile,
                         audit_config=inner._audit_config, record_failures=inner._record_failures)
        self._build = build
        self._latest = latest
        self._rec = record
        self._inner = inner
        self._api_key = inner._api_key
        self.version = version
        self.refresh_interval = interval
        self._mono = clock  # not self._clock: the base class stamps requests with that one
        self._next_check = clock() + interval if interval else float("inf")
        self._lock = threading.Lock()

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self._inner.kind

    # -- delegation ----------------------------------------------------------------------
    def __repr__(self) -> str:
        return repr(self._inner)  # the kind's own repr: masked API key, no secret

    __str__ = __repr__

    def _sign_bytes(self, payload: bytes) -> str:
        if self._mono() >= self._next_check:
            self._auto_refresh()
        return self._inner._sign_bytes(payload)

    @property
    def inner(self) -> Signer:
        """The signer of the key in use now (its kind's own class)."""
        return self._inner

    @property
    def key_version(self) -> int | None:
        """Transit only: the Vault key version of the last signature (None for local kinds)."""
        version: int | None = getattr(self._inner, "key_version", None)
        return version

    def public_key_pem(self, *args: Any, **kwargs: Any) -> str:
        return self._inner.public_key_pem(*args, **kwargs)

    def close(self) -> None:
        self._inner.close()

    def audit_recorder(self) -> Recorder:
        """The log ``get_signer(profile=...)`` opened (the one its fetches are recorded in)."""

        def record(event: str, fields: dict[str, Any]) -> None:
            self._rec(event, fields)

        return record

    def check_response(self, response: Any, *, raise_on_audit_error: bool = True) -> SignatureFailure | None:
        failure = super().check_response(response, raise_on_audit_error=raise_on_audit_error)
        self._after_failure(failure)
        return failure

    def report(self, status: int | None, body: Any, endpoint: str, *, method: str | None = None
               ) -> SignatureFailure | None:
        failure = super().report(status, body, endpoint, method=method)
        self._after_failure(failure)
        return failure

    # -- rotation ------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Switch to the secret's newest version if it changed; True when the key was replaced."""
        with self._lock:
            if self._latest is not None:
                latest = self._latest()
                if latest is not None and latest == self.version:
                    self._schedule()
                    return False
            inner, version = self._build()
            if version is not None and version == self.version:
                inner.close()
                self._schedule()
                return False
            old, old_version = self._inner, self.version
            self._inner, self.version, self._api_key = inner, version, inner._api_key
            old.close()
            self._schedule()
        self._rec(Event.ROTATION_DETECTED, {"profile": self.profile, "old_version": old_version,
                                            "new_version": version, "action": "refresh", "by": "get_signer"})
        return True

    def _schedule(self) -> None:
        if self.refresh_interval:
            self._next_check = self._mono() + self.refresh_interval

    def _auto_refresh(self) -> None:
        try:
            self.refresh()
        except BrokerError as exc:
            self._schedule()  # keep signing with the key in hand; try again next interval
            try:
                self._rec(Event.ROTATION_CHECK_FAILED, {"profile": self.profile, "error": type(exc).__name__,
                                                        "reason": exc.message, "by": "get_signer"})
            except BrokerError:
                pass
            print(f"credbroker: could not check for a rotated key, still signing with v{self.version}: {exc}",
                  file=sys.stderr)

    def _after_failure(self, failure: SignatureFailure | None) -> None:
        if failure is not None and (failure.code in _REFRESH_ON or failure.status == 401):
            self._auto_refresh()
