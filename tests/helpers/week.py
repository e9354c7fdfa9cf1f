"""A review's week of records for the findings and review tests: three quiet weeks of one bot on the
hosts given, then whatever a test records (through the real audit writer), and its report."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from broker.audit.files import log_set
from broker.audit.model import Report
from broker.audit.report import build_report

from tests.helpers.auditlog import NOW, SINCE, Writer

PATH = "secret/credbroker/binance/um-futures"
ADDR = "https://vault-a:8200"


class Week(Writer):
    """Three quiet weeks of one bot on two hosts, then whatever a test records."""

    def history(self, hosts: tuple[str, ...] = ("bot-1",), days: int = 21, version: int = 3) -> None:
        day0 = (SINCE - timedelta(days=days)).replace(hour=0, minute=0)
        pid = 1000
        for d in range(days + 8):
            for host in hosts:
                pid += 1
                self.bot(day0 + timedelta(days=d, hours=9), host, pid, version)

    def bot(self, when: datetime, host: str, pid: int, version: int, profile: str = "um-futures") -> None:
        if when >= NOW:
            return
        self.at(when, "secret_fetched", host, profile=profile, source="vault", path=PATH, address=ADDR,
                version=version, fields=["api_key", "api_secret"])
        self.at(when, "secret_injected", host, profile=profile, version=version, source="vault", path=PATH,
                address=ADDR, command=["python", "bot.py"], pid=pid, user="trader", host=host)
        self.at(when + timedelta(minutes=30), "child_exited", host, profile=profile, pid=pid, status=0)

    def failure(self, when: datetime, host: str = "bot-1", code: int = -1022, profile: str = "um-futures",
                api_key: str = "...WXYZ") -> int:
        """A failure as the broker's relay records it: stamped with the run's profile, host and pid."""
        return self.at(when, "signature_failure", host, profile=profile, host=host, user="trader", code=code,
                       status=400 if code != -2015 else 401, endpoint="https://fapi.binance.com/fapi/v1/order",
                       message="Signature for this request is not valid.", api_key=api_key, relayed_from=4242)


def report(w: Week, **kw: Any) -> Report:
    w.mp.undo()
    path = w.log.path
    return build_report(log_set(Path(path)), since=SINCE, until=NOW, active=Path(path), **kw)
