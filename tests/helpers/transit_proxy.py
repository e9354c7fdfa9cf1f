"""A proxy profile whose key lives in Vault's transit engine (shared by the proxy, WebSocket and client-matrix
tests): the transit key made with scripts/transit-key, its public key given to the fake exchange, the API key
in KV, and a credbroker.toml with one profile ``bot``."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any


def write_transit_proxy_profile(openbao: Any, tmp: Path, exchange: Any, api_key: str, *, rest_url: str,
                                proxy_extra: str = "", tail: str = "", prefix: str = "proxy-") -> str:
    """Make the transit key, register its public key with ``exchange`` (the fake that verifies signatures),
    store ``api_key`` in KV and write ``tmp/credbroker.toml``; ``proxy_extra``: more ``[profiles.bot.proxy]``
    lines, ``tail``: more tables. Returns the transit key's name."""
    from tests.integration.test_signing_transit import transit_key

    name = prefix + secrets.token_hex(4)
    made = transit_key(openbao, name)
    assert made.returncode == 0, made.stderr
    exchange.add_public_key(api_key, made.stdout)
    kv = "bots/" + name
    openbao.kv_put(kv, api_key=api_key)
    (tmp / "credbroker.toml").write_text(f"""
[profiles.bot]
source = "vault"
path = "secret/{kv}"
env = {{ BINANCE_API_KEY = "api_key" }}

[profiles.bot.signer]
type = "transit"
transit_key = "{name}"

[profiles.bot.proxy]
spot = "{rest_url}"
futures = "{rest_url}"
unsafe_plain_http_loopback = true
{proxy_extra}{tail}""")
    return name
