"""The weekly review: one streaming pass over the whole log.

It opens with a verdict (one count per thing to look at: chain, signature
failures, findings, unmatched Vault reads, bots on old versions, new commands
and hosts, refusals, keys not rotated), then the findings (patterns in the
signature failures, each naming the records it rests on: ``findings.py``),
then the signature failures by code with Binance's meaning and the likely
causes (``advice.py``), then per profile and secret: accesses, distinct
commands, hosts and users, secret versions in use (bots still on an old
version at the end of the period), commands and hosts never seen before the
period, accesses at unusual hours, fail-closed refusals grouped by reason,
and daily activity for the chart.

Secrets are keyed by Vault address, namespace and path, not by profile name:
runs of one profile against two Vaults are two secrets with their own
versions.

Streaming: the log is read line by line (the verifier and the report share
the pass); only counters, small sets and capped lists are kept, so memory
does not grow with the number of records. High-rate events (``sign`` and
anything else the report has no section for) are only counted per day,
from the header, without a JSON parse.

Fields read from records (what other modules write; extra fields are ignored):

- ``secret_fetched``: profile, source, path, address, namespace, version
- ``secret_injected``: profile, version, source, path, address, namespace, command (argv list), pid, host, user
- ``child_exited``: profile, pid, status
- ``refused``: profile, error, reason, command
- ``signature_failure``: profile, code, endpoint, status, message, api_key (masked), host
- ``rotation_detected``: profile, old_version, new_version, path, address, namespace
- ``policy_refused``: profile, rule (the signing agent's policy)
- ``listen_key_*`` and ``preflight``: read by ``upkeep.py`` (its own section)
"""

from __future__ import annotations

import json
import re
import shlex
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

from ..events import Event
from ..errors import AuditError
from .advice import advice_for
from .findings import DEFAULT_BURST, FailureMark, RotationMark, find_all
from .model import FailureGroup, Report, SummaryItem
from .upkeep import EVENTS as UPKEEP_EVENTS
from .upkeep import UpkeepSection, summary_counts, text_lines
from .verify import Verifier

LIST_CAP = 200  # per list in the report; counts stay exact
#: Signature failures kept for the pattern checks (they are rare; a flood is counted, not kept).
FAILURE_CAP = 20000
DETAIL_EVENTS = frozenset(
    {Event.SECRET_FETCHED, Event.SECRET_INJECTED, Event.CHILD_EXITED, Event.REFUSED, Event.SIGNATURE_FAILURE,
     Event.ROTATION_DETECTED, Event.POLICY_REFUSED}
)
#: What ``ReportBuilder.feed`` reads in records from before the period (baseline, versions, the
#: Vault reads around it); a pass may leave out older records of other events (``fleet.py`` does).
BEFORE_PERIOD_EVENTS = DETAIL_EVENTS | {"secret_imported"} | UPKEEP_EVENTS  # the newest preflight counts
#: Learned "usual hours" need some history before an hour can be called unusual.
MIN_BASELINE_FOR_HOURS = 20
#: A key whose newest version is older than this is "not rotated" in the summary.
DEFAULT_ROTATE_DAYS = 90
NOT_ENOUGH_HISTORY = "not enough history yet"
#: The chart's series, bottom to top: (key in ``daily``, event).
CHART_EVENTS = (("accesses", Event.SECRET_FETCHED), ("injections", Event.SECRET_INJECTED),
                ("exits", Event.CHILD_EXITED), ("refusals", Event.REFUSED),
                ("signature_failures", Event.SIGNATURE_FAILURE), ("rotations", Event.ROTATION_DETECTED),
                ("policy_refusals", Event.POLICY_REFUSED))


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _command_text(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return shlex.join(value)
    if isinstance(value, str):
        return value
    return None


def _version(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def secret_label(address: str | None, namespace: str | None, path: str) -> str:
    """How a secret is shown: ``https://vault:8200 [ns] secret/credbroker/x``."""
    where = address or "?"
    if namespace:
        where += f" [{namespace}]"
    return f"{where} {path}"


@dataclass
class _Profile:
    accesses: int = 0
    injections: int = 0
    exits: int = 0
    failed_exits: int = 0
    refusals: int = 0
    signature_failures: int = 0
    commands: set[str] = field(default_factory=set)
    hosts: set[str] = field(default_factory=set)
    users: set[str] = field(default_factory=set)
    versions: Counter[int] = field(default_factory=Counter)


@dataclass
class _Baseline:
    commands: set[str] = field(default_factory=set)
    hosts: set[str] = field(default_factory=set)
    hours: Counter[int] = field(default_factory=Counter)


@dataclass
class _Bot:
    profile: str
    secret: str
    host: str
    command: str
    version: int | None
    started: str
    pid: int | None
    exited: str | None = None  # after the period (records inside it end the bot's entry)


@dataclass
class _Capped:
    items: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0

    def add(self, item: dict[str, Any]) -> None:
        self.total += 1
        if len(self.items) < LIST_CAP:
            self.items.append(item)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "items": self.items, "truncated": self.total > len(self.items)}


@dataclass
class _Group:
    count: int = 0
    first: str = ""
    last: str = ""
    profiles: set[str] = field(default_factory=set)
    hosts: set[str] = field(default_factory=set)
    endpoints: set[str] = field(default_factory=set)
    times: list[str] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    message: str | None = None


@dataclass
class ReportBuilder:
    """Consumes Entries in chain order; ``result()`` gives the typed ``Report``."""

    since: datetime
    until: datetime
    work_hours: tuple[int, int] | None = None
    burst: int = DEFAULT_BURST
    rotate_days: int = DEFAULT_ROTATE_DAYS

    def __post_init__(self) -> None:
        self._since = iso(self.since)
        self._until = iso(self.until)
        self.profiles: dict[tuple[str, str], _Profile] = {}  # (profile, secret) -> counters
        self.baseline: dict[str, _Baseline] = {}
        self.history_before = False  # any access recorded before the period
        self.first_record: str | None = None
        self.first_use: dict[str, str] = {}  # profile -> first access in the log
        self.latest: dict[str, tuple[int, str]] = {}  # secret -> (newest version, when first seen)
        self.kv_versions: dict[str, tuple[int, str]] = {}  # secret -> (current version, created_time) from Vault
        self.profile_secret: dict[str, str] = {}  # profile -> the secret it last read
        self.bots: dict[tuple[str, str, str], _Bot] = {}
        self.pids: dict[tuple[str, int], tuple[str, str, str]] = {}
        self.sigfail: dict[str, _Group] = {}
        self.sigfail_total = 0
        self.failure_marks: list[FailureMark] = []
        self.rotation_marks: list[RotationMark] = []
        self.period_hosts: dict[str, set[str]] = {}
        self.new_commands = _Capped()
        self.new_hosts = _Capped()
        self.unusual = _Capped()
        self.refusals: dict[tuple[str, str, str, str], dict[str, Any]] = {}  # (profile, secret, error, reason)
        self.refusal_total = 0
        self.refusal_items = _Capped()
        self.rotations = _Capped()
        self.policy_refused: dict[tuple[str, str], int] = {}  # (profile, rule) -> count; the signing agent's
        self._flagged: set[tuple[str, str, str]] = set()
        self.events: Counter[str] = Counter()
        self.records_in_period = 0
        self.daily: dict[str, Counter[str]] = {}
        day = self.since.astimezone(timezone.utc).date()
        last = self.until.astimezone(timezone.utc).date()
        while day <= last:
            self.daily[day.isoformat()] = Counter()
            day += timedelta(days=1)
        # (path, ts, version, Vault request_id or None) in/near the period
        self.vault_reads: list[tuple[str, str, int | None, str | None]] = []
        self.upkeep = UpkeepSection(since=self._since, until=self.until)

    # -- the pass -----------------------------------------------------------------------
    def feed(self, ts: str, event: str, line: bytes) -> None:
        """One record, in chain order."""
        if self.first_record is None:
            self.first_record = ts
        if ts > self._until:
            if event == Event.CHILD_EXITED:  # a bot on an old key that stopped after the period
                self._after_period_exit(ts, line)
            return
        in_period = ts >= self._since
        if in_period:
            self.records_in_period += 1
            self.events[event] += 1
            bucket = self.daily.get(ts[:10])
            if bucket is not None:
                bucket[event if event in DETAIL_EVENTS else "other"] += 1
        if event == Event.SECRET_IMPORTED:
            # Older logs: import's read-back was not a record of its own but a request id on this one (a
            # Vault read of ours). Today the read-back is a secret_fetched with by="import" (access.read).
            imported = _parse(line)
            if imported is not None:
                self._vault_read(ts, imported["data"], _version(imported["data"].get("version")),
                                 rid_key="read_back_request_id", path_key="read_back_path")
            return
        if event in UPKEEP_EVENTS:  # listenKeys and the preflight's expiry: their own section (upkeep.py)
            upkeep_rec = _parse(line)
            if upkeep_rec is not None:
                self.upkeep.feed(ts, event, upkeep_rec)
            return
        if event not in DETAIL_EVENTS:
            return
        rec = _parse(line)
        if rec is None:
            return
        data = rec["data"]
        profile = str(data.get("profile") or "(none)")
        host = str(data.get("host") or rec.get("host") or "?")
        user = str(data.get("user") or rec.get("user") or "?")
        seq = rec.get("seq") if isinstance(rec.get("seq"), int) else -1
        handler = getattr(self, "_on_" + event)
        handler(ts, in_period, profile, host, user, data, seq)

    def _after_period_exit(self, ts: str, line: bytes) -> None:
        rec = _parse(line)
        if rec is None:
            return
        pid = rec["data"].get("pid")
        host = str(rec.get("host") or "?")
        key = self.pids.get((host, pid)) if isinstance(pid, int) else None
        bot = self.bots.get(key) if key is not None else None
        if bot is not None and bot.pid == pid and bot.exited is None:
            bot.exited = ts

    def _secret(self, profile: str, data: Mapping[str, Any], remember: bool) -> str:
        """The secret a record is about: Vault address, namespace and path; the profile's last read otherwise."""
        path = _str(data.get("path"))
        if path is None:
            return self.profile_secret.get(profile, f"(profile {profile})")
        if data.get("source") not in (None, "vault"):
            label = f"{data.get('source')} {path}"
        else:
            label = secret_label(_str(data.get("address")), _str(data.get("namespace")), path)
        if remember:
            self.profile_secret[profile] = label
        return label

    def _profile(self, name: str, secret: str) -> _Profile:
        p = self.profiles.get((name, secret))
        if p is None:
            p = self.profiles[(name, secret)] = _Profile()
        return p

    def _base(self, name: str) -> _Baseline:
        b = self.baseline.get(name)
        if b is None:
            b = self.baseline[name] = _Baseline()
        return b

    def _see_version(self, profile: str, secret: str, version: int | None, ts: str, seq: int,
                     rotation: RotationMark | None = None) -> None:
        if version is None:
            return
        cur = self.latest.get(secret)
        if cur is None or version > cur[0]:
            self.latest[secret] = (version, ts)
            if cur is not None:
                self.rotation_marks.append(rotation or RotationMark(seq, ts, profile, cur[0], version))

    def _access(self, ts: str, in_period: bool, profile: str, host: str, user: str, command: str | None,
                secret: str) -> None:
        """Shared by fetch and inject: baseline before the period, novelty checks in it."""
        self.first_use.setdefault(profile, ts)
        base = self._base(profile)
        hour = int(ts[11:13])
        if not in_period:
            self.history_before = True
            base.hosts.add(host)
            if command:
                base.commands.add(command)
            base.hours[hour] += 1
            return
        p = self._profile(profile, secret)
        p.hosts.add(host)
        if command:  # a bot started there (a fetch alone may be a person's `check`)
            self.period_hosts.setdefault(profile, set()).add(host)
        p.users.add(user)
        if command:
            p.commands.add(command)
            key = (profile, "command", command)
            if command not in base.commands and key not in self._flagged:
                self._flagged.add(key)
                self.new_commands.add({"profile": profile, "command": command, "first_seen": ts, "host": host})
        key = (profile, "host", host)
        if host not in base.hosts and key not in self._flagged:
            self._flagged.add(key)
            self.new_hosts.add({"profile": profile, "host": host, "first_seen": ts, "user": user})
        if self._unusual_hour(base, hour):
            self.unusual.add({"profile": profile, "ts": ts, "hour": hour, "host": host, "user": user,
                              "command": command})

    def _unusual_hour(self, base: _Baseline, hour: int) -> bool:
        if self.work_hours is not None:
            start, end = self.work_hours
            inside = start <= hour < end if start < end else (hour >= start or hour < end)
            return not inside
        total = sum(base.hours.values())
        # Learned: unusual when neither this hour nor its neighbours saw an access before
        # the period (one hour of slack either side; bots drift).
        return total >= MIN_BASELINE_FOR_HOURS and not any(
            base.hours[(hour + d) % 24] for d in (-1, 0, 1)
        )

    def _on_secret_fetched(self, ts: str, in_period: bool, profile: str, host: str, user: str,
                           data: Mapping[str, Any], seq: int) -> None:
        version = _version(data.get("version"))
        secret = self._secret(profile, data, remember=True)
        self._see_version(profile, secret, version, ts, seq)
        if data.get("source") == "vault":
            self._vault_read(ts, data, version)
        if in_period:
            p = self._profile(profile, secret)
            p.accesses += 1
            if version is not None:
                p.versions[version] += 1
        # Library use (get_signer) fetches without injecting: count it as an access of its own.
        self._access(ts, in_period, profile, host, user, None, secret)

    def _on_secret_injected(self, ts: str, in_period: bool, profile: str, host: str, user: str,
                            data: Mapping[str, Any], seq: int) -> None:
        command = _command_text(data.get("command")) or "?"
        version = _version(data.get("version"))
        secret = self._secret(profile, data, remember=True)
        self._see_version(profile, secret, version, ts, seq)
        key = (secret, host, command)
        pid = data.get("pid") if isinstance(data.get("pid"), int) else None
        self.bots[key] = _Bot(profile, secret, host, command, version, ts, pid)
        if pid is not None:
            self.pids[(host, pid)] = key
        if in_period:
            self._profile(profile, secret).injections += 1
        self._access(ts, in_period, profile, host, user, command, secret)

    def _on_child_exited(self, ts: str, in_period: bool, profile: str, host: str, user: str,
                         data: Mapping[str, Any], seq: int) -> None:
        pid = data.get("pid")
        if isinstance(pid, int):
            key = self.pids.pop((host, pid), None)
            if key is not None and key in self.bots and self.bots[key].pid == pid:
                del self.bots[key]  # it stopped inside the period: not a bot still on an old key
        if in_period:
            p = self._profile(profile, self.profile_secret.get(profile, f"(profile {profile})"))
            p.exits += 1
            if data.get("status") not in (0, None):
                p.failed_exits += 1

    def _vault_read(self, ts: str, data: Mapping[str, Any], version: int | None,
                    rid_key: str = "request_id", path_key: str = "path") -> None:
        """A read of a secret that Vault's own audit log holds too (for the cross-check)."""
        rid, path = data.get(rid_key), data.get(path_key)
        if isinstance(path, str) and ts >= self._since:
            self.vault_reads.append((path, ts, version, rid if isinstance(rid, str) and rid else None))

    def _on_refused(self, ts: str, in_period: bool, profile: str, host: str, user: str,
                    data: Mapping[str, Any], seq: int) -> None:
        if isinstance(data.get("request_id"), str):  # refused after Vault answered the read
            self._vault_read(ts, data, _version(data.get("version")))
        if not in_period:
            return
        secret = self._secret(profile, data, remember=False)
        self._profile(profile, secret).refusals += 1
        self.refusal_total += 1
        self.refusal_items.add({"ts": ts, "profile": profile, "host": host, "user": user, "seq": seq,
                                "error": data.get("error"), "reason": data.get("reason"),
                                "command": _command_text(data.get("command"))})
        error = str(data.get("error") or "?")
        reason = " ".join(str(data.get("reason") or "").split())
        g = self.refusals.get((profile, secret, error, reason))
        if g is None:
            g = self.refusals[(profile, secret, error, reason)] = {
                "profile": profile, "secret": secret, "error": error, "reason": reason, "count": 0, "first": ts,
                "last": ts,
                "hosts": set(), "commands": set(), "seqs": []}
        g["count"] += 1
        g["last"] = ts
        g["hosts"].add(host)
        command = _command_text(data.get("command"))
        if command and len(g["commands"]) < 10:
            g["commands"].add(command)
        if len(g["seqs"]) < 50:
            g["seqs"].append(seq)

    def _on_signature_failure(self, ts: str, in_period: bool, profile: str, host: str, user: str,
                              data: Mapping[str, Any], seq: int) -> None:
        code = data.get("code")
        label = str(code) if code is not None else f"HTTP {data.get('status')}"
        if len(self.failure_marks) < FAILURE_CAP:
            key = data.get("api_key")
            self.failure_marks.append(FailureMark(seq, ts, profile, host,
                                                  key[-4:] if isinstance(key, str) else "", label))
        if not in_period:
            return
        self.sigfail_total += 1
        self._profile(profile, self.profile_secret.get(profile, f"(profile {profile})")).signature_failures += 1
        g = self.sigfail.get(label)
        if g is None:
            g = self.sigfail[label] = _Group(first=ts, last=ts,
                                               message=_str(data.get("reason")) or _str(data.get("message")))
        g.count += 1
        g.first = min(g.first, ts)
        g.last = max(g.last, ts)
        g.profiles.add(profile)
        g.hosts.add(host)
        if isinstance(data.get("endpoint"), str) and len(g.endpoints) < LIST_CAP:
            g.endpoints.add(data["endpoint"])
        if len(g.times) < LIST_CAP:
            g.times.append(ts)
            g.seqs.append(seq)

    def _on_policy_refused(self, ts: str, in_period: bool, profile: str, host: str, user: str,
                           data: Mapping[str, Any], seq: int) -> None:
        if in_period:
            key = (profile, str(data.get("rule") or "?"))
            self.policy_refused[key] = self.policy_refused.get(key, 0) + 1

    def _on_rotation_detected(self, ts: str, in_period: bool, profile: str, host: str, user: str,
                              data: Mapping[str, Any], seq: int) -> None:
        new = _version(data.get("new_version"))
        old = _version(data.get("old_version"))
        secret = self._secret(profile, data, remember=False)
        mark = RotationMark(seq, ts, profile, old, new)
        cur = self.latest.get(secret)
        if new is not None and (cur is None or new > cur[0]):
            self.latest[secret] = (new, ts)
            self.rotation_marks.append(mark)
        elif new is not None:
            # Under a restart policy the broker fetches the new version first, then records the
            # rotation: let the finding cite the rotation record rather than the fetch.
            for i in range(len(self.rotation_marks) - 1, max(len(self.rotation_marks) - 5, 0) - 1, -1):
                m = self.rotation_marks[i]
                if m.profile == profile and m.new_version == new:
                    self.rotation_marks[i] = mark
                    break
        if in_period:
            self.rotations.add({"ts": ts, "profile": profile, "host": host, "secret": secret, "seq": seq,
                                "old_version": old, "new_version": new})

    # -- the result ---------------------------------------------------------------------
    def stale_bots(self) -> list[dict[str, Any]]:
        """Bots still running at the end of the period on a version older than the newest of their secret."""
        out = []
        for bot in self.bots.values():
            latest = self.latest.get(bot.secret)
            if latest is None or bot.version is None or bot.version >= latest[0]:
                continue
            state = f"exited {bot.exited}" if bot.exited else "running"
            out.append({"profile": bot.profile, "secret": bot.secret, "host": bot.host, "command": bot.command,
                        "pid": bot.pid, "version": bot.version, "latest_version": latest[0],
                        "latest_seen": latest[1], "started": bot.started, "last_start": bot.started,
                        "running": bot.exited is None, "exited": bot.exited, "state": state})
        return sorted(out, key=lambda b: (b["profile"], b["secret"], b["host"], b["command"]))

    def unrotated(self) -> tuple[list[dict[str, Any]], bool]:
        """Secrets whose newest version is older than ``rotate_days`` at the end; (rows, known).

        From KV metadata where it was readable (its ``created_time``), else from
        the log (when the newest version was first read), which needs a log at
        least that old to say anything.
        """
        limit = self.until - timedelta(days=self.rotate_days)
        enough = self.first_record is not None and _parse_ts(self.first_record) <= limit
        rows = [{"secret": s, "version": v, "first_seen": created, "source": "vault metadata"}
                for s, (v, created) in sorted(self.kv_versions.items()) if _parse_ts(created) <= limit]
        rows += [{"secret": s, "version": v, "first_seen": seen, "source": "audit log"}
                 for s, (v, seen) in sorted(self.latest.items())
                 if s not in self.kv_versions and enough and _parse_ts(seen) <= limit]
        return rows, enough or bool(self.kv_versions)

    def _summary(self, chain: Mapping[str, Any], findings: int, stale: int, unrotated: int, unrotated_known: bool,
                 vault: Mapping[str, Any] | None) -> tuple[SummaryItem, ...]:
        history = "" if self.history_before else NOT_ENOUGH_HISTORY
        broken = 0 if chain.get("ok", True) else 1
        return (
            SummaryItem("broken", "audit chain not intact", broken, "chain", str(chain.get("status", ""))),
            SummaryItem("gaps", "audit log gaps (records lost: treat as tampering)", len(chain.get("gaps") or []),
                        "chain", ""),
            SummaryItem("signature-failures", "signature failures", self.sigfail_total, "signature-failures", ""),
            SummaryItem("findings", "findings (patterns in the failures)", findings, "findings", ""),
            SummaryItem("unmatched-reads", "Vault reads with no broker record",
                        int(vault["unmatched_total"]) if vault is not None else None, "vault-audit",
                        "" if vault is not None else "needs --vault-audit FILE"),
            SummaryItem("old-versions", "bots on an old secret version", stale, "stale-versions", ""),
            SummaryItem("new-commands", "new commands", self.new_commands.total if history == "" else None,
                        "new-commands", history),
            SummaryItem("new-hosts", "new hosts", self.new_hosts.total if history == "" else None, "new-hosts",
                        history),
            SummaryItem("unusual-hours", "accesses at unusual hours", self.unusual.total, "unusual-hours",
                        "" if self.work_hours or history == "" else NOT_ENOUGH_HISTORY),
            SummaryItem("refusals", "fail-closed refusals", self.refusal_total, "refusals", ""),
            SummaryItem("policy-refusals", "signing policy refusals", sum(self.policy_refused.values()),
                        "policy-refusals", ""),
            SummaryItem("unrotated-keys", f"keys not rotated in {self.rotate_days} days",
                        unrotated if unrotated_known else None, "unrotated",
                        "" if unrotated_known else NOT_ENOUGH_HISTORY),
        )

    @staticmethod
    def _upkeep_summary(block: Mapping[str, Any]) -> tuple[SummaryItem, ...]:
        counts = summary_counts(block)
        return (SummaryItem("listen-key-failures", "listenKey failures (user data streams)",
                            counts["listen-key-failures"], "listen-keys", ""),
                SummaryItem("expiring-trading-authority",
                            f"keys whose trading authority ends within {block['trading_authority']['days']} days",
                            counts["expiring-trading-authority"], "trading-authority", ""))

    def result(self, chain: Mapping[str, Any], vault: Mapping[str, Any] | None = None,
               files: Iterable[Path] = ()) -> Report:
        groups = tuple(
            FailureGroup(label=label, advice=advice_for(label), count=g.count, first=g.first, last=g.last,
                         profiles=tuple(sorted(g.profiles)), hosts=tuple(sorted(g.hosts)),
                         endpoints=tuple(sorted(g.endpoints)), times=tuple(g.times), seqs=tuple(g.seqs),
                         message=g.message)
            for label, g in sorted(self.sigfail.items(), key=lambda kv: (-kv[1].count, kv[0])))
        findings = find_all(self.failure_marks, self.rotation_marks, since=self._since, hosts=self.period_hosts,
                            first_use=self.first_use, burst=self.burst, listen_keys=self.upkeep.marks)
        profiles = []
        for (name, secret) in sorted(self.profiles):
            p = self.profiles[(name, secret)]
            latest = self.latest.get(secret)
            profiles.append({
                "profile": name, "secret": secret, "accesses": p.accesses, "injections": p.injections,
                "exits": p.exits, "failed_exits": p.failed_exits, "refusals": p.refusals,
                "signature_failures": p.signature_failures,
                "distinct_commands": len(p.commands), "distinct_hosts": len(p.hosts),
                "distinct_users": len(p.users),
                "commands": sorted(p.commands)[:LIST_CAP], "hosts": sorted(p.hosts)[:LIST_CAP],
                "users": sorted(p.users)[:LIST_CAP],
                "versions": {str(v): n for v, n in sorted(p.versions.items())},
                "latest_version": latest[0] if latest else None,
            })
        daily = [{"date": d, **{key: c[event] for key, event in CHART_EVENTS}, "other": c["other"]}
                 for d, c in self.daily.items()]
        refusal_groups = sorted(
            ({**g, "hosts": sorted(g["hosts"]), "commands": sorted(g["commands"])} for g in self.refusals.values()),
            key=lambda g: (-g["count"], g["profile"], g["error"], g["reason"]))
        stale = self.stale_bots()
        unrotated, unrotated_known = self.unrotated()
        history = "" if self.history_before else NOT_ENOUGH_HISTORY
        sections: dict[str, Any] = {
            "profiles": profiles,
            "stale_versions": stale,
            "rotations": self.rotations.to_dict(),
            "new_commands": {**self.new_commands.to_dict(), "note": history},
            "new_hosts": {**self.new_hosts.to_dict(), "note": history},
            "unusual_hours": {**self.unusual.to_dict(),
                              "note": "" if self.work_hours or history == "" else NOT_ENOUGH_HISTORY},
            "unusual_hours_rule": (f"outside {self.work_hours[0]:02d}-{self.work_hours[1]:02d} UTC"
                                   if self.work_hours else
                                   f"an hour (UTC), give or take one, with no access to the profile before "
                                   f"the period (needs {MIN_BASELINE_FOR_HOURS}+ earlier accesses)"),
            "refusals": {**self.refusal_items.to_dict(), "groups": refusal_groups},
            "policy_refusals": {"total": sum(self.policy_refused.values()),
                                "by_rule": [{"profile": p, "rule": rule, "count": n}
                                            for (p, rule), n in sorted(self.policy_refused.items())]},
            "unrotated": {"days": self.rotate_days, "items": unrotated,
                          "note": "" if unrotated_known else NOT_ENOUGH_HISTORY,
                          "source": "Vault's KV metadata (created_time of the current version) where readable, "
                                    "else the audit log (when the newest version was first read)"},
            "events": dict(sorted(self.events.items())),
            "daily": daily,
            "key_upkeep": self.upkeep.to_dict(),
        }
        if vault is not None:
            sections["vault_audit"] = dict(vault)
        return Report(
            since=self._since, until=self._until, files=tuple(str(f) for f in files),
            records_in_period=self.records_in_period, chain=dict(chain),
            summary=self._summary(chain, len(findings), len(stale), len(unrotated), unrotated_known, vault)
            + self._upkeep_summary(sections["key_upkeep"]),
            findings=findings, failures=groups, failure_total=self.sigfail_total, sections=sections)


#: ``json.loads`` without its per-call set-up (encoding detection, two whitespace regexes, three
#: Python frames): the report parses every detail record of 90 days, ~3 % of a busy log.
_scan_once: Callable[[str, int], tuple[Any, int]] = cast(Any, json.JSONDecoder()).scan_once  # (not in the stubs)


def _parse(line: bytes) -> dict[str, Any] | None:
    """The record as a dict with a dict ``data``, or None (the verifier reports bad lines).

    What ``json.loads(line)`` returns for the lines the verifier hands out (each starts with the
    header's ``{``, so no leading whitespace or byte-order mark), at a third of its fixed cost.
    """
    try:
        text = line.decode("utf-8", "surrogatepass")
        rec, end = _scan_once(text, 0)
    except (ValueError, StopIteration):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    if text[end:].strip(" \t\n\r"):  # json.loads: nothing but whitespace after the value
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("data"), dict):
        return None
    return rec


def _parse_ts(ts: str) -> datetime:
    """Our timestamps, or Vault's RFC 3339 ones (nanoseconds: cut to what datetime holds)."""
    head, dot, rest = ts.replace("Z", "+00:00").partition(".")
    if dot:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        rest = rest[:min(digits, 6)] + rest[digits:]
        if rest.startswith(("+", "-")):
            rest = "0" + rest
    return datetime.fromisoformat(head + dot + rest if dot else head)


_SCAN = re.compile(rb'\{"v":1,"seq":[0-9]{1,18},"ts":"([0-9]{4}-[0-9T:.-]{21}Z)","event":"([a-z][a-z0-9_]{0,63})"')
#: Below this much data, one pass in one process is quicker than starting a second one.
PARALLEL_MIN_BYTES = 16 * 1024 * 1024


def scan(paths: Iterable[Path]) -> Iterator[tuple[str, str, bytes]]:
    """(ts, event, line) of every record-looking line: the report's half of the work."""
    match = _SCAN.match
    for path in paths:
        with path.open("rb", buffering=1024 * 1024) as fh:
            for raw in fh:
                m = match(raw)
                if m is not None:
                    yield m.group(1).decode("ascii"), m.group(2).decode("ascii"), raw


def _verify_child(conn: Any, paths: list[Path], active: Path | None, key: bytes | None) -> None:
    from ..errors import BrokerError
    from .verify import make_verifier

    try:
        conn.send(("ok", make_verifier(active, paths, key).check(paths).to_dict()))
    except BrokerError as exc:
        conn.send(("error", exc.message, exc.remedy))
    except Exception as exc:  # noqa: BLE001 - reported in the parent as one line
        conn.send(("error", f"verifying the chain failed: {type(exc).__name__}", None))
    finally:
        conn.close()


def build_report(
    files: Iterable[Path],
    *,
    since: datetime,
    until: datetime,
    key: bytes | None = None,
    active: Path | None = None,
    work_hours: tuple[int, int] | None = None,
    vault_audit: Path | None = None,
    vault_paths: Iterable[str] = (),
    vault_token_hash: str | None = None,
    parallel: bool | None = None,
    burst: int = DEFAULT_BURST,
    rotate_days: int = DEFAULT_ROTATE_DAYS,
    kv_versions: Mapping[str, tuple[int, str]] | None = None,
) -> Report:
    """Verify the chain and build the report, streaming over ``files`` (chain order).

    On a large log (and where ``fork`` exists) the chain is verified in a child
    process while this one builds the report, so the two halves use two CPUs;
    otherwise both happen in one pass here. Same result either way.
    """
    from .verify import make_verifier

    paths = list(files)
    builder = ReportBuilder(since=since, until=until, work_hours=work_hours, burst=burst, rotate_days=rotate_days)
    builder.kv_versions = dict(kv_versions or {})
    feed = builder.feed
    if parallel is None:
        parallel = sum(p.stat().st_size for p in paths if p.exists()) >= PARALLEL_MIN_BYTES
    ctx = None
    if parallel:
        import multiprocessing

        try:
            ctx = multiprocessing.get_context("fork")
        except ValueError:
            ctx = None
    if ctx is not None:
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_verify_child, args=(child_conn, paths, active, key), daemon=True)
        proc.start()
        child_conn.close()
        try:
            for ts, event, line in scan(paths):
                feed(ts, event, line)
            try:
                answer = parent_conn.recv()
            except EOFError:
                answer = ("error", "the chain verifier process died", None)
        finally:
            parent_conn.close()
            proc.join()
        if answer[0] != "ok":
            raise AuditError(answer[1], answer[2] or "run `credbroker audit verify` for details")
        chain: dict[str, Any] = answer[1]
    else:
        verifier: Verifier = make_verifier(active, paths, key)
        for entry in verifier.walk(paths):
            feed(entry.header.ts, entry.header.event, entry.line)
        chain = verifier.result().to_dict()
    vault = None
    if vault_audit is not None:
        from .vaultcheck import cross_check

        known = set(vault_paths) | {read[0] for read in builder.vault_reads}
        vault = cross_check(vault_audit, builder.vault_reads, known, since=builder._since, until=builder._until,
                            token_hash=vault_token_hash)
    return builder.result(chain, vault, files=paths)


# -- text -------------------------------------------------------------------------------
def _table(rows: list[list[str]], headers: list[str]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = ["  " + fmt.format(*headers).rstrip(), "  " + "  ".join("-" * w for w in widths)]
    out += ["  " + fmt.format(*r).rstrip() for r in rows]
    return out


def _short(ts: str | None) -> str:
    return (ts or "")[:19].replace("T", " ")


def _clip(text: Any, n: int = 60) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def seq_list(seqs: Iterable[int], count: int | None = None) -> str:
    """``seq 12, 13, 15`` (+N more when capped)."""
    shown = list(seqs)
    text = ", ".join(str(s) for s in shown)
    more = f" (+{count - len(shown)} more)" if count is not None and count > len(shown) else ""
    return f"seq {text}{more}"


def summary_lines(report: Report) -> list[str]:
    """The verdict: one line per item, the ones to look at marked."""
    out = []
    for item in report.summary:
        if item.count is None:
            value, mark = "?", " "
        else:
            value, mark = str(item.count), "!" if item.count else " "
        note = f"  ({item.note})" if item.note else ""
        out.append(f"  {mark} {value:>5}  {item.label}{note}")
    return out


def _fleet_hosts(hosts: list[Mapping[str, Any]]) -> list[str]:
    """The fleet report's first table: one row per host (its own chain, its own counts)."""
    rows = [[h["host"], "intact" if h["ok"] else str(h["chain"]).upper(), str(h["records"]),
             str(h["records_in_period"]), str(h["signature_failures"]), str(h["findings"]), str(h["gaps"]),
             _anchors_cell(h)] for h in hosts]
    return [f"HOSTS: {len(hosts)} (each host's chain verified on its own)"] + _table(
        rows, ["host", "chain", "records", "in period", "sig.fail", "findings", "gaps", "anchors"])


def _anchors_cell(h: Mapping[str, Any]) -> str:
    if h.get("anchors_error"):
        return "NOT checked"
    return "-" if h.get("anchors_checked") is None else f"{h['anchors_checked']} matched"


def _fleet_chains(chain: Mapping[str, Any]) -> list[str]:
    """One chain line per host, then its gaps and notes, each naming the host."""
    if chain["broken_hosts"]:
        verdict = "NOT intact on " + ", ".join(chain["broken_hosts"])
    else:
        verdict = "intact on every host" if chain["ok"] else "intact, but some host's anchors were not checked"
    out = [f"CHAIN (per host): {verdict}"]
    for c in chain["hosts"]:
        p = c.get("problem")
        if p:
            out.append(f"  {c['host']}: {str(c['status']).upper()}: {p['file']}:{p['line']}: {p['kind']}: "
                       f"{p['message']}")
        else:
            out.append(f"  {c['host']}: intact, {c['records']} records, seq {c['first_seq']}..{c['last_seq']}"
                       if c["status"] != "empty" else f"  {c['host']}: no records")
        for g in c.get("gaps") or []:
            if g != p:
                out.append(f"  {c['host']}: gap: {g['file']}:{g['line']}: {g['message']}")
        for n in c.get("notes") or []:
            out.append(f"  {c['host']}: note: {n['file']}:{n['line']}: {n['message']}")
        if c.get("anchors_error"):
            out.append(f"  {c['host']}: anchors: NOT checked: {c['anchors_error']}")
    return out


def render_text(report: Report) -> str:
    """The readable form (the default output): the verdict first, then findings, then the detail."""
    r = report.to_dict()
    out: list[str] = []
    out.append(f"credbroker audit report: {_short(report.since)} .. {_short(report.until)} UTC, "
               f"{report.records_in_period} records in the period")
    fleet = bool(r.get("fleet"))  # logs of several hosts (``fleet.merge``): every row names its host
    hh = ["host"] if fleet else []

    def hc(row: Mapping[str, Any]) -> list[str]:
        return [str(row.get("host") or "?")] if fleet else []

    if fleet:
        out += _fleet_hosts(r["hosts"])
    else:
        out.append(f"read: {', '.join(report.files) or '(no file)'}")
    out.append("")
    out.append("SUMMARY (! = look at it; ? = not known)")
    out += summary_lines(report)

    out.append("")
    out.append(f"FINDINGS: {len(report.findings)}")
    for i, f in enumerate(report.findings, 1):
        out.append(f"  {i}. [{f.kind.value}] {f.host + ' ' if fleet and f.host else ''}{f.profile}: {f.summary}")
        out.append(f"     what to do: {f.advice}")
        out.append(f"     {_short(f.first)} .. {_short(f.last)} UTC, records {seq_list(f.seqs, None)}")

    out.append("")
    out.append(f"SIGNATURE FAILURES: {report.failure_total}"
               + ("  <-- review these first" if report.failure_total else ""))
    for g in report.failures:
        a = g.advice
        out.append(f"  {g.label} {a.name}: {a.meaning}" + ("" if a.key_problem else " (not a key problem)"))
        out.append(f"    {g.count} time(s), {_short(g.first)} .. {_short(g.last)} UTC; profiles "
                   f"{', '.join(g.profiles)}; hosts {', '.join(g.hosts)}")
        if g.endpoints:
            out.append(f"    endpoints: {_clip(', '.join(g.endpoints), 100)}")
        out.append(f"    records: {seq_list(g.seqs[:12], g.count)}")
        out.append("    likely causes, most likely first (check):")
        for n, c in enumerate(a.causes, 1):
            out.append(f"      {n}. {c.cause}")
            out.append(f"         check: {c.check}")

    out += text_lines(r["key_upkeep"], _short)

    chain = r["chain"]
    out.append("")
    if fleet:
        out += _fleet_chains(chain)
    elif chain["ok"]:
        note = f" ({len(chain['notes'])} note(s))" if chain["notes"] else ""
        out.append((f"CHAIN: intact, {chain['records']} records, seq {chain['first_seq']}..{chain['last_seq']}"
                    if chain["status"] != "empty" else "CHAIN: no records") + note)
    else:
        p = chain["problem"]
        out.append(f"CHAIN: {chain['status'].upper()}: {p['file']}:{p['line']}: {p['kind']}: {p['message']}")
    for n in chain["notes"] if not fleet else ():
        out.append(f"  note: {n['file']}:{n['line']}: {n['message']}")
    gaps = chain.get("gaps") or [] if not fleet else []
    if gaps:
        out.append(f"AUDIT LOG GAPS (records lost: treat as tampering): {len(gaps)}")
        for g in gaps:
            out.append(f"  {g['file']}:{g['line']}: {g['message']}")

    out.append("")
    out.append("PROFILES (per secret: Vault address [namespace] path)")
    rows = [[*hc(p), p["profile"], _clip(p["secret"], 60), str(p["accesses"]), str(p["injections"]),
             str(p["distinct_commands"]), str(p["distinct_hosts"]), str(p["distinct_users"]),
             " ".join(f"v{v}:{n}" for v, n in p["versions"].items()) or "-",
             str(p["refusals"]), str(p["signature_failures"])] for p in r["profiles"]]
    out += _table(rows, [*hh, "profile", "secret", "accesses", "runs", "commands", "hosts", "users", "versions",
                         "refused", "sig.fail"]) if rows else ["  (no access in the period)"]

    def section(title: str, block: Mapping[str, Any], cols: list[str], row: Any) -> None:
        out.append("")
        note = block.get("note")
        if note:
            out.append(f"{title}: {note}")
            return
        out.append(f"{title}: {block['total']}")
        if block["items"]:
            out.extend(_table([row(i) for i in block["items"]], cols))
            if block["truncated"]:
                out.append(f"  ... {block['total'] - len(block['items'])} more (see --json)")

    stale = r["stale_versions"]
    out.append("")
    out.append(f"BOTS ON AN OLD SECRET VERSION (at the end of the period): {len(stale)}")
    if stale:
        out += _table([[b["profile"], b["host"], str(b["pid"]), _clip(b["command"], 40), f"v{b['version']}",
                        f"v{b['latest_version']}", _short(b["started"]),
                        "running" if b["running"] else f"exited {_short(b['exited'])}"]
                       for b in stale], ["profile", "host", "pid", "command", "uses", "latest", "since", "state"])
    section("ROTATIONS", r["rotations"], ["when", *hh, "profile", "old", "new", "seq"],
            lambda i: [_short(i["ts"]), *hc(i), i["profile"], str(i["old_version"]), str(i["new_version"]), str(i["seq"])])
    section("NEW COMMANDS (never seen before the period)", r["new_commands"], ["first seen", "profile", "host",
                                                                               "command"],
            lambda i: [_short(i["first_seen"]), i["profile"], i["host"], _clip(i["command"], 50)])
    section("NEW HOSTS (never seen before the period)", r["new_hosts"], ["first seen", "profile", "host", "user"],
            lambda i: [_short(i["first_seen"]), i["profile"], i["host"], i["user"]])
    section(f"UNUSUAL HOURS ({r['unusual_hours_rule']})", r["unusual_hours"], ["when", "profile", "host", "command"],
            lambda i: [_short(i["ts"]), i["profile"], i["host"], _clip(i.get("command") or "(fetch)", 50)])
    ref = r["refusals"]
    out.append("")
    out.append(f"FAIL-CLOSED REFUSALS (by profile and reason): {ref['total']}")
    if ref["groups"]:
        out += _table([[*hc(g), g["profile"], _clip(g["secret"], 50), str(g["count"]), g["error"],
                        _clip(g["reason"], 60), _short(g["last"])] for g in ref["groups"]],
                      [*hh, "profile", "secret", "count", "error", "reason", "last"])
    pr = r["policy_refusals"]
    out.append("")
    out.append(f"SIGNING POLICY REFUSALS: {pr['total']}")
    if pr["by_rule"]:
        out += _table([[*hc(i), i["profile"], i["rule"], str(i["count"])] for i in pr["by_rule"]],
                      [*hh, "profile", "rule", "count"])
    un = r["unrotated"]
    out.append("")
    if un["note"]:
        out.append(f"KEYS NOT ROTATED IN {un['days']} DAYS: {un['note']}")
    else:
        out.append(f"KEYS NOT ROTATED IN {un['days']} DAYS: {len(un['items'])}")
        if un["items"]:
            out += _table([[*hc(i), i["secret"], f"v{i['version']}", _short(i["first_seen"]), i["source"]]
                           for i in un["items"]], [*hh, "secret", "newest", "since", "from"])
    vault = r.get("vault_audit")
    if vault is not None:
        out.append("")
        out.append(f"VAULT AUDIT CROSS-CHECK ({vault['file']}): {vault['vault_reads']} reads of bot secrets, "
                   f"{vault['unmatched_total']} with no broker record")
        if vault["unmatched"]:
            out += _table([[_short(u["time"]), u["path"], str(u.get("version")), u.get("remote_address") or "?",
                            u.get("display_name") or "?", u.get("token") or "?"] for u in vault["unmatched"]],
                          ["when", "path", "version", "from", "who", "token"])
        if vault.get("note"):
            out.append(f"  note: {vault['note']}")
    out.append("")
    out.append("DAILY ACTIVITY (accesses | runs | signature failures | refusals | rotations)")
    peak = max([d["accesses"] for d in r["daily"]] + [1])
    for d in r["daily"]:
        bar = "#" * round(20 * d["accesses"] / peak)
        out.append(f"  {d['date']}  {d['accesses']:>7} {bar:<20} | {d['injections']:>5} | "
                   f"{d['signature_failures']:>5} | "
                   f"{d['refusals']:>5} | {d['rotations']:>3}")
    from .show import printable

    return printable("\n".join(out) + "\n")
