"""Audit-log test helpers shared by the unit and integration tests: a fresh writer, its lines and
records, a fixed audit key, a writer of records at chosen times (the weekly review's tests) and the
week it writes (``generate``), a keyed writer opened as `credbroker run` opens one (``keyed_log``), and
the records of the default log (``audit_records``)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import broker.audit.log as logmod
from broker.audit.log import AuditLog
from broker.audit.settings import AuditSettings, load_settings
from broker.secret import Secret

KEY_HEX = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
KEY = bytes.fromhex(KEY_HEX)

#: The review tests' "now" and the start of their week.
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)
SINCE = NOW - timedelta(days=7)


def make_log(path: Path, key: bytes | None = None, **kw: Any) -> AuditLog:
    """A fresh writer (not the open_log cache) on ``path``."""
    return AuditLog(AuditSettings(path=path, **kw), Secret(key) if key else None)


#: The key of the logs ``keyed_log`` opens (the gap and fleet tests').
KEYED_LOG_KEY = bytes(range(32))


def keyed_log(path: Path, key: bytes | None = KEYED_LOG_KEY, env: dict[str, str] | None = None,
              **audit: Any) -> AuditLog:
    """A fresh writer, as a new `credbroker run` process would open it."""
    settings = load_settings({"path": str(path), **audit}, {})
    return AuditLog(settings, Secret(key) if key is not None else None, env=env)


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


def generate(path: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    """Three quiet weeks of history, then a week with one of each anomaly."""
    w = Writer(path, mp)
    day0 = (NOW - timedelta(days=28)).replace(hour=0, minute=0)
    pid = 1000
    for d in range(21):  # baseline: every day, hourly 08:00-17:00 UTC, one bot host, one command, v3
        for hour in range(8, 18):
            pid += 1
            w.run(day0 + timedelta(days=d, hours=hour), ["python", "bot.py"], 3, pid=pid)
    start = SINCE.replace(hour=0, minute=0) + timedelta(days=1)
    for d in range(6):  # normal activity in the period
        for hour in (9, 13):
            pid += 1
            w.run(start + timedelta(days=d, hours=hour), ["python", "bot.py"], 3 if d < 3 else 4, pid=pid)
    # a bot started before the rotation and still running on v3
    w.run(start + timedelta(days=1, hours=10), ["python", "grid.py"], 3, pid=4242, exit_after=None)
    # the rotation
    w.at(start + timedelta(days=3, hours=8), "rotation_detected", profile="um-futures", old_version=3, new_version=4)
    # signature failures: two -1022 and one -2015, on day 4
    for minute, code, endpoint in ((5, -1022, "https://fapi.binance.com/fapi/v1/order"),
                                   (6, -1022, "https://fapi.binance.com/fapi/v1/order"),
                                   (7, -2015, "https://fapi.binance.com/fapi/v2/account")):
        w.at(start + timedelta(days=4, hours=14, minutes=minute), "signature_failure", profile="um-futures",
             code=code, endpoint=endpoint, status=401 if code == -2015 else 400, message="Signature for this "
             "request is not valid." if code == -1022 else "Invalid API-key, IP, or permissions for action.")
    # a command never seen before, at an unusual hour (03:00 UTC)
    w.run(start + timedelta(days=5, hours=3), ["python", "evil.py", "--dump"], 4, pid=6666)
    # a host never seen before (a laptop fetching the key)
    w.at(start + timedelta(days=5, hours=11), "secret_fetched", writer_host="laptop", profile="um-futures",
         source="vault", path="secret/credbroker/binance/um-futures", version=4, fields=["api_secret"])
    # a fail-closed refusal
    w.at(start + timedelta(days=2, hours=9), "refused", profile="spot", source="vault",
         error="VaultPermissionDenied", reason="permission denied reading secret/credbroker/binance/spot",
         command=["python", "spot.py"])
    # the signing agent refused a request by policy (issue 6)
    w.at(start + timedelta(days=4, hours=15), "policy_refused", profile="um-futures", rule="symbols")
    # high-rate events the report only counts
    for i in range(40):
        w.at(start + timedelta(days=4, hours=15, seconds=i), "sign", profile="um-futures")
    mp.undo()
    return {"start": start}


def audit_records() -> list[dict[str, Any]]:
    """Every record of the default audit log (``open_log(None)``), its rotated files included."""
    from broker.audit import open_log

    path = Path(open_log(None).path)
    out = []
    for p in sorted(path.parent.glob(path.name + "*")):
        if p.suffix in (".lock", ".head"):
            continue
        out += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return out
