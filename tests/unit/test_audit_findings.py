"""The weekly review reads the signature failures: Binance's meaning and causes per row, and each
pattern called out as a finding that names its records (recorded through the real audit writer)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.audit.advice import ADVICE
from broker.audit.model import FindingKind, Report
from broker.audit.report import render_text
from broker.cli import cli

from tests.helpers.auditlog import NOW, SINCE
from tests.helpers.week import ADDR, PATH, Week, report


@pytest.fixture
def week(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Week:
    return Week(tmp_path / "audit.log", monkeypatch)


def kinds(r: Report) -> list[str]:
    return [f.kind.value for f in r.findings]


def test_every_failure_row_carries_binances_meaning_and_the_causes_to_check(week: Week) -> None:
    week.history()
    t = SINCE + timedelta(days=2, hours=10)
    for i, code in enumerate((-1021, -1022, -2014, -2015)):
        week.failure(t + timedelta(hours=i), code=code)
    week.at(t + timedelta(hours=5), "signature_failure", "bot-1", profile="um-futures", code=None, status=401,
            endpoint="https://fapi.binance.com/fapi/v2/account", message="HTTP 401")
    r = report(week)
    rows = {g["code"]: g for g in r.to_dict()["signature_failures"]["by_code"]}
    assert set(rows) == {"-1021", "-1022", "-2014", "-2015", "HTTP 401"}
    for label, row in rows.items():
        assert row["meaning"] == ADVICE[label].meaning and row["name"] == ADVICE[label].name
        assert row["causes"] and all(c["cause"] and c["check"] for c in row["causes"])
    assert rows["-1021"]["key_problem"] is False and "clock" in rows["-1021"]["causes"][0]["cause"]
    assert "rotated in Vault but the new one is not registered" in rows["-1022"]["causes"][0]["cause"]
    assert "PEM" in rows["-1022"]["causes"][1]["cause"]
    assert "IP allow-list" in rows["-2015"]["causes"][0]["cause"]
    text = render_text(r)
    assert "-1021 INVALID_TIMESTAMP" in text and "(not a key problem)" in text
    assert "check: `timedatectl`" in text
    for code in ("418", "429"):  # explained too, should a client record them
        assert ADVICE[f"HTTP {code}"].causes


def test_failures_right_after_a_rotation_are_called_out_first(week: Week) -> None:
    week.history()
    t = SINCE + timedelta(days=3, hours=8)
    rot = week.at(t, "rotation_detected", "bot-1", profile="um-futures", old_version=3, new_version=4,
                  source="vault", path=PATH, address=ADDR, action="restart")
    week.bot(t + timedelta(seconds=5), "bot-1", 7001, 4)
    seqs = [week.failure(t + timedelta(minutes=2, seconds=i)) for i in range(3)]
    r = report(week)
    first = r.findings[0]
    assert first.kind is FindingKind.FAILURES_AFTER_ROTATION and first.profile == "um-futures"
    assert first.seqs == (rot, *seqs) and first.count == 3
    assert "new secret may not be registered at the exchange" in first.advice
    assert "v3 -> v4" in first.summary
    as_json = r.to_dict()["findings"][0]
    assert as_json["kind"] == "failures_after_rotation" and as_json["seqs"] == [rot, *seqs]
    assert as_json["first"].startswith(t.strftime("%Y-%m-%dT%H:%M")) and as_json["last"] and as_json["advice"]


def test_failures_that_began_before_the_rotation_are_not_blamed_on_it(week: Week) -> None:
    week.history()
    t = SINCE + timedelta(days=3, hours=8)
    week.failure(t - timedelta(hours=2))
    week.at(t, "rotation_detected", "bot-1", profile="um-futures", old_version=3, new_version=4,
            source="vault", path=PATH, address=ADDR)
    week.failure(t + timedelta(minutes=2))
    assert "failures_after_rotation" not in kinds(report(week))


def test_a_rotation_seen_only_as_a_new_version_read_counts_too(week: Week) -> None:
    """An admin rotated and restarted the bot by hand: no rotation_detected, only a fetch of v4."""
    week.history()
    t = SINCE + timedelta(days=3, hours=8)
    week.bot(t, "bot-1", 7001, 4)
    seq = week.failure(t + timedelta(minutes=1))
    (finding,) = [f for f in report(week).findings if f.kind is FindingKind.FAILURES_AFTER_ROTATION]
    assert finding.seqs[-1] == seq and finding.seqs[0] < seq


def test_failures_on_one_host_of_several(week: Week) -> None:
    week.history(hosts=("bot-1", "bot-2"))
    t = SINCE + timedelta(days=2, hours=9, minutes=5)
    seqs = [week.failure(t + timedelta(minutes=i), host="bot-2", code=-2015) for i in range(2)]
    r = report(week)
    (finding,) = [f for f in r.findings if f.kind is FindingKind.FAILURES_ON_ONE_HOST]
    assert finding.host == "bot-2" and finding.seqs == tuple(seqs)
    assert "outbound IP may have changed" in finding.advice and "bot-1" in finding.summary


def test_failures_on_every_host_are_not_a_one_host_finding(week: Week) -> None:
    week.history(hosts=("bot-1", "bot-2"))
    t = SINCE + timedelta(days=2, hours=9, minutes=5)
    week.failure(t, host="bot-1")
    week.failure(t, host="bot-2")
    assert "failures_on_one_host" not in kinds(report(week))


def test_a_burst_over_n_per_minute(week: Week) -> None:
    week.history()
    t = SINCE + timedelta(days=4, hours=3)
    seqs = [week.failure(t + timedelta(seconds=4 * i)) for i in range(12)]
    slow = SINCE + timedelta(days=5)
    for i in range(10):  # ten in a minute is not more than ten
        week.failure(slow + timedelta(seconds=5 * i), profile="spot")
    r = report(week, burst=10)
    bursts = [f for f in r.findings if f.kind is FindingKind.FAILURE_BURST]
    assert [(f.profile, f.count) for f in bursts] == [("um-futures", 12)]
    assert bursts[0].seqs == tuple(seqs) and "more than 10 in a minute" in bursts[0].summary


def test_a_first_failure_on_a_key_that_had_none_for_weeks(week: Week) -> None:
    week.history()
    seq = week.failure(SINCE + timedelta(days=4, hours=9, minutes=10), api_key="...WXYZ")
    r = report(week)
    (finding,) = [f for f in r.findings if f.kind is FindingKind.FIRST_FAILURE_ON_KEY]
    assert finding.seqs == (seq,) and "WXYZ" in finding.summary


def test_no_first_failure_finding_without_weeks_of_history_or_after_recent_failures(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    young = Week(tmp_path / "young.log", monkeypatch)
    young.history(days=3)  # three days of use: too short to say "had none for weeks"
    young.failure(SINCE + timedelta(days=4, hours=9, minutes=10))
    assert "first_failure_on_key" not in kinds(report(young))
    noisy = Week(tmp_path / "noisy.log", monkeypatch)
    noisy.history()
    noisy.failure(SINCE - timedelta(days=5))  # it failed last week too
    noisy.failure(SINCE + timedelta(days=4, hours=9, minutes=10))
    assert "first_failure_on_key" not in kinds(report(noisy))


def test_findings_in_json_and_in_text(week: Week) -> None:
    week.history()
    t = SINCE + timedelta(days=3, hours=8)
    week.at(t, "rotation_detected", "bot-1", profile="um-futures", old_version=3, new_version=4,
            source="vault", path=PATH, address=ADDR)
    week.failure(t + timedelta(minutes=3))
    week.mp.undo()
    res = CliRunner().invoke(cli, ["audit", "report", "--json", "--since", SINCE.isoformat(), "--until",
                                   NOW.isoformat()], env={"CREDBROKER_AUDIT_LOG": str(week.log.path)},
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["findings"] and set(data["findings"][0]) >= {"kind", "profile", "first", "last", "seqs", "advice"}
    res = CliRunner().invoke(cli, ["audit", "report", "--since", SINCE.isoformat(), "--until", NOW.isoformat()],
                             env={"CREDBROKER_AUDIT_LOG": str(week.log.path)}, catch_exceptions=False)
    text = res.output
    assert text.index("SUMMARY") < text.index("FINDINGS") < text.index("SIGNATURE FAILURES")
    assert "1. [failures_after_rotation] um-futures:" in text and "records seq " in text
