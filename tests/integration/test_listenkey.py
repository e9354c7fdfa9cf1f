"""listenKey upkeep (broker.signing.listenkey) against the fake Binance server on loopback.

Time is driven by the test: the keeper's ``wait`` is replaced by a script, so
the keepalive loop runs its rounds at once and nothing sleeps for minutes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.errors import ConfigError
from broker.secret import Secret
from broker.signing.hmac_sha256 import HmacSigner
from broker.signing.listenkey import (
    CREATED,
    FAILED,
    KEPT_ALIVE,
    PATH,
    RECREATED,
    ListenKeyError,
    ListenKeyKeeper,
    stream_trouble,
)
from tests.conftest import refused_url
from tests.helpers.listenkey import FuturesListenKeys

API_KEY = "LK" + "c3" * 31
SECRET = "S" + "d4" * 20


@pytest.fixture
def fake() -> Iterator[FuturesListenKeys]:
    f = FuturesListenKeys()
    f.add_hmac(API_KEY, SECRET)
    f.start()
    yield f
    f.stop()


class Records:
    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        self.items.append((event, fields))

    def events(self) -> list[str]:
        return [e for e, _ in self.items]


class Script:
    """A ``wait`` for the keeper: records each delay asked for, returns "go on" ``rounds`` times, then "stop"."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.delays: list[float] = []
        self.done = threading.Event()

    def __call__(self, delay: float) -> bool:
        self.delays.append(delay)
        if len(self.delays) > self.rounds:
            self.done.set()
            return True
        return False


def signer() -> HmacSigner:
    return HmacSigner(API_KEY, Secret(SECRET), profile="um")


def test_creates_and_keeps_alive_with_the_api_key_only_on_the_thread(fake: FuturesListenKeys) -> None:
    rec, script = Records(), Script(rounds=3)
    keeper = ListenKeyKeeper(signer(), fake.url, record=rec, wait=script, rand=lambda: 0.5, interval=1800)
    key = keeper.start()
    assert script.done.wait(10) and keeper._thread is not None
    keeper._thread.join(10)
    keeper.stop()
    assert not keeper.running
    assert key == fake.active[API_KEY]
    assert fake.calls() == ["POST", "PUT", "PUT", "PUT"]
    for r in (r for r in fake.requests if r.path == PATH):
        assert r.api_key == API_KEY and r.raw_query == "" and r.raw_body == ""  # no signature, no timestamp
    # 30 minutes shortened by the jitter (10% of it at most; here half of that).
    assert script.delays == [1710.0] * 4
    assert rec.events() == [CREATED, KEPT_ALIVE, KEPT_ALIVE, KEPT_ALIVE]
    created = rec.items[0][1]
    assert created["profile"] == "um" and created["endpoint"] == fake.url + PATH
    assert created["listen_key"] == "********" + key[-4:] and created["api_key"].endswith(API_KEY[-4:])
    assert key not in json.dumps(rec.items) and SECRET not in json.dumps(rec.items)


def test_reading_the_key_does_not_wait_for_a_call_in_flight() -> None:
    """A keepalive stuck on a slow exchange holds the keeper's lock; the bot asking for the current key (to
    reconnect its stream) gets it at once, not after the transport's timeout."""
    entered, release = threading.Event(), threading.Event()

    def slow(method: str, path: str, headers: Any) -> tuple[int, bytes]:
        entered.set()
        release.wait(30)
        return 200, b'{"listenKey": "k1"}'

    keeper = ListenKeyKeeper(API_KEY, "http://127.0.0.1:9", transport=slow, record=lambda e, f: None,
                             listen_key="k1")
    call = threading.Thread(target=keeper.keepalive, daemon=True)
    call.start()
    assert entered.wait(10)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(keeper.listen_key), daemon=True)
    reader.start()
    reader.join(10)  # a deadlock guard: with the lock taken, the read would wait until release
    stuck = reader.is_alive()
    release.set()
    call.join(10)
    assert not stuck and got == ["k1"]


def test_jitter_stays_inside_the_interval() -> None:
    low = ListenKeyKeeper("k", "http://127.0.0.1:9", interval=1000, jitter=0.2, rand=lambda: 0.999)
    high = ListenKeyKeeper("k", "http://127.0.0.1:9", interval=1000, jitter=0.2, rand=lambda: 0.0)
    assert 800 < low.next_delay() < 801 and high.next_delay() == 1000


def test_gone_key_is_recreated_on_minus_1125(fake: FuturesListenKeys) -> None:
    rec = Records()
    new_keys: list[str] = []
    keeper = ListenKeyKeeper(signer(), fake.url, record=rec, on_new_key=new_keys.append)
    first = keeper.create()
    fake.expire(API_KEY)  # 60 minutes without a keepalive, or closed
    second = keeper.keepalive()
    assert second != first and second == fake.active[API_KEY] == keeper.listen_key
    assert new_keys == [first, second]
    assert rec.events() == [CREATED, FAILED, RECREATED]
    failed, recreated = rec.items[1][1], rec.items[2][1]
    assert failed["code"] == -1125 and failed["action"] == "keepalive" and failed["source"] == "exchange"
    assert recreated["reason"] == "-1125 This listenKey does not exist."
    assert recreated["previous"].endswith(first[-4:]) and recreated["listen_key"].endswith(second[-4:])
    assert fake.calls() == ["POST", "PUT", "POST"]


def test_stream_error_reported_by_the_bot_recreates_the_key(fake: FuturesListenKeys) -> None:
    rec = Records()
    keeper = ListenKeyKeeper(signer(), fake.url, record=rec)
    first = keeper.create()
    assert keeper.report_stream_event({"e": "ORDER_TRADE_UPDATE", "o": {}}) is None
    assert keeper.report_stream_event("not json") is None
    assert rec.events() == [CREATED]
    fake.expire(API_KEY)
    new = keeper.report_stream_event('{"e": "error", "m": "Invalid listenKey"}')
    assert new is not None and new != first and new == keeper.listen_key
    assert rec.events() == [CREATED, FAILED, RECREATED]
    assert rec.items[1][1]["source"] == "stream" and rec.items[1][1]["message"] == "Invalid listenKey"
    assert rec.items[2][1]["reason"] == "stream: Invalid listenKey"
    assert keeper.report_stream_event({"e": "listenKeyExpired", "E": 1}) == new  # the active key: same one back
    assert rec.events()[-2:] == [FAILED, RECREATED] and rec.items[-2][1]["stream_event"] == "listenKeyExpired"


def test_unreachable_exchange_is_recorded_and_retried_sooner_and_the_thread_survives() -> None:
    rec = Records()
    with refused_url() as url:
        keeper = ListenKeyKeeper("AKEY1234", url, record=rec, listen_key="L" * 60, interval=1800)
        with pytest.raises(ListenKeyError, match="listenKey keepalive failed: Connection refused"):
            keeper.keepalive()
        assert keeper.next_delay() == 60.0
        script = Script(rounds=3)
        keeper._wait = script
        keeper.start()  # an adopted key: no POST at start
        assert script.done.wait(10) and keeper._thread is not None
        keeper._thread.join(10)
    assert rec.events() == [FAILED] * 4
    assert rec.items[0][1]["message"] == "Connection refused" and rec.items[0][1]["status"] is None
    # 60 s, doubling, capped at 5 minutes: never waits the whole 30 minutes after a failure.
    assert script.delays == [60.0, 120.0, 240.0, 300.0]


def test_exchange_error_other_than_gone_is_not_a_recreate(fake: FuturesListenKeys) -> None:
    rec = Records()
    keeper = ListenKeyKeeper(signer(), fake.url, record=rec)
    keeper.create()
    fake.fail_next.append((401, {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}))
    with pytest.raises(ListenKeyError, match="-2015"):
        keeper.keepalive()
    assert rec.events() == [CREATED, FAILED] and rec.items[1][1]["code"] == -2015
    assert keeper.keepalive() == fake.active[API_KEY]  # the next round works again
    assert keeper.failures == 0


def test_options_are_checked() -> None:
    for bad in (0, -1, 3601, True):
        with pytest.raises(ConfigError, match="interval"):
            ListenKeyKeeper("k", "http://127.0.0.1:9", interval=bad)
    with pytest.raises(ConfigError, match="jitter"):
        ListenKeyKeeper("k", "http://127.0.0.1:9", jitter=1.0)
    with pytest.raises(ConfigError, match="unencrypted"):
        ListenKeyKeeper("k", "http://fapi.binance.com")
    with pytest.raises(ConfigError, match="base URL only"):
        ListenKeyKeeper("k", "https://fapi.binance.com/fapi/v1")
    for bad in ("https://[::1", "https://fapi.binance.com:99999"):  # ValueErrors of urlsplit and .port, once
        with pytest.raises(ConfigError, match="not an http"):
            ListenKeyKeeper("k", bad)
    with pytest.raises(ListenKeyError, match="no listenKey yet"):
        ListenKeyKeeper("k", "https://fapi.binance.com").listen_key
    assert "L" * 20 not in repr(ListenKeyKeeper("k", "https://fapi.binance.com", listen_key="L" * 60))


def test_stream_trouble_reads_binance_messages() -> None:
    assert stream_trouble({"e": "error", "m": "Invalid listenKey"}) == ("error", "Invalid listenKey")
    assert stream_trouble(b'{"e":"listenKeyExpired","E":1}')[0] == "listenKeyExpired"
    assert stream_trouble({"e": "ACCOUNT_UPDATE"}) == (None, "")
    assert stream_trouble([1, 2]) == (None, "")


def audit_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_signer_keeper_and_stream_report_write_the_audit_log(fake: FuturesListenKeys, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "audit.log"
    monkeypatch.setenv("CREDBROKER_AUDIT_LOG", str(log))
    s = signer()
    # Without a keeper (a bot that keeps its key itself): recorded, nothing recreated.
    assert s.report_stream_error({"e": "error", "m": "Invalid listenKey"}) is True
    assert s.report_stream_error({"e": "ACCOUNT_UPDATE"}) is False
    keeper = s.listen_key_keeper(fake.url, wait=Script(rounds=0))
    with keeper:
        first = keeper.listen_key
        fake.expire(API_KEY)
        new = s.report_stream_error({"e": "error", "m": "Invalid listenKey"})
        assert isinstance(new, str) and new != first
    records = audit_records(log)
    assert [r["event"] for r in records] == [FAILED, CREATED, FAILED, RECREATED]
    assert all(r["data"]["profile"] == "um" for r in records)
    assert records[0]["data"]["by"] == "bot" and records[2]["data"]["by"] == "keeper"
    text = log.read_text()
    assert first not in text and new not in text and SECRET not in text and API_KEY not in text


@pytest.mark.vault
def test_keeper_of_a_signer_fetched_from_openbao(openbao: Any, fake: FuturesListenKeys, tmp_path: Path) -> None:
    from broker import get_signer

    openbao.kv_put("credbroker/listenkey", api_key=API_KEY, api_secret=SECRET)
    cfg = tmp_path / "credbroker.toml"
    cfg.write_text('[profiles.lk]\nsource = "vault"\npath = "secret/credbroker/listenkey"\n'
                   'env = { K = "api_key", S = "api_secret" }\n')
    audit = tmp_path / "audit.log"
    s = get_signer(profile="lk", config=str(cfg), env={**openbao.env(), "CREDBROKER_AUDIT_LOG": str(audit)})
    keeper = s.listen_key_keeper(fake.url)
    assert keeper.create() == fake.active[API_KEY]
    assert keeper.keepalive() == fake.active[API_KEY]
    events = [r["event"] for r in audit_records(audit)]
    assert events == ["secret_fetched", CREATED, KEPT_ALIVE]  # into the log get_signer opened


def test_relay_carries_the_keepers_events() -> None:
    from broker.relay import AuditRelay

    got: list[tuple[str, dict[str, Any]]] = []
    relay = AuditRelay(lambda e, f: got.append((e, f)), profile="um")
    try:
        for event in (CREATED, KEPT_ALIVE, RECREATED, FAILED):
            relay._handle(json.dumps({"event": event, "fields": {"profile": "other", "code": -1125}}).encode())
        relay._handle(b'{"event": "secret_fetched", "fields": {}}')
    finally:
        relay.close()
    assert [e for e, _ in got] == [CREATED, KEPT_ALIVE, RECREATED, FAILED] and relay.dropped == 1
    assert all(f["profile"] == "um" and f["claimed_profile"] == "other" for _, f in got)


@pytest.mark.vault
def test_a_bot_under_credbroker_run_keeps_its_key_and_the_broker_records_it(
        openbao: Any, fake: FuturesListenKeys, tmp_path: Path, run_broker: Any) -> None:
    """The child's keeper records reach the broker's log through the audit relay, stamped with the run's
    profile; `credbroker audit report` shows them beside the signature failures."""
    import sys

    from broker.audit import open_log

    openbao.kv_put("credbroker/lk-run", api_key=API_KEY, api_secret=SECRET)
    (tmp_path / "credbroker.toml").write_text(
        '[profiles.bot]\nsource = "vault"\npath = "secret/credbroker/lk-run"\n'
        'env = { BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }\n')
    bot = ("import sys\nfrom broker import get_signer\ns = get_signer()\n"
           f"k = s.listen_key_keeper({fake.url!r})\nfirst = k.create()\n"
           "new = s.report_stream_error({'e': 'error', 'm': 'Invalid listenKey'})\n"
           "print('same' if new == first else 'other')\n")
    res = run_broker(["run", "--profile", "bot", "--", sys.executable, "-c", bot], env=openbao.env())
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "same"  # the key was still active: Binance hands it back
    records = audit_records(Path(open_log(None).path))
    mine = [r["data"] for r in records if r["event"].startswith("listen_key_")]
    assert [r["event"] for r in records if r["event"].startswith("listen_key_")] == [CREATED, FAILED, RECREATED]
    assert all(d["profile"] == "bot" and isinstance(d["relayed_from"], int) for d in mine)
    from click.testing import CliRunner

    from broker.cli import cli

    out = CliRunner().invoke(cli, ["audit", "report", "--since", "1h"])
    assert out.exit_code == 0, out.output
    assert "LISTENKEY TROUBLE (user data streams): 1" in out.output
    assert "stream error Invalid listenKey (reported by the bot)" in out.output
