"""The weekly review's key-upkeep section: listenKey trouble and trading authority about to end.

Self-contained so the report's pass only hands it the records it names
(``EVENTS``) and shows what ``to_dict`` returns:

- ``listen_key_*`` (``broker.signing.listenkey``): per profile, how many
  listenKeys were created, kept alive and recreated, and the failures grouped
  by what went wrong (-1125, a stream error the bot reported, no answer, key
  trouble), each with its meaning and the causes to check (``advice.py``);
  shown beside the signature failures, since a listenKey that something else
  closed can mean someone else holds the API key (``findings.py`` calls that
  out);
- ``preflight`` (``broker.preflight``): the newest ``tradingAuthorityExpirationTime``
  known per profile and API key (records before the period count: it is a
  state, not an event), listed when it ends within ``EXPIRY_DAYS`` of the end
  of the period, or has ended.

Fields read: ``listen_key_*``: profile, api_key (masked), code, status,
source, stream_event, message, reason; ``preflight``: profile, api_key (masked),
restrictions.tradingAuthorityExpirationTime.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .advice import listen_key_advice
from .findings import ListenKeyMark

LISTEN_KEY_EVENTS = frozenset({"listen_key_created", "listen_key_kept_alive", "listen_key_recreated",
                               "listen_key_failed"})
EVENTS = LISTEN_KEY_EVENTS | {"preflight"}
#: The review lists keys whose trading authority ends within this many days of the end of the period.
EXPIRY_DAYS = 30
MARK_CAP = 20000
_LIST_CAP = 200


def failure_label(data: Mapping[str, Any]) -> str:
    """How a listen_key_failed record is grouped: -1125, "stream error", "listenKeyExpired", "no answer", HTTP N."""
    if data.get("source") == "stream":
        return "listenKeyExpired" if data.get("stream_event") == "listenKeyExpired" else "stream error"
    code = data.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        return str(code)
    status = data.get("status")
    return f"HTTP {status}" if isinstance(status, int) and not isinstance(status, bool) else "no answer"


@dataclass
class _Counts:
    created: int = 0
    kept_alive: int = 0
    recreated: int = 0
    failed: int = 0
    hosts: set[str] = field(default_factory=set)


@dataclass
class _FailGroup:
    count: int = 0
    first: str = ""
    last: str = ""
    profiles: set[str] = field(default_factory=set)
    hosts: set[str] = field(default_factory=set)
    seqs: list[int] = field(default_factory=list)
    message: str | None = None


@dataclass
class UpkeepSection:
    """Fed every record named in ``EVENTS`` (in chain order, those after the period excluded)."""

    since: str
    until: datetime
    counts: dict[str, _Counts] = field(default_factory=dict)
    failures: dict[str, _FailGroup] = field(default_factory=dict)
    marks: list[ListenKeyMark] = field(default_factory=list)
    expiry: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def feed(self, ts: str, event: str, rec: Mapping[str, Any]) -> None:
        data = rec.get("data")
        if not isinstance(data, Mapping):
            return
        profile = str(data.get("profile") or "(none)")
        host = str(data.get("host") or rec.get("host") or "?")
        raw_seq = rec.get("seq")
        seq = raw_seq if isinstance(raw_seq, int) else -1
        api_key = data.get("api_key")
        key = api_key[-4:] if isinstance(api_key, str) else ""
        if event == "preflight":
            self._preflight(ts, profile, host, key, data)
            return
        failed = event == "listen_key_failed"
        label = failure_label(data) if failed else ""
        if len(self.marks) < MARK_CAP and (not failed or label in ("-1125", "stream error")):
            self.marks.append(ListenKeyMark(seq, ts, profile, host, key, not failed, label))
        if ts < self.since:
            return
        c = self.counts.setdefault(profile, _Counts())
        c.hosts.add(host)
        if event == "listen_key_created":
            c.created += 1
        elif event == "listen_key_kept_alive":
            c.kept_alive += 1
        elif event == "listen_key_recreated":
            c.recreated += 1
        elif failed:
            c.failed += 1
            g = self.failures.get(label)
            if g is None:
                message = data.get("message")
                g = self.failures[label] = _FailGroup(first=ts, message=message if isinstance(message, str) else None)
            g.count += 1
            g.last = ts
            g.profiles.add(profile)
            g.hosts.add(host)
            if len(g.seqs) < _LIST_CAP:
                g.seqs.append(seq)

    def _preflight(self, ts: str, profile: str, host: str, key: str, data: Mapping[str, Any]) -> None:
        restrictions = data.get("restrictions")
        if not isinstance(restrictions, Mapping):
            return
        value = restrictions.get("tradingAuthorityExpirationTime")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.expiry.pop((profile, key), None)  # the newest answer has no end date any more
            return
        self.expiry[(profile, key)] = {"profile": profile, "api_key": f"...{key}" if key else None, "host": host,
                                       "checked": ts, "expires_ms": value}

    def expiring(self) -> list[dict[str, Any]]:
        """Keys whose trading authority ends within ``EXPIRY_DAYS`` of the end of the period (or has ended)."""
        end_ms = self.until.timestamp() * 1000
        limit_ms = end_ms + EXPIRY_DAYS * 86_400_000
        rows = []
        for item in self.expiry.values():
            ms = item["expires_ms"]
            if ms > limit_ms:
                continue
            when = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
            rows.append({**item, "expires": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                         "days_left": round((ms - end_ms) / 86_400_000, 1), "expired": ms <= end_ms})
        return sorted(rows, key=lambda r: (r["expires_ms"], r["profile"]))

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` block (``key_upkeep``)."""
        groups = []
        for label, g in sorted(self.failures.items(), key=lambda kv: (-kv[1].count, kv[0])):
            a = listen_key_advice(label)
            groups.append({"code": label, "name": a.name, "meaning": a.meaning, "key_problem": a.key_problem,
                           "causes": [c._asdict() for c in a.causes], "count": g.count, "first": g.first,
                           "last": g.last, "profiles": sorted(g.profiles), "hosts": sorted(g.hosts),
                           "seqs": g.seqs, "message": g.message})
        return {
            "listen_keys": {
                "failures_total": sum(g.count for g in self.failures.values()),
                "profiles": [{"profile": p, "created": c.created, "kept_alive": c.kept_alive,
                              "recreated": c.recreated, "failed": c.failed, "hosts": sorted(c.hosts)}
                             for p, c in sorted(self.counts.items())],
                "failures": groups,
            },
            "trading_authority": {"days": EXPIRY_DAYS, "expiring": self.expiring()},
        }


def text_lines(block: Mapping[str, Any], short: Callable[[str | None], str]) -> list[str]:
    """The text form, shown right after the signature failures."""
    lk = block["listen_keys"]
    out = ["", f"LISTENKEY TROUBLE (user data streams): {lk['failures_total']}"
           + ("  <-- review with the signature failures" if lk["failures_total"] else "")]
    for p in lk["profiles"]:
        out.append(f"  {p['profile']}: {p['created']} created, {p['kept_alive']} kept alive, "
                   f"{p['recreated']} recreated, {p['failed']} failed")
    for g in lk["failures"]:
        out.append(f"  {g['code']} {g['name']}: {g['meaning']}" + ("" if g["key_problem"] else " (not a key problem)"))
        out.append(f"    {g['count']} time(s), {short(g['first'])} .. {short(g['last'])} UTC; profiles "
                   f"{', '.join(g['profiles'])}; hosts {', '.join(g['hosts'])}")
        out.append(f"    records: seq {', '.join(str(s) for s in g['seqs'][:12])}"
                   + (f" (+{g['count'] - 12} more)" if g["count"] > 12 else ""))
        out.append("    likely causes, most likely first (check):")
        for n, c in enumerate(g["causes"], 1):
            out.append(f"      {n}. {c['cause']}")
            out.append(f"         check: {c['check']}")
    ta = block["trading_authority"]
    out.append("")
    out.append(f"TRADING AUTHORITY ENDING WITHIN {ta['days']} DAYS (from the key preflight): {len(ta['expiring'])}")
    for item in ta["expiring"]:
        state = "ENDED" if item["expired"] else f"{item['days_left']:g} day(s) left"
        key = item["api_key"] or "(key not recorded)"
        out.append(f"  {item['profile']}  key {key}  ends {short(item['expires'])} UTC ({state}); "
                   f"checked {short(item['checked'])} on {item['host']}")
    if ta["expiring"]:
        out.append("  renew the key's trading permission on the exchange before it ends, or the bot's orders fail")
    return out


def html_sections(block: Mapping[str, Any], e: Callable[[Any], str], table: Callable[..., str],
                  ts: Callable[[Any], str]) -> list[str]:
    """The HTML form: sections ``listen-keys`` and ``trading-authority`` (the summary links to them)."""
    lk = block["listen_keys"]
    out = [f'<section id="listen-keys"><h2>listenKey trouble ({int(lk["failures_total"])})</h2>']
    if lk["profiles"]:
        out.append(table(["Profile", "Created", "Kept alive", "Recreated", "Failed"],
                         [[p["profile"], p["created"], p["kept_alive"], p["recreated"], p["failed"]]
                          for p in lk["profiles"]], num=(1, 2, 3, 4), table_id="listen-keys-table"))
    else:
        out.append('<p class="muted">No listenKey kept by credbroker in the period.</p>')
    for g in lk["failures"]:
        causes = "".join(f"<li>{e(c['cause'])}; check: {e(c['check'])}</li>" for c in g["causes"])
        out.append(f'<div class="failure" data-code="{e(g["code"])}"><h3>{e(g["code"])} {e(g["name"])}: '
                   f'{int(g["count"])} time(s)</h3><p>{e(g["meaning"])}; {ts(g["first"])} to {ts(g["last"])} UTC; '
                   f'profiles {e(", ".join(g["profiles"]))}</p><ol class="causes">{causes}</ol></div>')
    out.append("</section>")
    ta = block["trading_authority"]
    out.append(f'<section id="trading-authority"><h2>Trading authority ending within {int(ta["days"])} days '
               f'({len(ta["expiring"])})</h2>')
    if ta["expiring"]:
        out.append(table(["Profile", "API key", "Ends (UTC)", "Days left", "Checked"],
                         [[i["profile"], i["api_key"] or "-", i["expires"][:19].replace("T", " "),
                           "ended" if i["expired"] else f"{i['days_left']:g}", i["checked"][:19].replace("T", " ")]
                          for i in ta["expiring"]], table_id="trading-authority-table"))
    else:
        out.append('<p class="ok">No key checked by the preflight loses its trading authority within '
                   f'{int(ta["days"])} days.</p>')
    out.append("</section>")
    return out


def summary_counts(block: Mapping[str, Any]) -> dict[str, int]:
    """``--fail-on`` name -> count, for the verdict."""
    return {"listen-key-failures": int(block["listen_keys"]["failures_total"]),
            "expiring-trading-authority": len(block["trading_authority"]["expiring"])}
