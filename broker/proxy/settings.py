"""The ``[profiles.NAME.proxy]`` table, validated: where the signing proxy sends each request.

Example::

    [profiles.um-futures.proxy]
    testnet = false                          # true: Binance's testnets instead of production
    spot = "https://api.binance.com"         # /api/... and /sapi/... (default shown)
    futures = "https://fapi.binance.com"     # /fapi/... (USDⓈ-M futures; default shown)
    # ca_file = "/etc/ssl/corp-ca.pem"       # trust these CAs for the exchange instead of certifi's bundle
    # client_key = "hmac"                    # the bot's stand-in: "same" kind as the real key (default) or "hmac"
    # rotation_interval = "60s"              # how often the proxy looks for a rotated key in Vault
    # unsafe_plain_http_loopback = true      # tests only: an http:// upstream on 127.0.0.1
    # ws_spot = "wss://ws-api.binance.com:443/ws-api/v3"   # WebSocket API upstreams (credbroker[ws]; defaults shown)
    # ws_futures = "wss://ws-fapi.binance.com/ws-fapi/v1"

    [profiles.um-futures.proxy.rate_limits.futures]   # optional: lower than the exchange's (weight.py)
    weight_1m = 1200                         # request weight per minute
    orders_10s = 50                          # orders per 10 seconds

``client_key = "hmac"`` gives the bot an HMAC proxy secret even when the real
key is Ed25519 or RSA: for clients whose PEM handling is broken (python-binance
misreads an encrypted Ed25519 key as RSA and crashes on batch orders with a PEM
key), while the exchange still only ever sees the real key's signatures.

Upstreams must be ``https://``. The one exception is a loopback upstream
(127.0.0.1, ::1, localhost) over plain HTTP, for a fake exchange in tests,
and only with ``unsafe_plain_http_loopback = true``; the proxy warns at every
start when that switch is on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import units
from ..errors import ConfigError

#: Binance's production and testnet REST base URLs (spot and USDⓈ-M futures API docs, "General Info").
PRODUCTION = {"spot": "https://api.binance.com", "futures": "https://fapi.binance.com"}
TESTNET = {"spot": "https://testnet.binance.vision", "futures": "https://testnet.binancefuture.com"}

#: URL path prefix -> which upstream serves it.
ROUTES: tuple[tuple[str, str], ...] = (("/fapi/", "futures"), ("/api/", "spot"), ("/sapi/", "spot"))
#: Where each upstream tells its time (GET, unsigned): spot and USDⓈ-M futures "Check Server Time".
TIME_PATHS = {"spot": "/api/v3/time", "futures": "/fapi/v1/time"}

_KNOWN = frozenset({"testnet", "spot", "futures", "unsafe_plain_http_loopback", "client_key", "ca_file",
                    "ws_spot", "ws_futures",  # ws_*: the WebSocket API upstreams, read by broker.proxy.ws
                    "rate_limits", "rotation_interval"})
CLIENT_KEYS = ("same", "hmac")
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True)
class ProxySettings:
    """Validated proxy options of one profile (no secret)."""

    spot: str = PRODUCTION["spot"]
    futures: str = PRODUCTION["futures"]
    testnet: bool = False
    unsafe_plain_http_loopback: bool = False
    client_key: str = "same"
    ca_file: str | None = None  # None: certifi's bundle (what requests trusts)
    #: upstream -> {(kind, interval): limit} from [proxy.rate_limits.<upstream>]; wins over exchangeInfo's
    rate_limits: Mapping[str, Mapping[tuple[str, str], int]] = field(default_factory=dict)
    rotation_interval: float = 60.0  # seconds between two looks at the Vault profile's version

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any] | None, where: str) -> ProxySettings:
        """Validate a raw ``[proxy]`` table; ``where`` names it in errors."""
        if table is None:
            return cls()
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table", "write [profiles.NAME.proxy]")
        for key in table:
            if key not in _KNOWN:
                raise ConfigError(f"{where}.{key}: unknown key", f"expected one of: {', '.join(sorted(_KNOWN))}")
        flags = {}
        for key in ("testnet", "unsafe_plain_http_loopback"):
            value = table.get(key, False)
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{key}: expected true or false, got {value!r}", f"e.g. {key} = false")
            flags[key] = value
        defaults = TESTNET if flags["testnet"] else PRODUCTION
        urls = {}
        for name in ("spot", "futures"):
            raw = table.get(name, defaults[name])
            urls[name] = check_base_url(raw, f"{where}.{name}", allow_plain_loopback=flags["unsafe_plain_http_loopback"])
        client_key = table.get("client_key", "same")
        if client_key not in CLIENT_KEYS:
            raise ConfigError(f"{where}.client_key: expected one of {', '.join(CLIENT_KEYS)}, got {client_key!r}",
                              'e.g. client_key = "hmac"')
        ca_file = table.get("ca_file")
        if ca_file is not None and (not isinstance(ca_file, str) or not os.path.isfile(ca_file)):
            raise ConfigError(f"{where}.ca_file: {ca_file!r} is not a readable file",
                              "name a PEM file of CA certificates, or remove ca_file")
        return cls(spot=urls["spot"], futures=urls["futures"], testnet=flags["testnet"],
                   unsafe_plain_http_loopback=flags["unsafe_plain_http_loopback"], client_key=client_key,
                   ca_file=ca_file, rate_limits=_rate_limits(table.get("rate_limits"), f"{where}.rate_limits"),
                   rotation_interval=_interval(table.get("rotation_interval", 60), f"{where}.rotation_interval"))

    @classmethod
    def for_profile(cls, profile: Any) -> ProxySettings:
        """The profile's ``proxy`` table (production Binance when it has none)."""
        table = profile.sections.get("proxy") if profile.sections else None
        return cls.from_mapping(table, profile.where("proxy"))

    def upstream_for(self, path: str) -> str | None:
        """The upstream name ("spot", "futures") serving ``path``; None for a path the proxy does not serve."""
        for prefix, name in ROUTES:
            if path.startswith(prefix):
                return name
        return None

    def base_url(self, name: str) -> str:
        """The base URL of upstream ``name``."""
        return self.spot if name == "spot" else self.futures

    def plain_http(self) -> list[str]:
        """The upstreams reached over plain HTTP (loopback only, by the unsafe switch)."""
        return [name for name in ("spot", "futures") if self.base_url(name).startswith("http://")]


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _interval(value: object, where: str) -> float:
    """Seconds, as a number or ``"30s"`` / ``"5m"`` / ``"1h"``; > 0."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().lower()
        unit = _UNITS.get(text[-1])
        try:
            seconds = float(text[:-1]) * unit if unit is not None else float(text)
        except ValueError:
            seconds = None
    if seconds is None or not seconds > 0:
        raise ConfigError(f"{where}: expected a duration > 0, got {value!r}", 'e.g. rotation_interval = "60s"')
    return seconds


def _rate_limits(table: object, where: str) -> dict[str, dict[tuple[str, str], int]]:
    """``[proxy.rate_limits]``: one table per upstream (spot, futures) of ``weight_1m = N``-style limits."""
    from .weight import parse_limits

    if table is None:
        return {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table", "e.g. [profiles.NAME.proxy.rate_limits.futures]")
    out = {}
    for name, limits in table.items():
        if name not in ("spot", "futures"):
            raise ConfigError(f"{where}.{name}: unknown upstream", "expected spot or futures")
        out[str(name)] = parse_limits(limits, f"{where}.{name}")
    return out


def check_base_url(raw: object, where: str, *, allow_plain_loopback: bool) -> str:
    """An exchange base URL: https://HOST[:PORT], or http:// on loopback with the unsafe switch."""
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{where}: expected a base URL, got {raw!r}", 'e.g. "https://fapi.binance.com"')
    url = raw.strip().rstrip("/")
    parts = units.split_url(url)
    if (parts is None or parts.scheme not in ("https", "http") or not parts.hostname or parts.path or parts.query
            or parts.username):
        raise ConfigError(f"{where}: {url!r} is not a base URL (scheme://host[:port], no path)",
                          'e.g. "https://fapi.binance.com"')
    if parts.scheme == "http":
        if parts.hostname not in _LOOPBACK:
            raise ConfigError(f"{where}: {url!r} is plain HTTP to another host: the exchange's answers and the "
                              "API key would travel unprotected", "use https://")
        if not allow_plain_loopback:
            raise ConfigError(f"{where}: {url!r} is plain HTTP", "use https://, or for a fake exchange on loopback "
                              "in tests set unsafe_plain_http_loopback = true")
    return url
