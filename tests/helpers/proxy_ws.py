"""The WebSocket API proxy tests' shared parts (not a test module): the API key and an order, the fake
WebSocket API fixture ``fake`` and the fake REST API fixture ``fake_rest``, the real signer the fake verifies,
and one request-answer exchange on a WebSocket.

``fake`` and ``fake_rest`` are pytest fixtures: a test module that uses them imports them by name."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from broker.secret import Secret
from broker.signing import core
from broker.signing.ed25519 import Ed25519Signer
from broker.signing.hmac_sha256 import HmacSigner
from broker.signing.rsa import RsaSigner
from tests.helpers.fake_binance_ws import FakeBinanceWs

API_KEY = "K" + "w1" * 32
ORDER = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01",
         "price": "100", "newClientOrderId": "a b+c/=d&e"}


@pytest.fixture
def fake() -> Iterator[FakeBinanceWs]:
    f = FakeBinanceWs().start()
    try:
        yield f
    finally:
        f.stop()


def _pem_pair(kind: str) -> tuple[bytes, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key: Any = ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else \
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return private, core.public_key_pem(key)


def real_signer(fake: FakeBinanceWs, kind: str) -> Any:
    if kind == "hmac":
        secret = secrets.token_hex(32)
        fake.add_hmac(API_KEY, secret)
        return HmacSigner(API_KEY, Secret(secret))
    private, public = _pem_pair(kind)
    fake.add_public_key(API_KEY, public)
    _, key = core.load_private_key(private)
    return (Ed25519Signer if kind == "ed25519" else RsaSigner)(API_KEY, key)


def ws_call(ws: Any, request: dict[str, Any]) -> dict[str, Any]:
    """Send ``request`` on ``ws`` and read its answer (10 s at most)."""
    ws.send(json.dumps(request))
    answer: dict[str, Any] = json.loads(ws.recv(timeout=10))
    return answer


@pytest.fixture
def fake_rest() -> Iterator[Any]:
    """The fake REST API beside the fake WebSocket API (the proxy's REST upstream)."""
    from tests.helpers.fake_binance import FakeBinance

    f = FakeBinance().start()
    try:
        yield f
    finally:
        f.stop()
