"""Request weight and order rate on the proxy's WebSocket API endpoint (``broker.proxy.ws``).

Binance counts WebSocket API requests against the same IP request weight and
account order limits as REST, so the endpoint takes each request's cost from
the REST proxy's limiter of the same upstream (``broker.proxy.weight``) and,
over a limit, answers Binance's WebSocket 429 itself. Against the fake
WebSocket API (tests/helpers/fake_binance_ws.py), in-process as tests/integration/test_proxy_ws.py
does, and end to end under `credbroker run --proxy` with the key in OpenBao.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("websockets", reason="the optional extra credbroker[ws] is not installed")

from websockets.sync.client import connect  # noqa: E402

from broker.proxy.clientkey import ClientKey  # noqa: E402
from broker.proxy.peer import peer_in_tree  # noqa: E402
from broker.proxy.weight import ORDERS, WEIGHT, Limiter  # noqa: E402
from broker.proxy.ws import WsProxy, ws_cost  # noqa: E402
from broker.signing_policy import SigningPolicy  # noqa: E402
from tests.helpers.fake_binance_ws import FakeBinanceWs  # noqa: E402
from tests.helpers.proxy_ws import API_KEY, ORDER, fake, fake_rest, real_signer, ws_call  # noqa: E402,F401


class Endpoint:
    """A WsProxy sharing ``limiter`` as the spot upstream's (what ``broker.proxy`` hands it: the REST one's)."""

    def __init__(self, fake: FakeBinanceWs, limiter: Limiter) -> None:  # noqa: F811
        self.records: list[tuple[str, dict[str, Any]]] = []
        self.client_key = ClientKey("hmac")
        self.limiter = limiter
        self.proxy = WsProxy(
            real_signer(fake, "hmac"), self.client_key, SigningPolicy(),
            {"spot": fake.url + "/ws-api/v3", "futures": fake.url + "/ws-fapi/v1"}, profile="p",
            record=lambda e, f: self.records.append((e, f)) is None,
            check_peer=lambda c, s: peer_in_tree(c, s, os.getpid(), allow_root=True), limiters={"spot": limiter})
        self.url = self.proxy.start()

    def bot(self) -> Any:
        from broker.secret import Secret
        from broker.signing.hmac_sha256 import HmacSigner

        return HmacSigner(API_KEY, Secret(self.client_key.secret.reveal()))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [f for e, f in self.records if e == name]


@pytest.fixture
def endpoints() -> Iterator[list[Endpoint]]:
    made: list[Endpoint] = []
    yield made
    for e in made:
        e.proxy.stop()


def _order(bot: Any, rid: Any) -> dict[str, Any]:
    return {"id": rid, "method": "order.place", "params": bot.sign_ws_params(ORDER, method="order.place")}


def test_an_order_over_the_order_rate_gets_binances_429_and_is_never_forwarded(
        fake: FakeBinanceWs, endpoints: list[Endpoint]) -> None:  # noqa: F811
    e = Endpoint(fake, Limiter("spot", {(WEIGHT, "1m"): 6000, (ORDERS, "10s"): 2}))
    endpoints.append(e)
    bot = e.bot()
    with connect(e.url + "/ws-api/v3") as ws:
        answers = [ws_call(ws, _order(bot, f"o-{i}")) for i in range(3)]
    assert [a["status"] for a in answers[:2]] == [200, 200], answers
    over = answers[2]
    assert over["id"] == "o-2" and over["status"] == 429
    assert over["error"]["code"] == -1015 and over["error"]["msg"].startswith(
        "Too many new orders; current limit is 2 orders per 10 SECOND.")
    data = over["error"]["data"]
    assert 0 < data["retryAfter"] - data["serverTime"] <= 10_000
    orders = [r for r in over["rateLimits"] if r["rateLimitType"] == "ORDERS"]
    assert orders == [{"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 2, "count": 2}]
    assert [s.method for s in fake.seen] == ["order.place", "order.place"]  # the third never left
    refused = e.events("proxy_refused")
    assert [(r["rule"], r["ws_method"]) for r in refused] == [("rate_limit:orders_10s", "order.place")]
    assert 1 <= refused[0]["retry_after"] <= 10
    assert len(e.events("proxy_request")) == 2


def test_the_exchanges_used_weight_counts_and_public_requests_are_limited_too(
        fake: FakeBinanceWs, endpoints: list[Endpoint]) -> None:  # noqa: F811
    e = Endpoint(fake, Limiter("spot"))  # Binance's spot default: 6000 weight per minute
    endpoints.append(e)
    fake.used_weight = 5990  # other processes on this IP used nearly all of it
    with connect(e.url + "/ws-api/v3") as ws:
        first = ws_call(ws, {"id": 1, "method": "time"})  # weight 1; its answer tells the exchange's count
        assert first["status"] == 200, first
        heavy = ws_call(ws, {"id": 2, "method": "exchangeInfo"})  # weight 20: 5990 + 20 > 6000
        light = ws_call(ws, {"id": 3, "method": "ping"})  # weight 1 still fits
    assert heavy["status"] == 429 and heavy["error"]["code"] == -1003, heavy
    assert "current limit is 6000 request weight per 1 MINUTE" in heavy["error"]["msg"]
    weight = next(r for r in heavy["rateLimits"] if r["rateLimitType"] == "REQUEST_WEIGHT")
    assert weight["limit"] == 6000 and weight["count"] == 5990
    assert light["status"] == 200, light
    assert [s.method for s in fake.seen] == ["time", "ping"]
    assert [r["rule"] for r in e.events("proxy_refused")] == ["rate_limit:weight_1m"]


def test_after_the_exchange_answers_429_requests_are_refused_locally_until_retry_after(
        fake: FakeBinanceWs, endpoints: list[Endpoint]) -> None:  # noqa: F811
    e = Endpoint(fake, Limiter("spot"))
    endpoints.append(e)
    bot = e.bot()
    fake.limited = 30
    with connect(e.url + "/ws-api/v3") as ws:
        theirs = ws_call(ws, _order(bot, "a"))
        fake.limited = None
        ours = ws_call(ws, _order(bot, "b"))
        public = ws_call(ws, {"id": "c", "method": "time"})
    assert theirs["status"] == 429 and theirs["error"]["code"] == -1003  # the exchange's, passed on unchanged
    assert ours["status"] == 429 and ours["error"]["code"] == -1003, ours
    assert "the exchange answered 429" in ours["error"]["msg"]
    assert 25_000 <= ours["error"]["data"]["retryAfter"] - ours["error"]["data"]["serverTime"] <= 31_000
    assert public["status"] == 429
    assert len(fake.seen) == 1
    assert [r["rule"] for r in e.events("proxy_refused")] == ["rate_limit:retry_after"] * 2


def test_ws_methods_cost_what_their_rest_endpoints_do() -> None:
    assert ws_cost("order.place", "spot", ORDER) == (1, 1)
    assert ws_cost("order.place", "futures", ORDER) == (0, 1)
    assert ws_cost("order.modify", "futures", ORDER) == (1, 1)
    assert ws_cost("order.cancel", "spot", {"symbol": "BTCUSDT", "orderId": 1}) == (1, 0)
    assert ws_cost("account.status", "spot", {}) == (20, 0)
    assert ws_cost("openOrders.status", "spot", {}) == (80, 0)  # all symbols: heavier than one
    assert ws_cost("openOrders.status", "spot", {"symbol": "BTCUSDT"}) == (6, 0)
    assert ws_cost("depth", "spot", {"symbol": "BTCUSDT", "limit": 1000}) == (50, 0)
    assert ws_cost("session.logon", "spot", {}) == (2, 0)
    # A value no request can carry weighs nothing (it never breaks the count): depth's default limit applies.
    assert ws_cost("depth", "spot", {"symbol": "BTCUSDT", "limit": {"a": 1}}) == (5, 0)


BOT = """
import json, os, sys, requests
from websockets.sync.client import connect
from broker import get_signer
signer = get_signer()
order = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01",
         "price": "100"}
out = {"rest": requests.post(os.environ["CREDBROKER_PROXY_URL"] + "/api/v3/order", data=order, auth=signer).json()}
with connect(os.environ["CREDBROKER_PROXY_WS_URL"] + "/ws-api/v3") as ws:
    for i in range(2):
        ws.send(json.dumps({"id": i, "method": "order.place", "params": signer.sign_ws_params(order)}))
        out[f"ws{i}"] = json.loads(ws.recv(timeout=30))
print(json.dumps(out))
"""


def test_rest_and_ws_orders_count_against_one_limit_under_credbroker_run_proxy(
        openbao: Any, tmp_path: Path, fake: FakeBinanceWs, fake_rest: Any) -> None:  # noqa: F811
    from tests.conftest import credbroker_bin
    from tests.helpers.auditlog import audit_records

    secret = secrets.token_hex(32)
    fake.add_hmac(API_KEY, secret)
    fake_rest.add_hmac(API_KEY, secret)
    kv = "bots/wsw-" + secrets.token_hex(4)
    openbao.kv_put(kv, api_key=API_KEY, api_secret=secret)
    (tmp_path / "credbroker.toml").write_text(f"""
[profiles.bot]
source = "vault"
path = "secret/{kv}"
env = {{ BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }}

[profiles.bot.proxy]
spot = "{fake_rest.url}"
futures = "{fake_rest.url}"
ws_spot = "{fake.url}/ws-api/v3"
ws_futures = "{fake.url}/ws-fapi/v1"
unsafe_plain_http_loopback = true

[profiles.bot.proxy.rate_limits.spot]
orders_10s = 2
""")
    proc = subprocess.run([credbroker_bin(), "run", "--proxy", "-p", "bot", "--", sys.executable, "-c", BOT],
                          env=openbao.env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["rest"]["status"] == "NEW", out
    assert out["ws0"]["status"] == 200, out
    # One REST order and one WebSocket order used the 2 orders per 10 s: the second WebSocket order is refused.
    assert out["ws1"]["status"] == 429 and out["ws1"]["error"]["code"] == -1015, out
    assert {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 2, "count": 2} \
        in out["ws1"]["rateLimits"]
    assert [s.method for s in fake.seen] == ["order.place"]
    refused = [r["data"] for r in audit_records() if r["event"] == "proxy_refused"]
    assert [r["rule"] for r in refused] == ["rate_limit:orders_10s"]
