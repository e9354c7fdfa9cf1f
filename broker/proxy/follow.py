"""The proxy follows key rotation: a rotated secret is signed with, without restarting the bot.

Under ``--proxy`` the bot holds only the per-run proxy secret, which does not
change when an admin rotates the real key in Vault. So the proxy itself
watches the profile's KV version (``broker.rotation.Watcher``: the same poll,
token renewal and back-off as ``--on-rotate``), reads the new version when one
appears (recorded as ``secret_fetched``, ``by: proxy_rotation``), builds a new
signer from it and swaps it in (``SigningProxy.swap_signer``): requests from
then on are signed with the new key; the bot notices nothing. A new version
that cannot be read or does not make a signer is recorded and the old key
stays in use (the exchange's answers will say when it stops working).

The interval is the profile's ``[proxy] rotation_interval`` (seconds, default
60). A transit key rotates inside Vault (transit signs with its newest
version): nothing to follow there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import BrokerError
from ..events import Event, Recorder

if TYPE_CHECKING:  # pragma: no cover
    from ..vault.settings import VaultSettings

DEFAULT_INTERVAL = 60.0


class KeyFollower:
    """A thread that polls the profile's version and swaps the proxy's signer on a new one."""

    def __init__(self, proxy: Any, profile: Any, settings: VaultSettings, version: int | None, interval: float,
                 make: Callable[[Any], Any], record: Recorder) -> None:
        from ..watch import Watcher

        self._proxy = proxy
        self._profile = profile
        self._make = make
        self._record = record
        self._interval = interval
        # The run's settings; the watcher re-resolves them only at its named moments (a rejected token,
        # an AppRole re-login), and the reads below follow what it holds.
        self._watcher = Watcher(profile, settings, record, version, interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="credbroker-proxy-rotation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self._watcher.close()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check()
            except BrokerError:
                pass  # recorded by check(); the old key stays in use

    def check(self) -> int | None:
        """One poll: the version swapped in, or None."""
        from ..access import read

        version = self._watcher.poll()
        if version is None:
            return None
        self._watcher.acted(version)
        try:
            creds = read(self._profile, env=self._watcher.env, settings=self._watcher.settings, record=self._record,
                         by="proxy_rotation", isolate=True,
                         on_refused=lambda exc: None)  # recorded below as proxy_rotation_failed
        except BrokerError as exc:
            self._watcher.fetch_failed(exc)
            self._record(Event.PROXY_ROTATION_FAILED, {"profile": self._profile.name, "version": version,
                                                   "reason": exc.message})
            raise
        try:
            signer = self._make(creds)
        except BrokerError as exc:
            self._record(Event.PROXY_ROTATION_FAILED, {"profile": self._profile.name, "version": version,
                                                   "reason": exc.message})
            raise
        finally:
            creds.wipe()
        self._proxy.swap_signer(signer)
        self._watcher.version = version
        self._record(Event.PROXY_KEY_ROTATED, {"profile": self._profile.name, "version": version,
                                           "kind": signer.kind})
        return version
