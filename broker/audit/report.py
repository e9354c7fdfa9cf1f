"""The weekly review: one streaming pass over the whole log (issue 3, item 4).

Signature failures come first (a leaked key, or someone trying to use one,
shows up there before anywhere else), then per profile: accesses, distinct
commands, hosts and users, secret versions in use (bots still on an old
version after a rotation are flagged), commands and hosts never seen before
the period, accesses at unusual hours, fail-closed refusals, the chain's
status, and daily activity for the chart.

Streaming: the log is read line by line (the verifier and the report share
the pass); only counters, small sets and capped lists are kept, so memory
does not grow with the number of records. High-rate events (``sign`` and
anything else the report has no section for) are only counted per day,
from the header, without a JSON parse.

Fields read from records (what other modules write; extra fields are ignored):

- ``secret_fetched``: profile, source, path, version
- ``secret_injected``: profile, version, command (argv list), pid, host, user
- ``child_exited``: profile, pid, status
- ``refused``: profile, error, reason, command
- ``signature_failure``: profile, code, endpoint, status, message
- ``rotation_detected``: profile, old_version, new_version
- ``policy_refused``: profile, rule (the signing agent's policy, issue 6)
"""

from __future__ import annotations

import json
import re
import shlex
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ..errors import AuditError
from .verify import Verifier

LIST_CAP = 200  # per list in the report; counts stay exact
DETAIL_EVENTS = frozenset(
    {"secret_fetched", "secret_injected", "child_exited", "refused", "signature_failure", "rotation_detected",
     "policy_refused"}
)
#: Learned "usual hours" need some history before an hour can be called unusual.
MIN_BASELINE_FOR_HOURS = 20


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
    host: str
    command: str
    version: int | None
    last_start: str
    pid: int | None
    running: bool = True


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
class ReportBuilder:
    """Consumes Entries in chain order; ``result()`` gives the report as plain data."""

    since: datetime
    until: datetime
    work_hours: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self._since = iso(self.since)
        self._until = iso(self.until)
        self.profiles: dict[str, _Profile] = {}
        self.baseline: dict[str, _Baseline] = {}
        self.latest: dict[str, tuple[int, str]] = {}  # profile -> (version, first seen)
        self.bots: dict[tuple[str, str, str], _Bot] = {}
        self.pids: dict[tuple[str, int], tuple[str, str, str]] = {}
        self.sigfail: dict[str, dict[str, Any]] = {}
        self.sigfail_total = 0
        self.new_commands = _Capped()
        self.new_hosts = _Capped()
        self.unusual = _Capped()
        self.refusals = _Capped()
        self.rotations = _Capped()
        self.policy_refused: dict[tuple[str, str], int] = {}  # (profile, rule) -> count; signing agent (issue 6)
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

    # -- the pass -----------------------------------------------------------------------
    def feed(self, ts: str, event: str, line: bytes) -> None:
        """One record, in chain order."""
        if ts > self._until:
            return
        in_period = ts >= self._since
        if in_period:
            self.records_in_period += 1
            self.events[event] += 1
            bucket = self.daily.get(ts[:10])
            if bucket is not None:
                bucket[event if event in DETAIL_EVENTS else "other"] += 1
        if event not in DETAIL_EVENTS:
            return
        try:
            rec = json.loads(line)
        except ValueError:
            return  # the verifier reports the line; the report cannot use it
        if not isinstance(rec, dict):
            return
        data = rec.get("data")
        if not isinstance(data, dict):
            return
        profile = str(data.get("profile") or "(none)")
        host = str(data.get("host") or rec.get("host") or "?")
        user = str(data.get("user") or rec.get("user") or "?")
        handler = getattr(self, "_on_" + event)
        handler(ts, in_period, profile, host, user, data)

    def _profile(self, name: str) -> _Profile:
        p = self.profiles.get(name)
        if p is None:
            p = self.profiles[name] = _Profile()
        return p

    def _base(self, name: str) -> _Baseline:
        b = self.baseline.get(name)
        if b is None:
            b = self.baseline[name] = _Baseline()
        return b

    def _see_version(self, profile: str, version: int | None, ts: str) -> None:
        if version is None:
            return
        cur = self.latest.get(profile)
        if cur is None or version > cur[0]:
            self.latest[profile] = (version, ts)

    def _access(self, ts: str, in_period: bool, profile: str, host: str, user: str, command: str | None) -> None:
        """Shared by fetch and inject: baseline before the period, novelty checks in it."""
        base = self._base(profile)
        hour = int(ts[11:13])
        if not in_period:
            base.hosts.add(host)
            if command:
                base.commands.add(command)
            base.hours[hour] += 1
            return
        p = self._profile(profile)
        p.hosts.add(host)
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
                           data: Mapping[str, Any]) -> None:
        version = _version(data.get("version"))
        self._see_version(profile, version, ts)
        if data.get("source") == "vault" and isinstance(data.get("path"), str) and ts >= self._since:
            rid = data.get("request_id")
            self.vault_reads.append((str(data["path"]), ts, version, rid if isinstance(rid, str) and rid else None))
        if in_period:
            p = self._profile(profile)
            p.accesses += 1
            if version is not None:
                p.versions[version] += 1
        # Library use (get_signer) fetches without injecting: count it as an access of its own.
        self._access(ts, in_period, profile, host, user, None)

    def _on_secret_injected(self, ts: str, in_period: bool, profile: str, host: str, user: str,
                            data: Mapping[str, Any]) -> None:
        command = _command_text(data.get("command")) or "?"
        version = _version(data.get("version"))
        self._see_version(profile, version, ts)
        key = (profile, host, command)
        pid = data.get("pid") if isinstance(data.get("pid"), int) else None
        self.bots[key] = _Bot(profile, host, command, version, ts, pid)
        if pid is not None:
            self.pids[(host, pid)] = key
        if in_period:
            self._profile(profile).injections += 1
        self._access(ts, in_period, profile, host, user, command)

    def _on_child_exited(self, ts: str, in_period: bool, profile: str, host: str, user: str,
                         data: Mapping[str, Any]) -> None:
        pid = data.get("pid")
        if isinstance(pid, int):
            key = self.pids.pop((host, pid), None)
            if key is not None and key in self.bots and self.bots[key].pid == pid:
                self.bots[key].running = False
        if in_period:
            p = self._profile(profile)
            p.exits += 1
            if data.get("status") not in (0, None):
                p.failed_exits += 1

    def _on_refused(self, ts: str, in_period: bool, profile: str, host: str, user: str,
                    data: Mapping[str, Any]) -> None:
        if not in_period:
            return
        self._profile(profile).refusals += 1
        self.refusals.add({"ts": ts, "profile": profile, "host": host, "user": user,
                           "error": data.get("error"), "reason": data.get("reason"),
                           "command": _command_text(data.get("command"))})

    def _on_signature_failure(self, ts: str, in_period: bool, profile: str, host: str, user: str,
                              data: Mapping[str, Any]) -> None:
        if not in_period:
            return
        self.sigfail_total += 1
        self._profile(profile).signature_failures += 1
        code = data.get("code")
        label = str(code) if code is not None else f"HTTP {data.get('status')}"
        g = self.sigfail.get(label)
        if g is None:
            g = self.sigfail[label] = {"code": label, "reason": data.get("reason"), "count": 0, "first": ts,
                                       "last": ts, "profiles": set(), "endpoints": set(), "hosts": set(),
                                       "times": []}
        g["count"] += 1
        g["first"] = min(g["first"], ts)
        g["last"] = max(g["last"], ts)
        g["profiles"].add(profile)
        g["hosts"].add(host)
        if isinstance(data.get("endpoint"), str) and len(g["endpoints"]) < LIST_CAP:
            g["endpoints"].add(data["endpoint"])
        if len(g["times"]) < LIST_CAP:
            g["times"].append(ts)

    def _on_policy_refused(self, ts: str, in_period: bool, profile: str, host: str, user: str,
                           data: Mapping[str, Any]) -> None:
        if in_period:
            key = (profile, str(data.get("rule") or "?"))
            self.policy_refused[key] = self.policy_refused.get(key, 0) + 1

    def _on_rotation_detected(self, ts: str, in_period: bool, profile: str, host: str, user: str,
                              data: Mapping[str, Any]) -> None:
        new = _version(data.get("new_version"))
        self._see_version(profile, new, ts)
        if in_period:
            self.rotations.add({"ts": ts, "profile": profile, "host": host,
                                "old_version": _version(data.get("old_version")), "new_version": new})

    # -- the result ---------------------------------------------------------------------
    def stale_bots(self) -> list[dict[str, Any]]:
        """Bots started in the period or still running, on a version older than the newest seen."""
        out = []
        for bot in self.bots.values():
            latest = self.latest.get(bot.profile)
            if latest is None or bot.version is None or bot.version >= latest[0]:
                continue
            if not (bot.running or bot.last_start >= self._since):
                continue
            out.append({"profile": bot.profile, "host": bot.host, "command": bot.command,
                        "version": bot.version, "latest_version": latest[0], "latest_seen": latest[1],
                        "last_start": bot.last_start, "running": bot.running})
        return sorted(out, key=lambda b: (b["profile"], b["host"], b["command"]))

    def result(self, chain: Mapping[str, Any], vault: Mapping[str, Any] | None = None) -> dict[str, Any]:
        groups = []
        for g in sorted(self.sigfail.values(), key=lambda g: (-g["count"], g["code"])):
            groups.append({**g, "profiles": sorted(g["profiles"]), "endpoints": sorted(g["endpoints"]),
                           "hosts": sorted(g["hosts"])})
        profiles = []
        for name in sorted(self.profiles):
            p = self.profiles[name]
            latest = self.latest.get(name)
            profiles.append({
                "profile": name, "accesses": p.accesses, "injections": p.injections, "exits": p.exits,
                "failed_exits": p.failed_exits, "refusals": p.refusals,
                "signature_failures": p.signature_failures,
                "distinct_commands": len(p.commands), "distinct_hosts": len(p.hosts),
                "distinct_users": len(p.users),
                "commands": sorted(p.commands)[:LIST_CAP], "hosts": sorted(p.hosts)[:LIST_CAP],
                "users": sorted(p.users)[:LIST_CAP],
                "versions": {str(v): n for v, n in sorted(p.versions.items())},
                "latest_version": latest[0] if latest else None,
            })
        daily = [{"date": d, "accesses": c["secret_fetched"], "injections": c["secret_injected"],
                  "exits": c["child_exited"], "refusals": c["refused"],
                  "signature_failures": c["signature_failure"], "rotations": c["rotation_detected"],
                  "other": c["other"]} for d, c in self.daily.items()]
        report: dict[str, Any] = {
            "period": {"since": self._since, "until": self._until},
            "signature_failures": {"total": self.sigfail_total, "by_code": groups},
            "chain": dict(chain),
            "profiles": profiles,
            "stale_versions": self.stale_bots(),
            "rotations": self.rotations.to_dict(),
            "new_commands": self.new_commands.to_dict(),
            "new_hosts": self.new_hosts.to_dict(),
            "unusual_hours": self.unusual.to_dict(),
            "unusual_hours_rule": (f"outside {self.work_hours[0]:02d}-{self.work_hours[1]:02d} UTC"
                                   if self.work_hours else
                                   f"an hour (UTC), give or take one, with no access to the profile before "
                                   f"the period (needs {MIN_BASELINE_FOR_HOURS}+ earlier accesses)"),
            "refusals": self.refusals.to_dict(),
            "policy_refusals": {"total": sum(self.policy_refused.values()),
                                "by_rule": [{"profile": p, "rule": rule, "count": n}
                                            for (p, rule), n in sorted(self.policy_refused.items())]},
            "events": dict(sorted(self.events.items())),
            "records_in_period": self.records_in_period,
            "daily": daily,
        }
        if vault is not None:
            report["vault_audit"] = dict(vault)
        return report


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
) -> dict[str, Any]:
    """Verify the chain and build the report, streaming over ``files`` (chain order).

    On a large log (and where ``fork`` exists) the chain is verified in a child
    process while this one builds the report, so the two halves use two CPUs;
    otherwise both happen in one pass here. Same result either way.
    """
    from .verify import make_verifier

    paths = list(files)
    builder = ReportBuilder(since=since, until=until, work_hours=work_hours)
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
    return builder.result(chain, vault)


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


def render_text(r: Mapping[str, Any]) -> str:
    """The readable table form (the default output)."""
    out: list[str] = []
    period = r["period"]
    out.append(f"credbroker audit report: {_short(period['since'])} .. {_short(period['until'])} UTC, "
               f"{r['records_in_period']} records")
    chain = r["chain"]
    if chain["ok"]:
        note = f" ({len(chain['notes'])} note(s))" if chain["notes"] else ""
        out.append(f"chain: intact, {chain['records']} records, seq {chain['first_seq']}..{chain['last_seq']}"
                   if chain["status"] != "empty" else "chain: no records")
        out[-1] += note
    else:
        p = chain["problem"]
        out.append(f"chain: {chain['status'].upper()}: {p['file']}:{p['line']}: {p['kind']}: {p['message']}")
    for n in chain["notes"]:
        out.append(f"  note: {n['file']}:{n['line']}: {n['message']}")
    gaps = chain.get("gaps") or []
    if gaps:
        out.append(f"AUDIT LOG GAPS (records lost: treat as tampering): {len(gaps)}")
        for g in gaps:
            out.append(f"  {g['file']}:{g['line']}: {g['message']}")

    sf = r["signature_failures"]
    out.append("")
    out.append(f"SIGNATURE FAILURES: {sf['total']}" + ("  <-- review these first" if sf["total"] else ""))
    if sf["by_code"]:
        rows = [[g["code"], str(g["count"]), _clip(g.get("reason") or "", 30), _short(g["first"]), _short(g["last"]),
                 ",".join(g["profiles"]), _clip(",".join(g["endpoints"]), 40)] for g in sf["by_code"]]
        out += _table(rows, ["code", "count", "meaning", "first", "last", "profiles", "endpoints"])
        for g in sf["by_code"]:
            times = ", ".join(t[5:19].replace("T", " ") for t in g["times"][:12])
            more = f" (+{g['count'] - 12} more)" if g["count"] > 12 else ""
            out.append(f"  {g['code']} at: {times}{more}")

    out.append("")
    out.append("PROFILES")
    rows = [[p["profile"], str(p["accesses"]), str(p["injections"]), str(p["distinct_commands"]),
             str(p["distinct_hosts"]), str(p["distinct_users"]),
             " ".join(f"v{v}:{n}" for v, n in p["versions"].items()) or "-",
             str(p["refusals"]), str(p["signature_failures"])] for p in r["profiles"]]
    out += _table(rows, ["profile", "accesses", "runs", "commands", "hosts", "users", "versions", "refused",
                         "sig.fail"]) if rows else ["  (no access in the period)"]

    def section(title: str, block: Mapping[str, Any], cols: list[str], row: Any) -> None:
        out.append("")
        out.append(f"{title}: {block['total']}")
        if block["items"]:
            out.extend(_table([row(i) for i in block["items"]], cols))
            if block["truncated"]:
                out.append(f"  ... {block['total'] - len(block['items'])} more (see --json)")

    stale = r["stale_versions"]
    out.append("")
    out.append(f"BOTS ON AN OLD SECRET VERSION: {len(stale)}")
    if stale:
        out += _table([[b["profile"], b["host"], _clip(b["command"], 40), f"v{b['version']}",
                        f"v{b['latest_version']}", "running" if b["running"] else _short(b["last_start"])]
                       for b in stale], ["profile", "host", "command", "uses", "latest", "state"])
    section("ROTATIONS", r["rotations"], ["when", "profile", "old", "new"],
            lambda i: [_short(i["ts"]), i["profile"], str(i["old_version"]), str(i["new_version"])])
    section("NEW COMMANDS (never seen before the period)", r["new_commands"], ["first seen", "profile", "host", "command"],
            lambda i: [_short(i["first_seen"]), i["profile"], i["host"], _clip(i["command"], 50)])
    section("NEW HOSTS (never seen before the period)", r["new_hosts"], ["first seen", "profile", "host", "user"],
            lambda i: [_short(i["first_seen"]), i["profile"], i["host"], i["user"]])
    section(f"UNUSUAL HOURS ({r['unusual_hours_rule']})", r["unusual_hours"], ["when", "profile", "host", "command"],
            lambda i: [_short(i["ts"]), i["profile"], i["host"], _clip(i.get("command") or "(fetch)", 50)])
    section("FAIL-CLOSED REFUSALS", r["refusals"], ["when", "profile", "error", "reason"],
            lambda i: [_short(i["ts"]), i["profile"], str(i.get("error")), _clip(i.get("reason") or "", 60)])
    pr = r.get("policy_refusals") or {"total": 0, "by_rule": []}
    out.append("")
    out.append(f"SIGNING POLICY REFUSALS: {pr['total']}")
    if pr["by_rule"]:
        out += _table([[i["profile"], i["rule"], str(i["count"])] for i in pr["by_rule"]], ["profile", "rule", "count"])
    vault = r.get("vault_audit")
    if vault is not None:
        out.append("")
        out.append(f"VAULT AUDIT CROSS-CHECK ({vault['file']}): {vault['vault_reads']} reads of bot secrets, "
                   f"{len(vault['unmatched'])} with no broker record")
        if vault["unmatched"]:
            out += _table([[_short(u["time"]), u["path"], str(u.get("version")), u.get("remote_address") or "?",
                            u.get("display_name") or "?", u.get("token") or "?"] for u in vault["unmatched"]],
                          ["when", "path", "version", "from", "who", "token"])
        if vault.get("note"):
            out.append(f"  note: {vault['note']}")
    out.append("")
    out.append("DAILY ACTIVITY (accesses | signature failures | refusals)")
    peak = max([d["accesses"] for d in r["daily"]] + [1])
    for d in r["daily"]:
        bar = "#" * round(20 * d["accesses"] / peak)
        out.append(f"  {d['date']}  {d['accesses']:>7} {bar:<20} | {d['signature_failures']:>5} | {d['refusals']:>5}")
    return "\n".join(out) + "\n"
