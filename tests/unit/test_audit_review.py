"""broker.audit.review: the weekly report's inputs, computed by the library (the CLI only calls them)."""

from __future__ import annotations

import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from broker.audit import review
from broker.audit.model import FAIL_ON_NAMES
from broker.config import parse_dict
from broker.errors import AuditError, ConfigError

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)


def test_parse_since_takes_an_age_or_a_date() -> None:
    assert review.parse_since("7d", NOW) == NOW - timedelta(days=7)
    assert review.parse_since("12h", NOW) == NOW - timedelta(hours=12)
    assert review.parse_since("2026-11-17", NOW) == datetime(2026, 11, 17, tzinfo=timezone.utc)
    assert review.parse_since("2026-11-17T08:00:00Z", NOW) == datetime(2026, 11, 17, 8, tzinfo=timezone.utc)
    with pytest.raises(ConfigError, match="--since 'soon': not a duration or a date"):
        review.parse_since("soon", NOW)
    with pytest.raises(ConfigError, match="--since"):
        review.parse_since("\u00b2d", NOW)  # a digit to str.isdigit, not to int()


def test_fail_on_names() -> None:
    assert review.fail_on_names(None) == []
    assert review.fail_on_names("all") == list(FAIL_ON_NAMES)
    assert review.fail_on_names(f" {FAIL_ON_NAMES[0]} ,") == [FAIL_ON_NAMES[0]]
    with pytest.raises(ConfigError, match="unknown name 'nosuch'"):
        review.fail_on_names("nosuch")


def test_vault_paths_are_the_vault_profiles_paths() -> None:
    config = parse_dict({"profiles": {
        "a": {"source": "vault", "path": "secret/credbroker/a", "env": {"K": "api_key"}},
        "b": {"source": "keyring", "service": "credbroker/b", "env": {"K": "api_key"}},
    }})
    assert review.vault_paths(config) == ["secret/credbroker/a"]


def test_kv_versions_asks_nothing_without_a_vault_address() -> None:
    config = parse_dict({"profiles": {"a": {"source": "vault", "path": "secret/x/a", "env": {"K": "api_key"}}}})
    assert review.vault_settings({}) is None
    assert review.kv_versions(config, review.vault_settings({})) == {}


def test_write_html_is_the_owners_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("broker.audit.html.render_html", lambda report: "<html>page</html>")
    out = tmp_path / "week.html"
    review.write_html(object(), out)  # type: ignore[arg-type]
    assert out.read_text() == "<html>page</html>"
    assert stat.S_IMODE(out.stat().st_mode) == review.HTML_MODE == 0o600
    with pytest.raises(AuditError, match="cannot write"):
        review.write_html(object(), tmp_path / "no" / "such" / "dir.html")  # type: ignore[arg-type]
