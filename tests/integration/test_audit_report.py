"""`credbroker audit report`: a generated log with known anomalies names each of them;
the HTML page is parsed and its chart checked against the data."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import broker.audit.log as logmod
from broker.audit.files import log_set
from broker.audit.html import CHART_H, SERIES, render_html
from broker.audit.model import Report
from broker.audit.report import build_report, render_text
from broker.cli import cli

from tests.helpers.auditlog import NOW, SINCE, Writer, generate, make_log


@pytest.fixture
def report_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "audit.log"
    generate(path, monkeypatch)
    return path


def _model(path: Path, **kw: Any) -> Report:
    return build_report(log_set(path), since=SINCE, until=NOW, active=path, **kw)


def _report(path: Path, **kw: Any) -> dict[str, Any]:
    return _model(path, **kw).to_dict()


def test_report_names_every_known_anomaly(report_log: Path) -> None:
    r = _report(report_log)
    assert r["chain"]["status"] == "intact"
    # signature failures first, by code, with times
    sf = r["signature_failures"]
    assert sf["total"] == 3
    by_code = {g["code"]: g for g in sf["by_code"]}
    assert by_code["-1022"]["count"] == 2 and by_code["-2015"]["count"] == 1
    assert len(by_code["-1022"]["times"]) == 2 and by_code["-1022"]["times"][0].endswith("14:05:00.000000Z")
    assert by_code["-2015"]["endpoints"] == ["https://fapi.binance.com/fapi/v2/account"]
    assert list(r)[:4] == ["period", "summary", "findings", "signature_failures"]
    # per profile
    um = next(p for p in r["profiles"] if p["profile"] == "um-futures")
    assert um["accesses"] == 6 * 2 + 1 + 1 + 1
    assert um["distinct_commands"] == 3 and um["distinct_hosts"] == 2 and um["distinct_users"] == 2
    assert um["versions"] == {"3": 3 * 2 + 1, "4": 3 * 2 + 1 + 1}
    assert um["latest_version"] == 4 and um["signature_failures"] == 3
    # the bot still on v3 after the rotation
    assert [(b["command"], b["version"], b["latest_version"], b["running"]) for b in r["stale_versions"]] == [
        ("python grid.py", 3, 4, True)
    ]
    assert r["rotations"]["items"][0]["new_version"] == 4
    # never seen before the period
    assert {i["command"] for i in r["new_commands"]["items"]} == {"python grid.py", "python evil.py --dump"}
    assert [i["host"] for i in r["new_hosts"]["items"]] == ["laptop"]
    # unusual hours: learned from the baseline (08-17), so 03:00 and nothing else
    assert {(i["hour"], i["command"]) for i in r["unusual_hours"]["items"]} == {(3, "python evil.py --dump"), (3, None)}
    # refusals
    assert [(g["profile"], g["error"], g["count"]) for g in r["refusals"]["groups"]] == [
        ("spot", "VaultPermissionDenied", 1)]
    # daily chart data covers the period, one entry per day
    assert len(r["daily"]) == 8 and sum(d["signature_failures"] for d in r["daily"]) == 3
    assert sum(d["other"] for d in r["daily"]) == 40


def test_configured_work_hours_override_the_learned_ones(report_log: Path) -> None:
    r = _report(report_log, work_hours=(10, 16))
    hours = {i["hour"] for i in r["unusual_hours"]["items"]}
    assert hours == {3, 9}  # the 09:00 runs are now outside 10-16 too
    assert "outside 10-16 UTC" in r["unusual_hours_rule"]


def test_text_report_reads_signature_failures_first(report_log: Path) -> None:
    text = render_text(_model(report_log))
    assert text.index("SIGNATURE FAILURES: 3") < text.index("PROFILES")
    for needle in ("-1022", "-2015", "python grid.py", "v3", "v4", "python evil.py --dump", "laptop",
                   "VaultPermissionDenied", "CHAIN: intact"):
        assert needle in text, needle


def test_a_broken_chain_shows_in_the_report(report_log: Path) -> None:
    report_log.write_bytes(report_log.read_bytes().replace(b'"pid":6666', b'"pid":6667', 1))
    model = _model(report_log)
    r = model.to_dict()
    assert r["chain"]["status"] == "broken" and r["chain"]["problem"]["kind"] == "edited"
    assert "CHAIN: BROKEN" in render_text(model)
    assert model.present(["broken"]) == ["broken"]


class _Page(HTMLParser):
    """Collects what a reviewer sees: section order, chart bars, tables, external references."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.days: list[dict[str, str]] = []
        self.bars: list[dict[str, str]] = []
        self.external: list[str] = []
        self.text: list[str] = []
        self.json_data = ""
        self._in_json = False
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(a.get("id", ""))
        if tag == "g" and a.get("class") == "day":
            self.days.append(a)
        if tag == "rect":
            self.bars.append(a)
        for k in ("src", "href", "action", "xlink:href"):
            if a.get(k):
                self.external.append(a[k])
        if tag in ("link", "iframe", "img", "object", "embed") or (tag == "script" and a.get("src")):
            self.external.append(tag)
        if tag == "script":
            self._in_json = a.get("type") == "application/json"

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_json = False

    def handle_data(self, data: str) -> None:
        if self._in_json:
            self.json_data += data
        else:
            self.text.append(data)


def test_html_report_is_self_contained_and_its_chart_matches_the_data(report_log: Path, tmp_path: Path) -> None:
    out = tmp_path / "week.html"
    res = CliRunner().invoke(cli, ["audit", "report", "--since", SINCE.isoformat(), "--until", NOW.isoformat(),
                                   "--html", str(out)], env={"CREDBROKER_AUDIT_LOG": str(report_log)},
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    page = _Page()
    page.feed(out.read_text())
    assert [e for e in page.external if not e.startswith("#")] == []
    assert "http://" not in out.read_text().split("<script")[0].replace("https://fapi.binance.com", "")
    # the verdict first, every count linking to a section of the page; then findings, then the failures
    assert page.sections[:3] == ["summary", "findings", "signature-failures"]
    assert {e[1:] for e in page.external} <= set(page.sections)
    seen = " ".join(page.text)
    assert "3 signature failure(s)" in seen and "-1022" in seen and "-2015" in seen
    # the chart: one group per day with the report's numbers, bars scaled to the busiest value
    data = json.loads(page.json_data)
    assert [d["data-date"] for d in page.days] == [d["date"] for d in data["daily"]]
    for g, d in zip(page.days, data["daily"]):
        assert int(g["data-accesses"]) == d["accesses"]
        assert int(g["data-signature-failures"]) == d["signature_failures"]
        assert int(g["data-refusals"]) == d["refusals"]
    # stacked: each segment is its share of the busiest day's total; the busiest day's bar is the full height
    totals = [sum(d[k] for k, _, _ in SERIES) for d in data["daily"]]
    peak = max(totals)
    for bar in page.bars:
        assert float(bar["height"]) == pytest.approx(CHART_H * int(bar["data-value"]) / peak, abs=0.01)
    for g, total in zip(page.days, totals):
        assert int(g["data-total"]) == total
    assert sum(float(b["height"]) for b in page.bars) == pytest.approx(CHART_H * sum(totals) / peak, abs=0.5)
    sig_bars = [b for b in page.bars if b["data-series"] == "signature_failures" and int(b["data-value"])]
    assert len(sig_bars) == 1 and int(sig_bars[0]["data-value"]) == 3
    assert "records per day" in seen and "day (UTC)" in seen  # labelled axes
    # the anomalies are on the page
    for needle in ("python grid.py", "python evil.py --dump", "laptop", "VaultPermissionDenied", "Intact",
                   "Signing policy refusals (1)", "symbols"):
        assert needle in seen, needle


def test_html_escapes_what_the_log_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.log"
    w = Writer(path, monkeypatch)
    w.run(NOW - timedelta(days=10), ["python", "bot.py"], 1)  # history, so new commands are listed
    w.run(NOW - timedelta(days=1), ["python", "<script>alert(1)</script>"], 1)
    monkeypatch.undo()
    html = render_html(_model(path))
    page = _Page()
    page.feed(html)
    assert "<script>alert(1)</script>" not in html
    assert page.tags.count("script") == 1  # only the JSON data block
    assert any("<script>alert(1)</script>" in t for t in page.text)  # shown as text


def test_cli_report_json_and_default_period(report_log: Path) -> None:
    res = CliRunner().invoke(cli, ["audit", "report", "--json", "--until", NOW.isoformat()],
                             env={"CREDBROKER_AUDIT_LOG": str(report_log)}, catch_exceptions=False)
    assert res.exit_code == 0
    r = json.loads(res.output)
    assert r["period"]["since"].startswith((NOW - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M"))
    assert r["signature_failures"]["total"] == 3


def test_report_streams_without_holding_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory stays flat as the log grows: measured with tracemalloc, not time."""
    import tracemalloc

    path = tmp_path / "audit.log"
    log = make_log(path, rotate="size", max_size=10**9)

    def peak_for(n: int) -> int:
        with log.batch():
            for i in range(n):
                log.record("sign", {"profile": "um-futures", "i": i}, durable=False)
        tracemalloc.start()
        build_report(log_set(path), since=NOW - timedelta(days=3650), until=datetime.now(timezone.utc) +
                     timedelta(days=1), active=path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    small = peak_for(2_000)
    large = peak_for(40_000)  # 21x the records
    assert path.stat().st_size > 5_000_000
    assert large < small * 2 + 1_000_000


@pytest.mark.parametrize("tamper", [False, True])
def test_parallel_and_single_pass_reports_agree(report_log: Path, tamper: bool) -> None:
    if tamper:  # the chain status travels back from the verifier process too
        report_log.write_bytes(report_log.read_bytes().replace(b'"code":-2015', b'"code":-2014', 1))
    one = _report(report_log, parallel=False)
    two = _report(report_log, parallel=True)
    assert one == two
    assert (one["chain"]["status"] == "broken") is tamper


def test_installed_cli_report(report_log: Path, run_broker) -> None:  # type: ignore[no-untyped-def]
    import os

    env = {**os.environ, "CREDBROKER_AUDIT_LOG": str(report_log)}
    res = run_broker(["audit", "report", "--json", "--since", SINCE.isoformat(), "--until", NOW.isoformat()],
                     env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["signature_failures"]["total"] == 3
    res = run_broker(["audit", "report", "--since", "yesterday-ish"], env=env)
    assert res.returncode == 125 and "--since" in res.stderr and res.stderr.count("\n") == 1


def test_an_empty_log_reports_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(b"")
    model = _model(path)
    r = model.to_dict()
    assert r["chain"]["status"] == "empty" and r["profiles"] == [] and r["signature_failures"]["total"] == 0
    assert "CHAIN: no records" in render_text(model)
    assert 'data-status="empty"' in render_html(model)
