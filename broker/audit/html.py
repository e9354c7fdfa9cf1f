"""The report as one self-contained HTML page (no network, no script needed).

It opens with the verdict: one row per thing to look at (chain, signature
failures, findings, unmatched Vault reads, bots on old versions, new commands
and hosts, refusals, keys not rotated), each a count that links to its
section, so the page answers "is anything wrong this week?" above the fold.

The daily-activity chart is inline SVG drawn here: one group per day
(``<g class="day" data-date=... data-accesses=...>``) holding one stacked
segment per kind of record, the whole bar proportional to the busiest day,
with labelled axes and a ``<title>`` tooltip. The report's JSON is embedded
too (``<script type="application/json" id="report-data">``, which a browser
never runs), so a machine can re-read the numbers. Every value from the log
is HTML-escaped: a command line in a record cannot inject markup into the
reviewer's browser.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from .model import Report

#: Stacked bottom to top: (key in the report's ``daily``, label, colour).
SERIES = (
    ("accesses", "Secret reads", "#2f6fb3"),
    ("injections", "Bot starts", "#7fa7d6"),
    ("exits", "Bot exits", "#b0bec5"),
    ("rotations", "Rotations", "#6a1b9a"),
    ("refusals", "Fail-closed refusals", "#ef8f00"),
    ("policy_refusals", "Signing policy refusals", "#a1887f"),
    ("signature_failures", "Signature failures", "#c62828"),
)
CHART_H = 160
BAR_W = 22
DAY_W = BAR_W + 8
LEFT = 56  # room for the y axis and its label

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.2em auto;max-width:1100px;color:#1d1d1f;padding:0 1em}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.4em 0 .4em}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
.alert{background:#fdecea;border:2px solid #c62828;padding:.6em 1em;border-radius:6px}
.ok{background:#e8f5e9;border:2px solid #2e7d32;padding:.6em 1em;border-radius:6px}
.warn{background:#fff4e5;border:2px solid #ef8f00;padding:.6em 1em;border-radius:6px}
.muted{color:#666}.legend span{display:inline-block;margin-right:1.2em}.sw{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:-.1em}
.cols{color:#555;font-size:.9em;margin:.2em 0 1em}.cols b{color:#333}
#summary table td{padding:.15em .6em}#summary tr.bad td{background:#fdecea}#summary tr.unknown td{color:#666}
ol.findings li{margin-bottom:.6em}.causes li{margin-bottom:.2em}
code{font-size:.92em;word-break:break-all}
"""


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _ts(value: Any) -> str:
    return _e(str(value or "")[:19].replace("T", " "))


class _Raw(str):
    """Already-escaped HTML."""


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], num: Sequence[int] = (),
           table_id: str | None = None) -> str:
    ident = f' id="{_e(table_id)}"' if table_id else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{_e(c)}</td>' if i in num else f"<td>{c if isinstance(c, _Raw) else _e(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _columns(explained: Mapping[str, str]) -> str:
    """What each column means, under its table."""
    return '<p class="cols">' + "; ".join(f"<b>{_e(k)}</b>: {_e(v)}" for k, v in explained.items()) + ".</p>"


def chart_svg(daily: Sequence[Mapping[str, Any]]) -> str:
    """One stacked bar per day, one segment per kind of record, scaled to the busiest day."""
    totals = [sum(int(d.get(key, 0)) for key, _, _ in SERIES) for d in daily]
    peak = max(totals + [1])
    width = LEFT + max(len(daily), 1) * DAY_W + 10
    height = CHART_H + 48
    base = CHART_H + 5
    parts = [
        f'<svg id="daily-chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="Records per day, stacked by kind" '
        f'data-peak="{peak}">',
        f'<line x1="{LEFT - 4}" y1="5" x2="{LEFT - 4}" y2="{base}" stroke="#999"/>',
        f'<line x1="{LEFT - 4}" y1="{base}" x2="{width}" y2="{base}" stroke="#999"/>',
        f'<text x="{LEFT - 8}" y="12" font-size="10" text-anchor="end">{peak}</text>',
        f'<text x="{LEFT - 8}" y="{base}" font-size="10" text-anchor="end">0</text>',
        f'<text class="axis-label" x="12" y="{base / 2}" font-size="10" text-anchor="middle" '
        f'transform="rotate(-90 12 {base / 2})">records per day</text>',
        f'<text class="axis-label" x="{LEFT + (width - LEFT) / 2}" y="{height - 4}" font-size="10" '
        f'text-anchor="middle">day (UTC)</text>',
    ]
    for i, day in enumerate(daily):
        x0 = LEFT + i * DAY_W
        attrs = " ".join(f'data-{key.replace("_", "-")}="{int(day.get(key, 0))}"' for key, _, _ in SERIES)
        tip = ", ".join(f"{label}: {int(day.get(key, 0))}" for key, label, _ in SERIES if int(day.get(key, 0)))
        parts.append(f'<g class="day" data-date="{_e(day["date"])}" data-total="{totals[i]}" {attrs}>'
                     f'<title>{_e(day["date"])}: {_e(tip or "no records")}</title>')
        y = float(base)
        for key, _label, colour in SERIES:
            value = int(day.get(key, 0))
            if not value:
                continue
            h = round(CHART_H * value / peak, 2)
            y = round(y - h, 2)
            parts.append(
                f'<rect class="bar {key.replace("_", "-")}" data-series="{key}" data-value="{value}" '
                f'x="{x0}" y="{y}" width="{BAR_W}" height="{h}" fill="{colour}"/>'
            )
        if len(daily) <= 31:
            parts.append(f'<text x="{x0}" y="{base + 14}" font-size="9">{_e(str(day["date"])[5:])}</text>')
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def _summary(report: Report) -> str:
    bad = [i for i in report.summary if i.count]
    out = ['<section id="summary"><h2>At a glance</h2>']
    if bad:
        out.append(f'<p class="alert" id="verdict"><strong>{len(bad)} thing(s) to look at</strong>: '
                   + ", ".join(f'<a href="#{_e(i.anchor)}">{_e(i.label)}</a>' for i in bad) + ".</p>")
    else:
        out.append('<p class="ok" id="verdict"><strong>Nothing to look at this period.</strong></p>')
    rows = []
    for i in report.summary:
        cls = "bad" if i.count else ("unknown" if i.count is None else "fine")
        value = "?" if i.count is None else str(i.count)
        rows.append(f'<tr class="{cls}" data-name="{_e(i.name)}" data-count="{_e(value)}">'
                    f'<td class="num"><a href="#{_e(i.anchor)}">{_e(value)}</a></td>'
                    f'<td><a href="#{_e(i.anchor)}">{_e(i.label)}</a></td><td class="muted">{_e(i.note)}</td></tr>')
    out.append('<table id="summary-table"><tbody>' + "".join(rows) + "</tbody></table>")
    out.append('<p class="cols">A count links to its section; <b>?</b>: not known (the note says why); '
               "<code>--fail-on NAME</code> makes <code>audit report</code> exit 1 when that count is not 0 "
               "(names: " + ", ".join(_e(i.name) for i in report.summary) + ").</p>")
    out.append("</section>")
    return "".join(out)


def _findings(report: Report) -> str:
    out = [f'<section id="findings"><h2>Findings ({len(report.findings)})</h2>']
    if not report.findings:
        out.append('<p class="ok">No pattern in the signature failures.</p>')
    else:
        out.append('<ol class="findings">')
        for f in report.findings:
            where = f"{_e(f.host)}: " if report.sections.get("fleet") and f.host else ""
            out.append(f'<li data-kind="{_e(f.kind.value)}" data-profile="{_e(f.profile)}" data-host="{_e(f.host)}">'
                       f"<strong>{where}{_e(f.summary)}</strong><br>What to do: {_e(f.advice)}<br>"
                       f'<span class="muted">{_ts(f.first)} to {_ts(f.last)} UTC; records (seq): '
                       f'{_e(", ".join(str(s) for s in f.seqs))}; kind <code>{_e(f.kind.value)}</code></span></li>')
        out.append("</ol>")
    out.append("</section>")
    return "".join(out)


def _failures(report: Report) -> str:
    out = ['<section id="signature-failures"><h2>Signature failures</h2>']
    if not report.failure_total:
        out.append('<p class="ok">No signature failures in the period.</p></section>')
        return "".join(out)
    out.append(f'<p class="alert"><strong>{report.failure_total} signature failure(s)</strong> in the period: '
               "they can mean a leaked key, or someone trying to use one. Each code below says what Binance "
               "means by it and what to check, most likely cause first.</p>")
    rows = []
    for g in report.failures:
        causes = "".join(f"<li>{_e(c.cause)}. <em>Check:</em> {_e(c.check)}</li>" for c in g.advice.causes)
        meaning = f"<strong>{_e(g.advice.name)}</strong>: {_e(g.advice.meaning)}" + (
            "" if g.advice.key_problem else " <em>(not a key problem)</em>")
        rows.append([g.label, g.count, _Raw(f'{meaning}<ol class="causes">{causes}</ol>'), _Raw(_ts(g.first)),
                     _Raw(_ts(g.last)), ", ".join(g.profiles), ", ".join(g.hosts), ", ".join(g.endpoints),
                     ", ".join(str(s) for s in g.seqs[:50])])
    out.append(_table(["Code", "Count", "Meaning and likely causes", "First", "Last", "Profiles", "Hosts",
                       "Endpoints", "Records (seq)"], rows, num=(1,), table_id="signature-failures-table"))
    out.append(_columns({
        "Code": "Binance's error code, or the HTTP status when the answer had none",
        "Count": "failures with that code in the period",
        "Meaning and likely causes": "Binance's name and meaning; the causes in the order to rule them out, "
                                     "each with the one thing to check",
        "First / Last": "the first and last failure (UTC)",
        "Profiles / Hosts": "the credbroker profiles and the machines the failing bots ran on (stamped by the "
                            "broker that ran them)",
        "Endpoints": "scheme, host and path of the failing requests (never the query, which holds the signature)",
        "Records (seq)": "sequence numbers of the audit records, for `credbroker audit show --seq`",
    }))
    out.append("</section>")
    return "".join(out)


def render_html(report: Report) -> str:
    """The whole page."""
    r = report.to_dict()
    out: list[str] = []
    title = f"credbroker audit report {report.since[:10]} to {report.until[:10]}"
    out.append(f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>")
    out.append('<meta name="viewport" content="width=device-width,initial-scale=1">')
    out.append(f"<style>{CSS}</style></head><body>")
    out.append(f"<h1>{_e(title)}</h1>")
    out.append(f'<p class="muted" id="period">{_ts(report.since)} to {_ts(report.until)} UTC, '
               f'{int(report.records_in_period)} records in the period; read: '
               + (f'{len(r["hosts"])} hosts\' logs' if r.get("fleet") else _e(", ".join(report.files) or "(no file)"))
               + ".</p>")
    if r.get("fleet"):
        out.append(_hosts(r["hosts"]))
    out.append(_summary(report))
    out.append(_findings(report))
    out.append(_failures(report))
    from .upkeep import html_sections

    out.extend(html_sections(r["key_upkeep"], _e, _table, _ts))
    out.append(_chain(r["chain"]))
    out.append('<section id="activity"><h2>Daily activity</h2><p class="legend">')
    for _, label, colour in SERIES:
        out.append(f'<span><i class="sw" style="background:{colour}"></i>{_e(label)}</span>')
    out.append("</p>")
    out.append(chart_svg(r["daily"]))
    out.append(_columns({"bar": "all records of the day (UTC), stacked by kind; hover a bar for the numbers",
                         "not shown": "high-rate records such as each signature the agent made "
                                      "(counted in --json under daily.other)"}))
    out.append("</section>")
    out.extend(_sections(r))
    data = json.dumps(r, separators=(",", ":")).replace("</", "<\\/")
    out.append(f'<script type="application/json" id="report-data">{data}</script>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _hosts(hosts: Sequence[Mapping[str, Any]]) -> str:
    """A fleet report's hosts: each one's own chain and counts."""
    rows = [[h["host"], _Raw(f'<span data-status="{_e(h["chain"])}">' + ("intact" if h["ok"] else
                                                                        _e(str(h["chain"]).upper())) + "</span>"),
             h["records"], h["records_in_period"], h["signature_failures"], h["findings"], h["gaps"],
             "NOT checked" if h.get("anchors_error") else
             ("-" if h.get("anchors_checked") is None else f"{h['anchors_checked']} matched")] for h in hosts]
    return ('<section id="hosts"><h2>Hosts (' + str(len(hosts)) + ")</h2>"
            + _table(["Host", "Chain", "Records", "In period", "Sig. failures", "Findings", "Gaps", "Anchors"],
                     rows, num=(2, 3, 4, 5, 6), table_id="hosts-table")
            + _columns({"Host": "the folder the host's logs were collected in",
                        "Chain": "that host's own hash chain, verified alone",
                        "Anchors": "the host's anchors in Vault compared with its chain"}) + "</section>")


def _chain(chain: Mapping[str, Any]) -> str:
    if "hosts" in chain:
        rows = []
        for c in chain["hosts"]:
            p = c.get("problem")
            what = (f'{p["file"]}:{p["line"]}: {p["kind"]}: {p["message"]}' if p else
                    f'intact, {c["records"]} records' if c["status"] != "empty" else "no records")
            extra = [f'gap: {g["file"]}:{g["line"]}: {g["message"]}' for g in c.get("gaps") or [] if g != p]
            extra += [f'note: {n["file"]}:{n["line"]}: {n["message"]}' for n in c.get("notes") or []]
            if c.get("anchors_error"):
                extra.append(f'anchors NOT checked: {c["anchors_error"]}')
            rows.append([c["host"], str(c["status"]), "; ".join([what, *extra])])
        cls = "ok" if chain["ok"] else "alert"
        verdict = ("Intact on every host." if chain["ok"] else
                   "<strong>Not intact</strong> on " + _e(", ".join(chain["broken_hosts"])) + "."
                   if chain["broken_hosts"] else "Anchors not checked on some host.")
        return (f'<section id="chain"><h2>Audit chain, per host</h2><p class="{cls}" data-status="{_e(chain["status"])}">'
                f"{verdict}</p>" + _table(["Host", "Status", "Detail"], rows, table_id="chain-table") + "</section>")
    out = ['<section id="chain"><h2>Audit chain</h2>']
    if chain["status"] == "empty":
        out.append('<p class="muted" data-status="empty">The log holds no records yet.</p>')
    elif chain["ok"]:
        out.append(f'<p class="ok" data-status="{_e(chain["status"])}">Intact: {int(chain["records"])} records, '
                   f'seq {_e(chain["first_seq"])} to {_e(chain["last_seq"])}, {_e(chain["alg"])} chain'
                   + (f', key id {_e(chain["key_id"])}' if chain.get("key_id") else "") + ".</p>")
    else:
        p = chain["problem"]
        out.append(f'<p class="alert" data-status="{_e(chain["status"])}"><strong>Not intact</strong>: '
                   f'{_e(p["file"])}:{_e(p["line"])}: {_e(p["kind"])}: {_e(p["message"])}</p>')
    for n in chain["notes"]:
        out.append(f'<p class="muted">Note: {_e(n["file"])}:{_e(n["line"])}: {_e(n["message"])}</p>')
    out.append("</section>")
    return "".join(out)


def _sections(r: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    fleet = bool(r.get("fleet"))  # every row names its host (the folder its log was collected in)
    hh = ["Host"] if fleet else []
    sh = 1 if fleet else 0

    def hc(row: Mapping[str, Any]) -> list[Any]:
        return [row.get("host") or "?"] if fleet else []

    out.append('<section id="profiles"><h2>Profiles</h2>')
    out.append(_table(
        [*hh, "Profile", "Secret", "Accesses", "Runs", "Commands", "Hosts", "Users", "Versions", "Refused",
         "Sig. failures"],
        [[*hc(p), p["profile"], _Raw(f"<code>{_e(p['secret'])}</code>"), p["accesses"], p["injections"],
          p["distinct_commands"], p["distinct_hosts"], p["distinct_users"],
          " ".join(f"v{v}: {n}" for v, n in p["versions"].items()) or "-",
          p["refusals"], p["signature_failures"]] for p in r["profiles"]],
        num=tuple(i + sh for i in (2, 3, 4, 5, 6, 8, 9)), table_id="profiles-table"))
    out.append(_columns({
        "Secret": "the Vault address, [namespace] and path the profile read (one row per secret: the same "
                  "profile against two Vaults is two rows), or the keyring service",
        "Accesses": "reads of the secret (each `run` start, `check`, `get_signer`, rotation re-read)",
        "Runs": "bots started with the secret", "Commands / Hosts / Users": "how many different ones",
        "Versions": "vN: reads of version N", "Refused": "fail-closed refusals (the bot was not started)",
        "Sig. failures": "signature failures its bots reported"}))
    out.append("</section>")

    stale = r["stale_versions"]
    out.append('<section id="stale-versions"><h2>Bots on an old secret version</h2>')
    if stale:
        out.append(f'<p class="warn">{len(stale)} bot(s) still used an older version than the newest at the end '
                   "of the period.</p>")
        out.append(_table(["Profile", "Secret", "Host", "Pid", "Command", "Uses", "Latest", "Since", "State"],
                          [[b["profile"], _Raw(f"<code>{_e(b['secret'])}</code>"), b["host"], b["pid"],
                            _Raw(f"<code>{_e(b['command'])}</code>"), f"v{b['version']}", f"v{b['latest_version']}",
                            _Raw(_ts(b["started"])),
                            "running" if b["running"] else _Raw(f"exited {_ts(b['exited'])} (after the period)")]
                           for b in stale], table_id="stale-table"))
        out.append(_columns({"Uses / Latest": "the version the bot was started with / the newest version of that "
                                              "secret seen in the log", "Since": "when the bot started (UTC)",
                             "State": "running at the end of the period, or when it exited after it"}))
    else:
        out.append('<p class="ok">Every bot running at the end of the period uses the newest version.</p>')
    out.append("</section>")

    def listing(ident: str, title: str, block: Mapping[str, Any], headers: list[str], row: Any,
                cols: Mapping[str, str]) -> None:
        note = block.get("note")
        total = "?" if note else int(block["total"])
        out.append(f'<section id="{ident}"><h2>{_e(title)} ({total})</h2>')
        if note:
            out.append(f'<p class="muted history">{_e(note[0].upper() + note[1:])}: the log has no record before '
                       "the period to compare with.</p>")
        elif block["items"]:
            out.append(_table(headers, [row(i) for i in block["items"]], table_id=f"{ident}-table"))
            out.append(_columns(cols))
            if block["truncated"]:
                out.append(f'<p class="muted">{int(block["total"]) - len(block["items"])} more in --json.</p>')
        else:
            out.append('<p class="muted">None.</p>')
        out.append("</section>")

    listing("new-commands", "Commands never seen before the period", r["new_commands"],
            ["First seen", "Profile", "Host", "Command"],
            lambda i: [_Raw(_ts(i["first_seen"])), i["profile"], i["host"], _Raw(f"<code>{_e(i['command'])}</code>")],
            {"First seen": "the first time in the period (UTC)", "Command": "the command line credbroker started"})
    listing("new-hosts", "Hosts never seen before the period", r["new_hosts"],
            ["First seen", "Profile", "Host", "User"],
            lambda i: [_Raw(_ts(i["first_seen"])), i["profile"], i["host"], i["user"]],
            {"Host / User": "the machine and the local user that read the profile's secret"})
    listing("unusual-hours", f"Accesses at unusual hours ({r['unusual_hours_rule']})", r["unusual_hours"],
            ["When", "Profile", "Host", "Command"],
            lambda i: [_Raw(_ts(i["ts"])), i["profile"], i["host"], i.get("command") or "(fetch)"],
            {"Command": "the bot started, or (fetch) for a read without a bot (check, get_signer)"})
    listing("rotations", "Rotations detected", r["rotations"], ["When", *hh, "Profile", "Secret", "Old", "New", "Seq"],
            lambda i: [_Raw(_ts(i["ts"])), *hc(i), i["profile"], i.get("secret"), i["old_version"], i["new_version"],
                       i.get("seq")],
            {"Old / New": "the version before and after", "Seq": "the audit record"})

    ref = r["refusals"]
    out.append(f'<section id="refusals"><h2>Fail-closed refusals ({int(ref["total"])})</h2>')
    if ref["groups"]:
        out.append(_table([*hh, "Profile", "Secret", "Count", "Error", "Reason", "First", "Last", "Records (seq)"],
                          [[*hc(g), g["profile"], _Raw(f"<code>{_e(g['secret'])}</code>"), g["count"], g["error"],
                            g["reason"], _Raw(_ts(g["first"])), _Raw(_ts(g["last"])),
                            ", ".join(str(s) for s in g["seqs"])] for g in ref["groups"]],
                          num=(2 + sh,), table_id="refusals-table"))
        out.append(_columns({"Secret": "the Vault address, [namespace] and path the run was for",
                             "Error": "credbroker's error class", "Reason": "its one-line message",
                             "Count": "refusals with that profile, secret, error and reason"}))
    else:
        out.append('<p class="muted">None.</p>')
    out.append("</section>")

    pr = r["policy_refusals"]
    out.append(f'<section id="policy-refusals"><h2>Signing policy refusals ({int(pr["total"])})</h2>')
    if pr["by_rule"]:
        out.append(_table([*hh, "Profile", "Rule", "Count"],
                          [[*hc(i), i["profile"], i["rule"], i["count"]] for i in pr["by_rule"]],
                          num=(2 + sh,), table_id="policy-refusals-table"))
        out.append(_columns({"Rule": "the [policy] rule of the profile that refused a signing request"}))
    else:
        out.append('<p class="muted">None.</p>')
    out.append("</section>")

    un = r["unrotated"]
    out.append(f'<section id="unrotated"><h2>Keys not rotated in {int(un["days"])} days</h2>')
    if un["note"]:
        out.append(f'<p class="muted history">{_e(un["note"][0].upper() + un["note"][1:])}: the log is younger '
                   f'than {int(un["days"])} days and Vault\'s KV metadata was not readable.</p>')
    elif un["items"]:
        out.append(_table([*hh, "Secret", "Newest version", "Since", "From"],
                          [[*hc(i), i["secret"], f"v{i['version']}", _Raw(_ts(i["first_seen"])), i["source"]]
                           for i in un["items"]], table_id="unrotated-table"))
        out.append(_columns({"Since": "when the newest version was created (Vault's KV metadata) or, where that "
                                      "was not readable, first read by the broker (the audit log)",
                             "From": "which of the two"}))
    else:
        out.append('<p class="ok">Every secret read got a new version within the period.</p>')
    out.append("</section>")

    vault = r.get("vault_audit")
    if vault is not None:
        out.append('<section id="vault-audit"><h2>Vault audit cross-check</h2>')
        cls = "alert" if vault["unmatched_total"] else "ok"
        out.append(f'<p class="{cls}">{int(vault["vault_reads"])} read(s) of bot secrets in {_e(vault["file"])}; '
                   f'<strong>{int(vault["unmatched_total"])} with no broker record</strong>.</p>')
        if vault["unmatched"]:
            out.append(_table(["When", "Path", "Version", "From", "Who", "Token"],
                              [[_Raw(_ts(u["time"])), u["path"], u.get("version"), u.get("remote_address"),
                                u.get("display_name"), u.get("token") or "?"] for u in vault["unmatched"]],
                              table_id="vault-unmatched-table"))
            out.append(_columns({
                "From": "the client address Vault saw",
                "Who": "the display name of the Vault token that read (\"token\": a token made with `token "
                       "create` or the root token; \"approle\": an AppRole login; a user name for userpass/LDAP)",
                "Token": "\"your token\" when it is the token of whoever runs the report, \"another token\" "
                         "otherwise, ? when the token could not be hashed by Vault"}))
        out.append("</section>")
    else:
        out.append('<section id="vault-audit"><h2>Vault audit cross-check</h2><p class="muted">Not run: '
                   "give <code>--vault-audit FILE</code> (Vault's file audit device log).</p></section>")
    return out
