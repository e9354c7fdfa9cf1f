"""The weekly review's typed model: what ``build_report`` returns and every renderer reads.

A ``Report`` holds the verdict (``summary``: one count per thing to look at,
each with the ``--fail-on`` name that makes cron fail on it), the
``findings`` (patterns called out with the records they rest on), the
signature failures by code with Binance's meaning and the likely causes, and
the detailed sections as plain data. ``to_dict()`` is the ``--json`` form:
its keys are stable, new ones are only ever added.

New kinds of finding are a new ``FindingKind`` member and a ``Finding``
built wherever the evidence is; renderers show every finding the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .advice import CodeAdvice


class FindingKind(StrEnum):
    """What a finding says; the value is the stable name in ``--json``."""

    FAILURES_AFTER_ROTATION = "failures_after_rotation"
    FAILURES_ON_ONE_HOST = "failures_on_one_host"
    FIRST_FAILURE_ON_KEY = "first_failure_on_key"
    FAILURE_BURST = "failure_burst"
    LISTEN_KEY_CLOSED_EARLY = "listen_key_closed_early"


#: The order findings are shown in: the likeliest to need action today first.
FINDING_ORDER: tuple[FindingKind, ...] = tuple(FindingKind)


@dataclass(frozen=True)
class Finding:
    """One pattern called out, with the audit records (sequence numbers) it rests on."""

    kind: FindingKind
    profile: str
    first: str  # time of the first record it rests on (UTC, the log's format)
    last: str
    seqs: tuple[int, ...]  # the records, in chain order (capped; ``count`` stays exact)
    count: int  # how many signature failures it covers
    summary: str  # what was seen, one line
    advice: str  # what to do, one line
    host: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "profile": self.profile, "first": self.first, "last": self.last,
                "seqs": list(self.seqs), "count": self.count, "summary": self.summary, "advice": self.advice,
                "host": self.host}


@dataclass(frozen=True)
class SummaryItem:
    """One line of the verdict: ``name`` is what ``--fail-on`` accepts; ``count`` None when unknown."""

    name: str
    label: str
    count: int | None
    anchor: str  # the HTML section it links to
    note: str  # e.g. "not enough history yet", "needs --vault-audit"

    @property
    def present(self) -> bool:
        return bool(self.count)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "count": self.count, "section": self.anchor,
                "note": self.note}


@dataclass(frozen=True)
class FailureGroup:
    """Signature failures with one code (or HTTP status), with Binance's meaning and what to check."""

    label: str
    advice: CodeAdvice
    count: int
    first: str
    last: str
    profiles: tuple[str, ...]
    hosts: tuple[str, ...]
    endpoints: tuple[str, ...]
    times: tuple[str, ...]
    seqs: tuple[int, ...]
    message: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.label, "name": self.advice.name, "meaning": self.advice.meaning,
                "reason": self.message or self.advice.meaning, "key_problem": self.advice.key_problem,
                "causes": [c._asdict() for c in self.advice.causes], "count": self.count, "first": self.first,
                "last": self.last, "profiles": list(self.profiles), "hosts": list(self.hosts),
                "endpoints": list(self.endpoints), "times": list(self.times), "seqs": list(self.seqs)}


@dataclass(frozen=True)
class Report:
    """The weekly review."""

    since: str
    until: str
    files: tuple[str, ...]
    records_in_period: int
    chain: Mapping[str, Any]
    summary: tuple[SummaryItem, ...]
    findings: tuple[Finding, ...]
    failures: tuple[FailureGroup, ...]
    failure_total: int
    sections: Mapping[str, Any] = field(default_factory=dict)  # the detailed sections, plain data

    def present(self, names: Iterable[str]) -> list[str]:
        """Which of the ``--fail-on`` names have something to show (in the summary's order)."""
        wanted = set(names)
        return [i.name for i in self.summary if i.name in wanted and i.present]

    def item(self, name: str) -> SummaryItem:
        return next(i for i in self.summary if i.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "period": {"since": self.since, "until": self.until},
            "summary": [i.to_dict() for i in self.summary],
            "findings": [f.to_dict() for f in self.findings],
            "signature_failures": {"total": self.failure_total, "by_code": [g.to_dict() for g in self.failures]},
            "chain": dict(self.chain),
            "files": list(self.files),
            **self.sections,
            "records_in_period": self.records_in_period,
        }


#: ``--fail-on`` names, in the order the summary shows them.
FAIL_ON_NAMES: tuple[str, ...] = (
    "broken", "gaps", "signature-failures", "findings", "unmatched-reads", "old-versions", "new-commands", "new-hosts",
    "unusual-hours", "refusals", "policy-refusals", "unrotated-keys", "listen-key-failures",
    "expiring-trading-authority",
)
