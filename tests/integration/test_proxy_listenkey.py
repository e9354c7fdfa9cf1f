"""Proxy mode keeps the bot's futures listenKey alive (broker.proxy.listenkeys), against the fake exchange.

The keeper's thread waits 30 minutes between rounds; the tests call its round (``keepalive``) directly.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.signing.listenkey import CREATED, FAILED, KEPT_ALIVE, PATH, RECREATED
from tests.helpers.listenkey import FuturesListenKeys
from tests.helpers.proxy import API_KEY, Harness

STREAM = "/credbroker/v1/streamEvent"


@pytest.fixture
def fake() -> Iterator[FuturesListenKeys]:
    f = FuturesListenKeys()
    f.start()
    yield f
    f.stop()


@pytest.fixture
def h(fake: FuturesListenKeys) -> Iterator[Harness]:
    harness = Harness(fake)
    try:
        yield harness
    finally:
        harness.close()


def listen_events(h: Harness) -> list[tuple[str, dict[str, object]]]:
    h.proxy.drain()
    return [(e, f) for e, f in h.records if e.startswith("listen_key_")]


def test_a_key_the_bot_creates_through_the_proxy_is_kept_alive_and_recreated(
        h: Harness, fake: FuturesListenKeys) -> None:
    r = h.session.post(h.url + PATH, headers={"X-MBX-APIKEY": API_KEY})
    assert r.status_code == 200
    key = r.json()["listenKey"]
    keeper = h.proxy.listen_keys.keeper
    assert keeper is not None and keeper.running and keeper.listen_key == key and keeper.interval == 1800
    assert keeper.keepalive() == key
    put = [x for x in fake.requests if x.path == PATH and x.method == "PUT"][-1]
    assert put.api_key == API_KEY and put.raw_query == "" and put.status == 200
    fake.expire(API_KEY)
    new = keeper.keepalive()
    assert new != key
    # The bot's client asks again (its stream broke): Binance answers the active key, the one kept.
    again = h.session.post(h.url + PATH, headers={"X-MBX-APIKEY": API_KEY}).json()["listenKey"]
    assert again == new
    events = listen_events(h)
    assert [e for e, _ in events] == [CREATED, KEPT_ALIVE, FAILED, RECREATED]
    assert events[0][1]["by"] == "bot" and events[1][1]["by"] == "proxy"
    assert all(f["profile"] == "p" for _, f in events)
    assert key not in repr(events) and new not in repr(events)


def test_the_bot_reports_a_stream_error_to_the_proxy(h: Harness, fake: FuturesListenKeys) -> None:
    # No key kept yet: recorded, nothing recreated.
    r = h.session.post(h.url + STREAM, json={"e": "error", "m": "Invalid listenKey"})
    assert r.status_code == 200 and r.json() == {"listenKey": None}
    key = h.session.post(h.url + PATH, headers={"X-MBX-APIKEY": API_KEY}).json()["listenKey"]
    fake.expire(API_KEY)
    r = h.session.post(h.url + STREAM, json={"e": "error", "m": "Invalid listenKey"})
    new = r.json()["listenKey"]
    assert r.status_code == 200 and isinstance(new, str) and new != key and new == fake.active[API_KEY]
    assert h.session.post(h.url + STREAM, json={"e": "ORDER_TRADE_UPDATE"}).json() == {"listenKey": None}
    assert h.session.post(h.url + STREAM, data=b"not json").status_code == 400
    assert h.session.get(h.url + STREAM).status_code == 405
    events = listen_events(h)
    assert [e for e, _ in events] == [FAILED, CREATED, FAILED, RECREATED]
    assert events[0][1]["source"] == "stream" and events[0][1]["by"] == "bot"
    assert events[3][1]["reason"] == "stream: Invalid listenKey"
    # Never forwarded to the exchange.
    assert not [x for x in fake.requests if x.path == STREAM]


def test_the_keeper_stops_when_the_bot_closes_its_key(h: Harness, fake: FuturesListenKeys) -> None:
    h.session.post(h.url + PATH, headers={"X-MBX-APIKEY": API_KEY})
    keeper = h.proxy.listen_keys.keeper
    assert keeper is not None and keeper._thread is not None
    thread = keeper._thread
    assert h.session.delete(h.url + PATH, headers={"X-MBX-APIKEY": API_KEY}).status_code == 200
    assert h.proxy.listen_keys.keeper is None
    thread.join(5)
    assert not thread.is_alive() and not keeper.running
    puts = len([x for x in fake.requests if x.method == "PUT"])
    assert puts == 0  # and it never kept the closed key alive


def test_a_compressed_answer_is_read_too() -> None:
    import gzip
    import zlib

    from broker.proxy.listenkeys import _listen_key
    from broker.proxy.upstream import Answer

    body = b'{"listenKey": "abc123"}'
    assert _listen_key(Answer(200, [("Content-Encoding", "gzip")], gzip.compress(body))) == "abc123"
    assert _listen_key(Answer(200, [("content-encoding", "deflate")], zlib.compress(body))) == "abc123"
    assert _listen_key(Answer(200, [], body)) == "abc123"
    assert _listen_key(Answer(200, [("Content-Encoding", "gzip")], b"not gzip")) is None
    assert _listen_key(Answer(200, [("Content-Encoding", "br")], body)) is None
    assert _listen_key(Answer(200, [], b'{"listenKey": ""}')) is None
