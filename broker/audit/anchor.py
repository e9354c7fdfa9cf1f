"""A witness outside the host: the keyed chain's head, anchored in Vault.

Someone who can rewrite every local file (the log, the rotated files, the head)
can roll the log back to an earlier state that verifies locally. The anchor
catches that: at the end of each writer process, and every ``anchor_interval``
while it runs, the head (seq, hash) is written to a KV v2 secret::

    secret/credbroker-audit/<host>/<key id>-<log id>   ([audit] anchor, the host name, the chain)

    {"v": 1, "seq": 36, "hash": "<64 hex>", "kid": "<16 hex>", "host": "bot-1",
     "log": "/home/trader/.local/state/credbroker/audit.log", "ts": "...", "mac": "<64 hex>"}

``mac`` is HMAC-SHA256 with the chain key (its own label), so a token that can
write the path but does not hold the audit key cannot forge an anchor that
verifies. The broker's Vault policy may create new versions and read them, but
not delete or destroy versions or change the metadata (vault-policies/
credbroker-audit-anchor.hcl): earlier anchors stay readable, up to the
secret's ``max_versions``. ``credbroker audit verify`` reads every retained
version and checks that the local chain holds each anchored record: records
cut after an anchor are caught even when every local file was rewritten.

Anchoring needs a keyed chain and Vault settings (``VAULT_ADDR``/``BAO_ADDR``
or ``[vault] addr``); ``[audit] anchor = "off"`` turns it off. A failure never
stops a bot: it is recorded (``anchor_failed``) and warned on stderr.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ..events import Event
from ..vault.settings import VaultSettings
from ..errors import BrokerError, VaultAuthError, VaultPermissionDenied
from .chain import ANCHOR_LABEL, Hasher, digest_matches, labelled_mac, utc_timestamp
from .settings import AuditSettings

ANCHOR_FAILED = Event.ANCHOR_FAILED
#: How many retained versions ``verify`` reads at most.
MAX_VERSIONS_READ = 100
_HOST_CHARS = re.compile(r"[^A-Za-z0-9._-]")


class AnchorPlace(NamedTuple):
    """Where a log's anchor lives in Vault."""

    mount: str
    path: str  # inside the mount

    def __str__(self) -> str:
        return f"{self.mount}/{self.path}"


class Anchor(NamedTuple):
    """One anchored head, as read back (``version``: the KV version it was stored as)."""

    seq: int
    hash: str
    kid: str | None
    log: str | None
    version: int | None
    mac_ok: bool


def host_name() -> str:
    """The host's name as ``uname -n`` prints it, made a plain path segment."""
    name = _HOST_CHARS.sub("_", os.uname().nodename) or "host"
    return "_" + name if name.startswith(".") else name


def place_for(settings: AuditSettings, kid: str | None, host: str | None = None) -> AnchorPlace | None:
    """Where this log is anchored, or None when ``[audit] anchor = "off"`` or the chain is unkeyed.

    ``PREFIX/<host>/<key id>-<log id>``: each chain (a key and a log file) has a place
    of its own, so two logs on one host, or a new chain after a key change, never
    read each other's anchors as forged ones.
    """
    if settings.anchor is None or kid is None:
        return None
    import hashlib

    mount, _, prefix = settings.anchor.partition("/")
    log_id = hashlib.sha256(str(settings.path).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return AnchorPlace(mount, f"{prefix}/{host or host_name()}/{kid}-{log_id}")


def vault_configured(env: Mapping[str, str]) -> bool:
    """True when a Vault address is set (the environment, or ``[vault] addr`` carried beside it)."""
    from ..vault.origins import value

    return bool(value(env, "VAULT_ADDR", "BAO_ADDR"))


def message(fields: Mapping[str, Any]) -> bytes:
    """The bytes an anchor's MAC covers: every field but ``mac``, as sorted compact JSON."""
    body = {k: v for k, v in fields.items() if k != "mac"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def make_payload(seq: int, digest: str, kid: str | None, log: str, ts: str, mac: Hasher) -> dict[str, Any]:
    """The KV data of one anchor, MAC'd."""
    fields: dict[str, Any] = {"v": 1, "seq": seq, "hash": digest, "kid": kid, "host": host_name(), "log": log,
                              "ts": ts}
    fields["mac"] = mac(message(fields))
    return fields


def parse(data: Any, version: int | None, key: bytes | None) -> Anchor | None:
    """An anchor read back from Vault; None when it is not one at all."""
    if not isinstance(data, dict):
        return None
    seq, digest, mac = data.get("seq"), data.get("hash"), data.get("mac")
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(digest, str) or not isinstance(mac, str):
        return None
    ok = key is not None and digest_matches(labelled_mac(key, ANCHOR_LABEL)(message(data)), mac)
    kid, log = data.get("kid"), data.get("log")
    return Anchor(seq, digest, kid if isinstance(kid, str) else None, log if isinstance(log, str) else None,
                  version, ok)


# -- the one place that talks to Vault -------------------------------------------------------
def _vault_kv(settings: VaultSettings) -> tuple[Any, VaultSettings]:
    """(an authenticated hvac client, its settings): the calls themselves are ``broker.vault.kv``'s."""
    from ..vault import token

    return token.open_client(settings), settings


def write(vault: VaultSettings, place: AnchorPlace, payload: Mapping[str, Any],
          client: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
    """Store one anchor as a new version (raises a VaultError); returns the client for reuse."""
    from ..vault import kv

    hvac_client, settings = client or _vault_kv(vault)
    kv.write(hvac_client, settings, place.mount, place.path, dict(payload), action="write the audit anchor to")
    return hvac_client, settings


def read_all(vault: VaultSettings, place: AnchorPlace, key: bytes | None) -> list[Anchor]:
    """Every retained anchor version, newest first ([] when none was ever written)."""
    from ..errors import VaultNotFound

    from ..vault import kv

    client, settings = _vault_kv(vault)
    try:
        meta = kv.read_metadata(client, settings, place.mount, place.path, action="read the audit anchors at")
    except VaultNotFound:
        return []
    versions = meta.get("data", {}).get("versions", {}) if isinstance(meta, dict) else {}
    numbers = sorted((int(v) for v, info in versions.items()
                      if str(v).isascii() and str(v).isdigit() and isinstance(info, dict) and not info.get("destroyed")
                      and not info.get("deletion_time")), reverse=True)[:MAX_VERSIONS_READ]
    out: list[Anchor] = []
    for number in numbers:
        resp = kv.read_version(client, settings, place.mount, place.path, number, action="read the audit anchor at",
                               shown=f"{place.mount}/data/{place.path} (version {number})", raise_on_deleted=False)
        data = resp.get("data", {}).get("data") if isinstance(resp, dict) else None
        anchor = parse(data, number, key)
        out.append(anchor if anchor is not None else Anchor(-1, "", None, None, number, False))
    return out


# -- the writer's side ---------------------------------------------------------------------------
class Anchorer:
    """Anchors a writer's head: on demand (a run's end) and every ``interval`` seconds meanwhile."""

    def __init__(self, env: Mapping[str, str], place: AnchorPlace, interval: float, mac: Hasher, kid: str | None,
                 log: str, record_failure: Callable[[dict[str, Any]], object]) -> None:
        self._env = env
        self.place = place
        self.interval = interval
        self._mac = mac
        self._kid = kid
        self._log = log
        self._record_failure = record_failure
        self._lock = threading.Lock()
        self._latest: tuple[int, str] | None = None
        self._anchored: tuple[int, str] | None = None
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: tuple[Any, Any] | None = None  # one login per process
        self._vault: VaultSettings | None = None  # resolved once, at the first anchor

    def committed(self, seq: int, digest: str) -> None:
        """The writer committed up to (seq, digest); the interval thread starts on the first call."""
        self._latest = (seq, digest)
        if self._thread is None and self.interval > 0:
            self._start_thread()

    def anchor_now(self) -> bool:
        """Anchor the latest committed head if it moved since the last anchor; False on failure."""
        with self._lock:
            latest = self._latest
            if latest is None or latest == self._anchored:
                return True
            payload = make_payload(latest[0], latest[1], self._kid, self._log, utc_timestamp(), self._mac)
            try:
                if self._vault is None:
                    self._vault = VaultSettings.from_env(self._env)
                self._client = write(self._vault, self.place, payload, self._client)
            except (VaultAuthError, VaultPermissionDenied):
                # An expired token (long runs): log in once more, then give up. The named re-resolve: a
                # `vault login` (or a new AppRole secret_id) since the first anchor is picked up here.
                self._client = None
                try:
                    assert self._vault is not None
                    self._vault = self._vault.reresolved()
                    self._client = write(self._vault, self.place, payload)
                except BrokerError as exc:
                    self._failed(latest[0], exc)
                    return False
            except BrokerError as exc:
                self._failed(latest[0], exc)
                return False
            self._anchored = latest
            self._failing = False
            return True

    def _failed(self, seq: int, exc: BrokerError) -> None:
        print(f"credbroker: WARNING: could not anchor the audit log's head (seq {seq}) in Vault at {self.place}: "
              f"{exc.message} (the bot keeps running; `credbroker audit verify` cannot vouch for records after "
              "the last anchor; grant the broker's token the anchor policy with `scripts/setup-vault "
              "--anchor-host HOST`, or set [audit] anchor = \"off\")", file=sys.stderr, flush=True)
        self._failing = True
        try:
            self._record_failure({"seq": seq, "place": str(self.place), "error": type(exc).__name__,
                                  "reason": exc.message})
        except BrokerError:
            pass  # the warning above is all that can be done

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._loop, name="credbroker-audit-anchor", daemon=True)
        # Started with every signal blocked: a supervisor that waits for signals with sigtimedwait
        # must receive them, not this thread.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self._thread = thread

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.anchor_now()

    def stop(self) -> None:
        """End the interval thread (without a last anchor)."""
        self._stop.set()

    def forget_after_fork(self) -> None:
        """A forked child never anchors for its parent."""
        self._stop.set()
        self._latest = None


def read_host(vault: VaultSettings, settings: AuditSettings, host: str, key: bytes | None
              ) -> tuple[list[Anchor], str]:
    """The anchors one host's writer left (``PREFIX/<host>/<key id>-*``), for a fleet review; (anchors, place).

    The reviewer does not know each host's log path (the ``<log id>``), so every
    chain of this key under the host is read; a host that runs two logs with one
    key is refused (their anchors cannot be told apart here).
    """
    from ..errors import AuditError, VaultNotFound
    from .keys import key_id

    if settings.anchor is None or key is None:
        return [], ""
    kid = key_id(key)
    mount, _, prefix = settings.anchor.partition("/")
    folder = f"{prefix}/{_HOST_CHARS.sub('_', host)}"
    from ..vault import kv

    client, vault_settings = _vault_kv(vault)
    try:
        listed = kv.list_keys(client, vault_settings, mount, folder, action="list the audit anchors at")
    except VaultNotFound:
        return [], f"{mount}/{folder}/{kid}-*"
    keys = listed.get("data", {}).get("keys", []) if isinstance(listed, dict) else []
    chains = sorted(k for k in keys if isinstance(k, str) and k.startswith(kid + "-") and not k.endswith("/"))
    if len(chains) > 1:
        raise AuditError(f"host {host}: {len(chains)} audit logs anchored with this key under {mount}/{folder}",
                         "review that host's logs one at a time (`credbroker audit verify FILE...` there)")
    if not chains:
        return [], f"{mount}/{folder}/{kid}-*"
    place = AnchorPlace(mount, f"{folder}/{chains[0]}")
    return read_all(vault, place, key), str(place)
