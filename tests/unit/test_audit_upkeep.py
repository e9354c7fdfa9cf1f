"""The weekly review's key upkeep: listenKey trouble beside the signature failures, a listenKey closed within
its life called out, and keys whose trading authority ends within 30 days (recorded through the real writer)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from broker.audit.advice import LISTEN_KEY_ADVICE
from broker.audit.html import render_html
from broker.audit.model import FindingKind
from broker.audit.report import render_text
from broker.cli import cli

from tests.helpers.week import Week, report
from tests.helpers.auditlog import NOW, SINCE

DAY_MS = 86_400_000
FAPI = "https://fapi.binance.com/fapi/v1/listenKey"


@pytest.fixture
def week(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Week:
    return Week(tmp_path / "audit.log", monkeypatch)


def lk(w: Week, when: Any, kind: str, **fields: Any) -> int:
    return w.at(when, f"listen_key_{kind}", "bot-1", profile=fields.pop("profile", "um-futures"), host="bot-1",
                endpoint=FAPI, api_key="********WXYZ", listen_key="********abcd", by="keeper", **fields)


def preflight(w: Week, when: Any, expires_ms: int | None, profile: str = "um-futures", key: str = "********WXYZ") -> None:
    restrictions: dict[str, Any] = {"ipRestrict": True, "enableWithdrawals": False, "enableMargin": False}
    if expires_ms is not None:
        restrictions["tradingAuthorityExpirationTime"] = expires_ms
    w.at(when, "preflight", "bot-1", profile=profile, url="https://api.binance.com/sapi/v1/account/apiRestrictions",
         mode="auto", overrides=[], outcome="passed", restrictions=restrictions, api_key=key)


def test_listen_key_trouble_is_shown_beside_the_signature_failures_with_advice(week: Week) -> None:
    week.history()
    t = SINCE + timedelta(days=2, hours=9)
    lk(week, t, "created")
    for i in range(1, 4):
        lk(week, t + timedelta(minutes=30 * i), "kept_alive")
    # expired: 3 hours without a keepalive (the host slept), then -1125 and a new key
    gone = lk(week, t + timedelta(hours=5), "failed", action="keepalive", source="exchange", status=400, code=-1125,
              message="This listenKey does not exist.")
    lk(week, t + timedelta(hours=5), "recreated", reason="-1125 This listenKey does not exist.")
    stream = lk(week, t + timedelta(hours=8), "failed", action="stream", source="stream", stream_event="error",
                message="Invalid listenKey")
    lk(week, t + timedelta(hours=9), "failed", action="keepalive", source="exchange", status=None, code=None,
       message="Connection refused")
    week.failure(t + timedelta(hours=10))
    r = report(week)
    block = r.to_dict()["key_upkeep"]["listen_keys"]
    assert block["failures_total"] == 3
    assert block["profiles"] == [{"profile": "um-futures", "created": 1, "kept_alive": 3, "recreated": 1,
                                  "failed": 3, "hosts": ["bot-1"]}]
    groups = {g["code"]: g for g in block["failures"]}
    assert set(groups) == {"-1125", "stream error", "no answer"}
    assert groups["-1125"]["seqs"] == [gone] and groups["stream error"]["seqs"] == [stream]
    assert groups["-1125"]["meaning"] == LISTEN_KEY_ADVICE["-1125"].meaning
    assert "someone else holds the API key" in groups["-1125"]["causes"][-1]["cause"]
    assert r.item("listen-key-failures").count == 3
    text = render_text(r)
    sig = text.index("SIGNATURE FAILURES: 1")
    lkt = text.index("LISTENKEY TROUBLE (user data streams): 3")
    assert sig < lkt < text.index("CHAIN:")  # right after the signature failures
    assert "-1125 This listenKey does not exist: the exchange no longer knows the listenKey" in text
    assert "stream error Invalid listenKey (reported by the bot)" in text
    assert "um-futures: 1 created, 3 kept alive, 1 recreated, 3 failed" in text
    # Five hours after the last keepalive: it expired, nothing to call out.
    assert FindingKind.LISTEN_KEY_CLOSED_EARLY not in {f.kind for f in r.findings}


def test_a_listen_key_gone_within_its_hour_is_a_finding(week: Week) -> None:
    week.history()
    t = SINCE + timedelta(days=3, hours=9)
    alive = lk(week, t, "kept_alive")
    gone = lk(week, t + timedelta(minutes=12), "failed", action="stream", source="stream", stream_event="error",
              message="Invalid listenKey")
    lk(week, t + timedelta(minutes=12), "recreated", reason="stream: Invalid listenKey")
    # a second profile whose key expired normally (70 minutes after its keepalive): no finding
    lk(week, t, "kept_alive", profile="spot-grid")
    lk(week, t + timedelta(minutes=70), "failed", profile="spot-grid", action="keepalive", source="exchange",
       status=400, code=-1125, message="This listenKey does not exist.")
    r = report(week)
    (finding,) = [f for f in r.findings if f.kind is FindingKind.LISTEN_KEY_CLOSED_EARLY]
    assert finding.profile == "um-futures" and finding.seqs == (alive, gone) and finding.count == 1
    assert "12 min after it was last created or kept alive" in finding.summary
    assert "key ...WXYZ" in finding.summary
    assert "someone else holds the key" in finding.advice
    assert "[listen_key_closed_early] um-futures" in render_text(r)


def test_keys_whose_trading_authority_ends_within_30_days_are_listed_per_profile_and_key(week: Week) -> None:
    week.history()
    end_ms = int(NOW.timestamp() * 1000)
    before = SINCE - timedelta(days=3)  # a state, not an event: a check before the period still counts
    preflight(week, before, end_ms + 10 * DAY_MS, profile="um-futures", key="********WXYZ")
    preflight(week, SINCE + timedelta(days=1), end_ms + 45 * DAY_MS, profile="spot-grid", key="********AAAA")
    preflight(week, SINCE + timedelta(days=1), end_ms - 2 * DAY_MS, profile="old-bot", key="********BBBB")
    preflight(week, SINCE + timedelta(days=1), None, profile="no-end", key="********CCCC")
    # renewed: the newest check of this key has a later date
    preflight(week, before, end_ms + 3 * DAY_MS, profile="renewed", key="********DDDD")
    preflight(week, SINCE + timedelta(days=2), end_ms + 300 * DAY_MS, profile="renewed", key="********DDDD")
    r = report(week)
    rows = r.to_dict()["key_upkeep"]["trading_authority"]["expiring"]
    assert [(x["profile"], x["api_key"], x["days_left"], x["expired"]) for x in rows] == [
        ("old-bot", "...BBBB", -2.0, True), ("um-futures", "...WXYZ", 10.0, False)]
    assert r.item("expiring-trading-authority").count == 2
    text = render_text(r)
    assert "TRADING AUTHORITY ENDING WITHIN 30 DAYS (from the key preflight): 2" in text
    assert "um-futures  key ...WXYZ  ends " in text and "(10 day(s) left)" in text and "(ENDED)" in text
    html = render_html(r)
    assert 'id="trading-authority"' in html and 'id="listen-keys"' in html and "...BBBB" in html


def test_fail_on_names_the_new_counts(week: Week) -> None:
    week.history()
    end_ms = int(NOW.timestamp() * 1000)
    preflight(week, SINCE + timedelta(days=1), end_ms + 5 * DAY_MS)
    week.mp.undo()
    env = {"CREDBROKER_AUDIT_LOG": str(week.log.path)}
    args = ["audit", "report", "--since", SINCE.isoformat(), "--until", NOW.isoformat(), "--json"]
    res = CliRunner().invoke(cli, [*args, "--fail-on", "listen-key-failures"], env=env)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, [*args, "--fail-on", "expiring-trading-authority"], env=env)
    assert res.exit_code == 1, res.output
    data, _ = json.JSONDecoder().raw_decode(res.output)
    assert data["key_upkeep"]["trading_authority"]["expiring"][0]["api_key"] == "...WXYZ"
