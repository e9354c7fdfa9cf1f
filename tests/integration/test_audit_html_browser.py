"""The HTML review in a real browser: headless Chromium loads it with no console error and no network
request, and the verdict is above the fold at 1280x800. The screenshot is kept as an artifact."""

from __future__ import annotations

import json
import os
import struct
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cli import cli

from tests.helpers.browser import HEIGHT, WIDTH, chromium_binary, visit
from tests.conftest import service_missing
from tests.helpers.week import Week
from tests.helpers.auditlog import NOW, SINCE, generate

EXPRESSIONS = {
    "summary": "JSON.stringify(document.getElementById('summary').getBoundingClientRect())",
    "verdict": "document.getElementById('verdict').innerText",
    "links": "JSON.stringify([...document.querySelectorAll('#summary a')].map(a => a.getAttribute('href')"
             ".slice(1)).filter(id => !document.getElementById(id)))",
    "resources": "JSON.stringify(performance.getEntriesByType('resource').map(e => e.name))",
    "scroll": "JSON.stringify([window.innerWidth, window.innerHeight])",
}


def _artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("CREDBROKER_TEST_ARTIFACTS") or tmp_path / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def chromium() -> str:
    found = chromium_binary()
    if found is None:
        service_missing("Chromium is not installed (Debian: apt-get install chromium)")
    assert found is not None
    return found


@pytest.mark.parametrize("week", ["anomalies", "findings"])
def test_the_html_review_in_headless_chromium(chromium: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             week: str) -> None:
    log = tmp_path / "audit.log"
    if week == "anomalies":
        generate(log, monkeypatch)
    else:
        w = Week(log, monkeypatch)
        w.history(hosts=("bot-1", "bot-2"))
        t = SINCE + timedelta(days=3, hours=8)
        w.at(t, "rotation_detected", "bot-1", profile="um-futures", old_version=3, new_version=4)
        for i in range(12):
            w.failure(t + timedelta(minutes=1, seconds=i), host="bot-2")
        monkeypatch.undo()
    page = tmp_path / "week.html"
    res = CliRunner().invoke(cli, ["audit", "report", "--since", SINCE.isoformat(), "--until", NOW.isoformat(),
                                   "--html", str(page)], env={"CREDBROKER_AUDIT_LOG": str(log)},
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    seen = visit(chromium, page, tmp_path / "chromium-profile", EXPRESSIONS)
    shot = _artifacts(tmp_path) / f"audit-report-{week}.png"
    shot.write_bytes(seen.screenshot)
    print(f"screenshot: {shot}")  # pytest -s shows where; CI keeps the folder named by CREDBROKER_TEST_ARTIFACTS

    assert seen.console_errors == []
    assert seen.requests and seen.network_requests == [], seen.requests
    assert json.loads(seen.evaluated["resources"]) == []  # not even a favicon or a font
    assert json.loads(seen.evaluated["scroll"]) == [WIDTH, HEIGHT]
    box = json.loads(seen.evaluated["summary"])
    assert 0 <= box["top"] and box["bottom"] <= HEIGHT, box  # the whole verdict above the fold
    assert "to look at" in seen.evaluated["verdict"]
    assert json.loads(seen.evaluated["links"]) == []  # every count links to a section that exists
    assert _png_size(seen.screenshot) == (WIDTH, HEIGHT)
