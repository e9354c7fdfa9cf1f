"""The signing proxy keeps the bot under the exchange's request-weight and order-rate limits.

Against tests/helpers/fake_binance.py sending Binance's ``X-MBX-USED-WEIGHT-*`` /
``X-MBX-ORDER-COUNT-*`` headers, its exchangeInfo ``rateLimits`` and its own
429/418 answers with ``Retry-After``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from broker.errors import ConfigError
from broker.proxy.settings import ProxySettings
from broker.proxy.weight import DEFAULT_WEIGHT, Limiter, Ticket, Verdict, cost, parse_limits
from tests.helpers.fake_binance import FakeBinance
from tests.helpers.proxy import Harness

ORDER = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01",
         "price": "100"}


def _early_in_the_window(fake: FakeBinance, seconds: int) -> None:
    """Set the fake exchange's clock 1 s after the start of a ``seconds`` window, so none ends mid-test."""
    span = seconds * 1000
    fake.clock_offset_ms = (-int(time.time() * 1000)) % span + 1000


@pytest.fixture
def fake() -> Iterator[FakeBinance]:
    f = FakeBinance().start()
    _early_in_the_window(f, 60)
    try:
        yield f
    finally:
        f.stop()


def test_endpoint_weights_follow_the_table_and_a_conservative_default() -> None:
    assert cost("futures", "POST", "/fapi/v1/order", "", "symbol=BTCUSDT") == (0, 1)
    assert cost("futures", "GET", "/fapi/v2/balance", "timestamp=1", "") == (5, 0)
    assert cost("futures", "GET", "/fapi/v1/openOrders", "symbol=BTCUSDT", "") == (1, 0)
    assert cost("futures", "GET", "/fapi/v1/openOrders", "", "") == (40, 0)
    assert cost("futures", "GET", "/fapi/v1/depth", "symbol=BTCUSDT&limit=1000", "") == (20, 0)
    assert cost("futures", "GET", "/fapi/v1/depth", "symbol=BTCUSDT", "") == (10, 0)  # default limit 500
    batch = "batchOrders=" + '[{"symbol":"BTCUSDT"},{"symbol":"ETHUSDT"},{"symbol":"ETHUSDT"}]'
    assert cost("futures", "POST", "/fapi/v1/batchOrders", "", batch) == (5, 3)
    assert cost("spot", "GET", "/api/v3/account", "", "") == (20, 0)
    assert cost("spot", "POST", "/api/v3/order", "", "") == (1, 1)
    assert cost("spot", "GET", "/api/v3/somethingNew", "", "") == (DEFAULT_WEIGHT["spot"], 0)
    assert cost("futures", "GET", "/fapi/v9/somethingNew", "", "") == (DEFAULT_WEIGHT["futures"], 0)
    assert cost("spot", "POST", "/sapi/v1/asset/transfer", "", "")[0] == 0  # SAPI: its own limits


def test_profile_rate_limits_are_validated() -> None:
    assert parse_limits({"weight_1m": 1200, "orders_10s": 50}, "x") == {("weight", "1m"): 1200,
                                                                        ("orders", "10s"): 50}
    with pytest.raises(ConfigError, match="unknown key"):
        parse_limits({"weight_per_minute": 1}, "x")
    with pytest.raises(ConfigError, match="positive whole number"):
        parse_limits({"weight_1m": 0}, "x")
    with pytest.raises(ConfigError, match="unknown upstream"):
        ProxySettings.from_mapping({"rate_limits": {"coinm": {"weight_1m": 1}}}, "p")
    s = ProxySettings.from_mapping({"rate_limits": {"futures": {"weight_1m": 100}}}, "p")
    assert s.rate_limits == {"futures": {("weight", "1m"): 100}}


def test_used_weight_header_makes_the_proxy_answer_binance_s_429_before_the_exchange_would(fake: FakeBinance
                                                                                          ) -> None:
    h = Harness(fake)
    try:
        client = h.client()
        # Another process on this IP has used nearly all of the minute's 2,400.
        fake.weight_headers = {"X-MBX-USED-WEIGHT-1M": "2396"}
        r = h.session.get(h.url + "/fapi/v2/balance", auth=client)
        assert r.status_code == 200 and r.headers["X-MBX-USED-WEIGHT-1M"] == "2396"
        sent = len(fake.signed())
        r = h.session.get(h.url + "/fapi/v2/balance", auth=client)  # weight 5: 2401 > 2400
        assert r.status_code == 429
        body = r.json()
        assert body["code"] == -1003 and "current limit is 2400 request weight per 1 MINUTE" in body["msg"]
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        assert len(fake.signed()) == sent  # never reached the exchange
        # An order weighs 0 on the IP limit: it still goes.
        r = h.session.post(h.url + "/fapi/v1/order", data=client.sign_params(ORDER), headers=client.headers())
        assert r.status_code == 200, r.text
        refused = h.events("proxy_refused")
        assert [e["rule"] for e in refused] == ["rate_limit:weight_1m"]
        assert refused[0]["endpoint"] == "/fapi/v2/balance" and refused[0]["retry_after"] >= 1
    finally:
        h.close()


def test_order_rate_limit_from_the_profile_refuses_with_1015(fake: FakeBinance) -> None:
    h = Harness(fake, table={"rate_limits": {"futures": {"orders_1m": 2}}})
    try:
        client = h.client()
        for _ in range(2):
            r = h.session.post(h.url + "/fapi/v1/order", data=client.sign_params(ORDER), headers=client.headers())
            assert r.status_code == 200, r.text
        r = h.session.post(h.url + "/fapi/v1/order", data=client.sign_params(ORDER), headers=client.headers())
        assert r.status_code == 429 and r.json()["code"] == -1015
        assert "2 orders per 1 MINUTE" in r.json()["msg"] and "Retry-After" in r.headers
        assert len([x for x in fake.signed() if x.path == "/fapi/v1/order"]) == 2
        # Reads are not orders.
        assert h.session.get(h.url + "/fapi/v2/balance", auth=client).status_code == 200
        assert [e["rule"] for e in h.events("proxy_refused")] == ["rate_limit:orders_1m"]
    finally:
        h.close()


def test_order_count_header_counts_what_the_exchange_saw(fake: FakeBinance) -> None:
    h = Harness(fake, table={"rate_limits": {"futures": {"orders_1m": 10}}})
    try:
        client = h.client()
        fake.weight_headers = {"X-MBX-USED-WEIGHT-1M": "1", "X-MBX-ORDER-COUNT-1M": "10"}
        r = h.session.post(h.url + "/fapi/v1/order", data=client.sign_params(ORDER), headers=client.headers())
        assert r.status_code == 200
        r = h.session.post(h.url + "/fapi/v1/order", data=client.sign_params(ORDER), headers=client.headers())
        assert r.status_code == 429 and r.json()["code"] == -1015
    finally:
        h.close()


@pytest.mark.parametrize("status", [429, 418])
def test_an_exchange_429_or_418_is_honoured_locally_until_retry_after(fake: FakeBinance, status: int) -> None:
    h = Harness(fake)
    try:
        client = h.client()
        fake.limited = (status, "30")
        r = h.session.get(h.url + "/fapi/v2/balance", auth=client)
        assert r.status_code == status and r.headers["Retry-After"] == "30"  # the exchange's, unchanged
        fake.limited = None
        sent = len(fake.signed())
        r = h.session.get(h.url + "/fapi/v2/balance", auth=client)
        assert r.status_code == status and r.json()["code"] == -1003
        assert 1 <= int(r.headers["Retry-After"]) <= 30
        assert len(fake.signed()) == sent
        assert h.events("proxy_refused")[-1]["rule"] == "rate_limit:retry_after"
        # The spot upstream is another limit: it still answers.
        assert h.session.get(h.url + "/api/v3/account", auth=client).status_code == 200
    finally:
        h.close()


def test_limits_are_learned_from_exchange_info_and_the_profile_s_win(fake: FakeBinance) -> None:
    fake.rate_limits = [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 12},
                        {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 300}]
    fake.weight_headers = {}  # no headers: the proxy's own count stands
    h = Harness(fake)
    try:
        client = h.client()
        assert h.session.get(h.url + "/fapi/v1/exchangeInfo").status_code == 200  # weight 1
        assert h.proxy.limiters["futures"].limits()["weight_1m"] == 12
        assert h.events("proxy_rate_limits")[0]["limits"]["weight_1m"] == 12
        assert h.session.get(h.url + "/fapi/v2/balance", auth=client).status_code == 200  # 6
        assert h.session.get(h.url + "/fapi/v2/balance", auth=client).status_code == 200  # 11
        assert h.session.get(h.url + "/fapi/v2/balance", auth=client).status_code == 429  # 16 > 12
    finally:
        h.close()
    h = Harness(fake, table={"rate_limits": {"futures": {"weight_1m": 100}}})
    try:
        assert h.session.get(h.url + "/fapi/v1/exchangeInfo").status_code == 200
        assert h.proxy.limiters["futures"].limits()["weight_1m"] == 100
        for _ in range(3):
            assert h.session.get(h.url + "/fapi/v2/balance", auth=h.client()).status_code == 200
    finally:
        h.close()


def test_a_header_counts_what_was_sent_after_its_request() -> None:
    lim = Limiter("futures", {("weight", "1m"): 100})
    now = 1_000_000 * 60_000 + 1000
    first = lim.acquire(5, 0, now)
    second = lim.acquire(5, 0, now)
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    # The first request's answer: the exchange had 90 used then; the second (5) left after it.
    lim.observe(first, 200, [("X-MBX-USED-WEIGHT-1M", "90")])
    verdict = lim.acquire(6, 0, now)
    assert isinstance(verdict, Verdict) and verdict.code == -1003  # 90 + 5 + 6 > 100
    assert isinstance(lim.acquire(5, 0, now), Ticket)  # 100: at the limit, not over
    # A new window starts from nothing.
    assert isinstance(lim.acquire(50, 0, now + 60_000), Ticket)


def test_an_answer_that_comes_back_late_does_not_count_later_requests_twice() -> None:
    """Ten requests of weight 10 reserved at once (100, the limit); the exchange counts 1 per request and
    answers requests 2-10 first. The first request's answer, arriving last, says 1: adding everything sent
    after it (90) would refuse the next request although the exchange has counted 10."""
    lim = Limiter("futures", {("weight", "1m"): 100})
    now = 1_000_000 * 60_000 + 1000
    tickets = [lim.acquire(10, 0, now) for _ in range(10)]
    assert all(isinstance(t, Ticket) for t in tickets)
    assert isinstance(lim.acquire(10, 0, now), Verdict)  # 100 reserved: the limit
    for n, ticket in enumerate(tickets[1:], start=2):
        lim.observe(ticket, 200, [("X-MBX-USED-WEIGHT-1M", str(n))])  # type: ignore[arg-type]
    lim.observe(tickets[0], 200, [("X-MBX-USED-WEIGHT-1M", "1")])  # type: ignore[arg-type]
    assert lim.rate_limits()[-1]["count"] == 10
    later = lim.acquire(10, 0, now)
    assert isinstance(later, Ticket)
    # Still conservative: what was sent after the newest answer counts on top of its figure.
    assert lim.rate_limits()[-1]["count"] == 20


def test_rotation_interval_is_validated() -> None:
    assert ProxySettings.from_mapping({}, "p").rotation_interval == 60.0
    assert ProxySettings.from_mapping({"rotation_interval": "5m"}, "p").rotation_interval == 300.0
    assert ProxySettings.from_mapping({"rotation_interval": 2}, "p").rotation_interval == 2.0
    for bad in ("soon", 0, "-1s", True, ""):
        with pytest.raises(ConfigError, match="rotation_interval: expected a duration > 0"):
            ProxySettings.from_mapping({"rotation_interval": bad}, "p")
