"""Audit-log test helpers shared by the unit and integration tests: a fresh writer, its lines and
records, a fixed audit key, and a writer of records at chosen times (the weekly review's tests)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import broker.audit.log as logmod
from broker.audit.log import AuditLog
from broker.audit.settings import AuditSettings
from broker.secret import Secret

KEY_HEX = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
KEY = bytes.fromhex(KEY_HEX)

#: The review tests' "now" and the start of their week.
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)
SINCE = NOW - timedelta(days=7)


def make_log(path: Path, key: bytes | None = None, **kw: Any) -> AuditLog:
    """A fresh writer (not the open_log cache) on ``path``."""
    return AuditLog(AuditSettings(path=path, **kw), Secret(key) if key else None)


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines(path)]


class Writer:
    """Writes records with chosen timestamps and hosts, through the real writer."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log = make_log(path, rotate="size", max_size=10**9)
        self.mp = monkeypatch

    def at(self, when: datetime, event: str, writer_host: str = "bot-1", **data: Any) -> int:
        """Record one event at ``when``; its sequence number."""
        stamp = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.mp.setattr(logmod, "utc_timestamp", lambda now=None: stamp)
        self.log._host = writer_host  # the writer's own host: each bot host writes its own records in real life
        return int(self.log.record(event, data)["seq"])

    def run(self, when: datetime, command: list[str], version: int, host: str = "bot-1", pid: int = 100,
            profile: str = "um-futures", exit_after: timedelta | None = timedelta(minutes=30)) -> None:
        self.at(when, "secret_fetched", host, profile=profile, source="vault",
                path="secret/credbroker/binance/um-futures", version=version, fields=["api_key", "api_secret"])
        self.at(when, "secret_injected", host, profile=profile, version=version, command=command, pid=pid,
                user="trader", host=host, cwd="/srv/bot", variables=["BINANCE_API_KEY"])
        if exit_after is not None:
            self.at(when + exit_after, "child_exited", host, profile=profile, pid=pid, status=0, duration_s=1800.0)
