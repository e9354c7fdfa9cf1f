"""The ``[profiles.NAME.signer]`` table, validated.

Example::

    [profiles.um-futures.signer]
    type = "ed25519"          # "auto" (default) | "hmac" | "ed25519" | "rsa" | "transit"
    recv_window = 5000        # ms, 1..60000 (Binance's default is 5000)

    [profiles.um-transit.signer]
    type = "transit"
    transit_key = "binance-um"        # an Ed25519 key made with scripts/transit-key
    transit_mount = "transit"         # default
    token_ttl = "1h"                  # the child's signing token; renewed while the bot runs
    # token_role = "credbroker-signer"  # optional Vault token role that may issue it
    # transit_key_version = 1           # pin the version registered with Binance (rotation-safe)
    # exchange_url = "https://fapi.binance.com"  # get_signer() learns the exchange's clock there at start

KV fields read (names can be changed with ``api_key_field``/``key_field``):
``api_key`` (the exchange API key), and the signing key in ``private_key``
(PEM: Ed25519 or RSA) or ``api_secret`` (an HMAC secret, or PEM), with an
optional ``private_key_passphrase`` for an encrypted PEM. A transit profile
needs only ``api_key``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..config import Profile
from .. import units
from ..errors import ConfigError
from . import binance

KINDS = ("auto", "hmac", "ed25519", "rsa", "transit")
KEY_FIELDS = ("private_key", "api_secret")


@dataclass(frozen=True)
class SignerSettings:
    """Validated signer options of one profile. Holds no secret."""

    type: str = "auto"
    recv_window: int = binance.DEFAULT_RECV_WINDOW
    api_key_field: str = "api_key"
    key_field: str | None = None  # None: private_key if present, else api_secret
    passphrase_field: str = "private_key_passphrase"
    transit_key: str | None = None
    transit_mount: str = "transit"
    token_ttl: str = "1h"
    token_role: str | None = None
    transit_key_version: int | None = None  # pin the version registered with the exchange
    refresh_interval: float | None = None  # seconds; get_signer(profile=...) checks for a rotated key
    exchange_url: str | None = None  # get_signer() learns the exchange's clock offset there at start

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], where: str) -> SignerSettings:
        """Validate a raw table; ``where`` names it in errors (``FILE: profiles.X.signer``)."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table", "write [profiles.NAME.signer]")
        known = set(cls.__dataclass_fields__)
        for key in table:
            if key not in known:
                raise ConfigError(f"{where}.{key}: unknown key", f"expected one of: {', '.join(sorted(known))}")
        kind = table.get("type", "auto")
        if kind not in KINDS:
            raise ConfigError(f"{where}.type: unknown signer type {kind!r}", f"use one of: {', '.join(KINDS)}")
        rw = table.get("recv_window", binance.DEFAULT_RECV_WINDOW)
        if isinstance(rw, bool) or not isinstance(rw, int) or not 0 < rw <= binance.MAX_RECV_WINDOW:
            raise ConfigError(f"{where}.recv_window: expected milliseconds 1..{binance.MAX_RECV_WINDOW}, got {rw!r}",
                              "Binance recommends 5000 or less")
        for key in ("api_key_field", "key_field", "passphrase_field", "transit_key", "transit_mount", "token_role"):
            value = table.get(key)
            bad_slash = isinstance(value, str) and key != "transit_mount" and "/" in value
            if value is not None and (not isinstance(value, str) or not value.strip() or bad_slash):
                raise ConfigError(f"{where}.{key}: expected a name (a non-empty string without '/')",
                                  f"fix {key}")
            if value is not None and key in ("transit_key", "transit_mount", "token_role"):
                from ..vault.paths import PathKind, check  # these go into Vault request paths

                check(value, PathKind.MOUNT if key == "transit_mount" else PathKind.NAME, f"{where}.{key}")
        ttl_seconds = units.seconds(table.get("token_ttl", "1h"), f"{where}.token_ttl")
        if ttl_seconds != int(ttl_seconds):
            raise ConfigError(f"{where}.token_ttl: expected whole seconds, got {table.get('token_ttl')!r}",
                              'e.g. token_ttl = "1h"')
        ttl = f"{int(ttl_seconds)}s"  # Vault's own duration syntax
        version = table.get("transit_key_version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
            raise ConfigError(f"{where}.transit_key_version: expected a key version >= 1, got {version!r}",
                              "omit it to sign with the latest version")
        refresh = table.get("refresh_interval")
        if refresh is not None:
            refresh = units.seconds(refresh, f"{where}.refresh_interval")
        exchange_url = table.get("exchange_url")
        if exchange_url is not None and (not isinstance(exchange_url, str)
                                         or not exchange_url.startswith(("https://", "http://"))):
            raise ConfigError(f"{where}.exchange_url: expected an http(s) URL, got {exchange_url!r}",
                              'e.g. exchange_url = "https://fapi.binance.com"')
        settings = cls(
            type=kind,
            recv_window=rw,
            api_key_field=table.get("api_key_field", "api_key"),
            key_field=table.get("key_field"),
            passphrase_field=table.get("passphrase_field", "private_key_passphrase"),
            transit_key=table.get("transit_key"),
            transit_mount=str(table.get("transit_mount", "transit")).strip("/"),
            token_ttl=ttl,
            token_role=table.get("token_role"),
            transit_key_version=version,
            refresh_interval=refresh,
            exchange_url=exchange_url,
        )
        if settings.type == "transit" and not settings.transit_key:
            raise ConfigError(f"{where}.transit_key: missing for a transit signer",
                              'name the Ed25519 transit key, e.g. transit_key = "binance-um"')
        if settings.transit_key and settings.type not in ("transit", "auto"):
            raise ConfigError(f"{where}.transit_key: set, but type is {settings.type!r}",
                              'set type = "transit", or remove transit_key')
        if settings.transit_key:
            settings = cls(**{**asdict(settings), "type": "transit"})
        return settings

    @classmethod
    def for_profile(cls, profile: Profile) -> SignerSettings:
        """The profile's ``signer`` table (defaults when it has none)."""
        table = profile.sections.get("signer", {}) if profile.sections else {}
        return cls.from_mapping(table, profile.where("signer"))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form (for ``CREDBROKER_SIGNER`` in a child's environment)."""
        return asdict(self)

    def ttl_seconds(self) -> int:
        """``token_ttl`` in seconds."""
        return int(units.seconds(self.token_ttl, "token_ttl"))
