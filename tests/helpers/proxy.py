"""The signing proxy's in-process harness and end-to-end profile, shared by the proxy test modules (not a
test module): the API key, the fake exchange fixture ``fake``, the real signer the fake verifies, the
``Harness`` around an in-process ``SigningProxy``, the ``credbroker.toml`` of a proxied profile with its
key in OpenBao, and the client libraries' venvs (.venv-clients/).

``fake`` is a pytest fixture: a test module that uses it imports it by name."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from broker.agent.server import RecorderSink
from broker.proxy.clientkey import ClientKey
from broker.proxy.server import SigningProxy
from broker.proxy.settings import ProxySettings
from broker.proxy.upstream import make_upstreams
from broker.secret import Secret
from broker.signing import core
from broker.signing.ed25519 import Ed25519Signer
from broker.signing.hmac_sha256 import HmacSigner
from broker.signing.rsa import RsaSigner
from broker.signing_policy import SigningPolicy
from tests.conftest import OpenBao
from tests.helpers.fake_binance import FakeBinance

API_KEY = "K" + "a1" * 32


@pytest.fixture
def fake() -> Iterator[FakeBinance]:
    f = FakeBinance().start()
    try:
        yield f
    finally:
        f.stop()


def gen_pem(kind: str, passphrase: str | None = None) -> tuple[str, str]:
    """(private PEM, public PEM) of a fresh key, encrypted with ``passphrase`` when given."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key: Any = ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else \
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
    encryption: Any = serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else \
        serialization.NoEncryption()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption).decode()
    return private, core.public_key_pem(key)


def real_signer(fake: Any, kind: str, api_key: str = API_KEY) -> Any:
    """A signer with a fresh real key of ``kind`` that ``fake`` (a REST or WebSocket fake exchange) knows."""
    if kind == "hmac":
        secret = secrets.token_hex(32)
        fake.add_hmac(api_key, secret)
        return HmacSigner(api_key, Secret(secret))
    private, public = gen_pem(kind)
    fake.add_public_key(api_key, public)
    _, key = core.load_private_key(private.encode())
    return (Ed25519Signer if kind == "ed25519" else RsaSigner)(api_key, key)


def bot_signer(client_key: ClientKey, api_key: str) -> Any:
    """The bot's signer with a run's proxy secret (HMAC, or the Ed25519/RSA PEM), as `credbroker run --proxy`
    hands it to the bot: for the REST and the WebSocket proxy harnesses alike."""
    if client_key.kind == "hmac":
        return HmacSigner(api_key, Secret(client_key.secret.reveal()))
    _, key = core.load_private_key(client_key.secret.reveal())
    return (Ed25519Signer if client_key.kind == "ed25519" else RsaSigner)(api_key, key)


class Harness:
    def __init__(self, fake: FakeBinance, kind: str = "hmac", policy: SigningPolicy | None = None,
                 root_pid: int | None = None, allow_root: bool = True, ca_file: str | None = None,
                 sync: bool = True, table: dict[str, Any] | None = None) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []
        self.fake = fake
        self.signer = real_signer(fake, kind)
        self.client_key = ClientKey(kind)
        settings = ProxySettings.from_mapping({"spot": fake.url, "futures": fake.url,
                                               "unsafe_plain_http_loopback": True,
                                               **({"ca_file": ca_file} if ca_file else {}), **(table or {})}, "test")
        upstreams = make_upstreams(settings)
        for u in upstreams.values():
            if sync:
                u.sync_clock()
        self.proxy = SigningProxy(self.signer, self.client_key, settings, upstreams, policy or SigningPolicy(),
                                  RecorderSink(lambda e, f: self.records.append((e, f))), profile="p",
                                  root_pid=os.getpid() if root_pid is None else root_pid, allow_root=allow_root)
        self.url = self.proxy.start()
        self.session = requests.Session()

    def client(self) -> Any:
        """A bot's signer holding the proxy secret (what `credbroker run --proxy` injects)."""
        return bot_signer(self.client_key, API_KEY)

    def events(self, name: str) -> list[dict[str, Any]]:
        self.proxy.drain()  # the proxy's flusher writes queued records within 0.2 s; now, here
        return [f for e, f in self.records if e == name]

    def close(self) -> None:
        self.proxy.stop()


def proxy_profile(server: OpenBao, tmp: Path, fake: FakeBinance, kind: str, passphrase: str | None = None,
                  map_passphrase: bool = False) -> str:
    """Store a fresh ``kind`` key for API_KEY in KV, give it to ``fake`` and write ``tmp/credbroker.toml``
    with one profile ``bot`` proxied to ``fake`` (policy: BTCUSDT, ETHUSDT); returns the secret."""
    kv = f"credbroker/binance/proxy-{secrets.token_hex(3)}"
    if kind == "hmac":
        secret = secrets.token_hex(32)
        fake.add_hmac(API_KEY, secret)
        server.kv_put(kv, api_key=API_KEY, api_secret=secret)
        env = 'BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret"'
    else:
        private, public = gen_pem(kind, passphrase)
        fake.add_public_key(API_KEY, public)
        server.kv_put(kv, api_key=API_KEY, private_key=private,
                      **({"private_key_passphrase": passphrase} if passphrase else {}))
        secret = private
        env = 'BINANCE_API_KEY = "api_key", BINANCE_PRIVATE_KEY = "private_key"'
        if map_passphrase:
            env += ', BINANCE_PRIVATE_KEY_PASSPHRASE = "private_key_passphrase"'
    (tmp / "credbroker.toml").write_text(f"""
[profiles.bot]
source = "vault"
path = "secret/{kv}"
env = {{ {env} }}

[profiles.bot.proxy]
spot = "{fake.url}"
futures = "{fake.url}"
unsafe_plain_http_loopback = true

[profiles.bot.policy]
symbols = ["BTCUSDT", "ETHUSDT"]
""")
    return secret


#: python-binance installs a `binance/` folder that would overwrite binance-connector's in the test venv,
#: so it lives in its own venv, made before the tests (no network during them) by .ci/run:
#:   python3 -m venv .venv-clients/python-binance && .venv-clients/python-binance/bin/pip install python-binance==1.0.37
#: (and the same for binance-futures-connector==4.2.0, ccxt==4.5.90 and, in .venv-clients/binance-sdk,
#: binance-sdk-derivatives-trading-usds-futures==18.1.0, and in .venv-clients/binance-sdk-spot binance-sdk-spot==13.3.0)
PYTHON_BINANCE = Path(__file__).resolve().parent.parent.parent / ".venv-clients" / "python-binance" / "bin" / "python"


def client_python(python: Path, client: str) -> str:
    """A client library's venv interpreter; skips (fails under CREDBROKER_REQUIRE_SERVICES) without it."""
    if not python.exists():
        reason = f"{client}'s venv {python.parent.parent} is missing (.ci/run makes it)"
        if os.environ.get("CREDBROKER_REQUIRE_SERVICES"):
            pytest.fail(reason)
        pytest.skip(reason)
    return str(python)


def python_binance() -> str:
    """The python-binance venv's interpreter (``client_python``)."""
    return client_python(PYTHON_BINANCE, "python-binance")


BINANCE_SDK = Path(__file__).resolve().parent.parent.parent / ".venv-clients" / "binance-sdk" / "bin" / "python"
