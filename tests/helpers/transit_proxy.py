"""A proxy profile whose key lives in Vault's transit engine (shared by the proxy, WebSocket and client-matrix
tests): the transit key made with scripts/transit-key (``transit_key``, also the transit signer's tests'), its
public key given to the fake exchange, the API key in KV, and a credbroker.toml with one profile ``bot``."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import REPO, OpenBao

TRANSIT_KEY_SCRIPT = REPO / "scripts" / "transit-key"


def transit_key(server: OpenBao, name: str | None = None, *args: str, path_dirs: str | None = None,
                python: tuple[str, ...] = (sys.executable,)) -> subprocess.CompletedProcess[str]:
    """Run scripts/transit-key with only `bao` on PATH (no `vault`), as an admin would."""
    name = name or "bot-" + secrets.token_hex(4)
    env = server.env()
    bindir = Path(server.binary).parent
    env["PATH"] = path_dirs if path_dirs is not None else f"{bindir}:/usr/bin:/bin"
    if not (bindir / "bao").exists():  # a `vault` binary: expose it under its own name
        env["CREDBROKER_VAULT_CLI"] = server.binary
    return subprocess.run([*python, str(TRANSIT_KEY_SCRIPT), *args, name], env=env, capture_output=True, text=True,
                          timeout=60)


def write_transit_proxy_profile(openbao: Any, tmp: Path, exchange: Any, api_key: str, *, rest_url: str,
                                proxy_extra: str = "", tail: str = "", prefix: str = "proxy-") -> str:
    """Make the transit key, register its public key with ``exchange`` (the fake that verifies signatures),
    store ``api_key`` in KV and write ``tmp/credbroker.toml``; ``proxy_extra``: more ``[profiles.bot.proxy]``
    lines, ``tail``: more tables. Returns the transit key's name."""
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
