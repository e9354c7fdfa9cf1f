"""The WebSocket API proxy tests' shared parts (not a test module): the API key and an order, the fake
WebSocket API fixture ``fake`` and the fake REST API fixture ``fake_rest``, the real signer the fake verifies,
and one request-answer exchange on a WebSocket.

``fake`` and ``fake_rest`` are pytest fixtures: a test module that uses them imports them by name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import proxy
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


def real_signer(fake: FakeBinanceWs, kind: str) -> Any:
    """``proxy.real_signer`` with the WebSocket tests' API key."""
    return proxy.real_signer(fake, kind, API_KEY)


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
