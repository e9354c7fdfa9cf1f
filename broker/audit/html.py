"""The report as one self-contained HTML page (no network, no script needed).

The daily-activity chart is inline SVG drawn here: one group per day
(``<g class="day" data-date=... data-accesses=...>``) holding one bar per
series, heights proportional to the busiest day, with a ``<title>`` tooltip.
The report's JSON is embedded too (``<script type="application/json"
id="report-data">``), so a person sees the chart and a machine can re-read
the numbers. Every value from the log is HTML-escaped: a command line in a
record cannot inject markup into the reviewer's browser.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

SERIES = (
    ("accesses", "Secret accesses", "#2f6fb3"),
    ("signature_failures", "Signature failures", "#c62828"),
    ("refusals", "Fail-closed refusals", "#ef8f00"),
)
CHART_H = 160
BAR_W = 9
DAY_W = 3 * BAR_W + 8

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;color:#1d1d1f;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.4em 0 1em}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
.alert{background:#fdecea;border:2px solid #c62828;padding:.6em 1em;border-radius:6px}
.ok{background:#e8f5e9;border:2px solid #2e7d32;padding:.6em 1em;border-radius:6px}
.warn{background:#fff4e5;border:2px solid #ef8f00;padding:.6em 1em;border-radius:6px}
.muted{color:#666}.legend span{display:inline-block;margin-right:1.2em}.sw{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:-.1em}
code{font-size:.92em;word-break:break-all}
"""


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _ts(value: Any) -> str:
    return _e(str(value or "")[:19].replace("T", " "))


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


class _Raw(str):
    """Already-escaped HTML."""


def chart_svg(daily: Sequence[Mapping[str, Any]]) -> str:
    """Bars per day for each series, scaled to the busiest value of the period."""
    peak = max([int(d.get(key, 0)) for d in daily for key, _, _ in SERIES] + [1])
    width = max(len(daily), 1) * DAY_W + 50
    height = CHART_H + 40
    parts = [
        f'<svg id="daily-chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="Daily activity" data-peak="{peak}">',
        f'<line x1="40" y1="{CHART_H + 5}" x2="{width}" y2="{CHART_H + 5}" stroke="#999"/>',
        f'<text x="36" y="15" font-size="10" text-anchor="end">{peak}</text>',
        f'<text x="36" y="{CHART_H + 5}" font-size="10" text-anchor="end">0</text>',
    ]
    for i, day in enumerate(daily):
        x0 = 45 + i * DAY_W
        attrs = " ".join(f'data-{key.replace("_", "-")}="{int(day.get(key, 0))}"' for key, _, _ in SERIES)
        tip = ", ".join(f"{label}: {int(day.get(key, 0))}" for key, label, _ in SERIES)
        parts.append(f'<g class="day" data-date="{_e(day["date"])}" {attrs}><title>{_e(day["date"])}: {_e(tip)}</title>')
        for j, (key, label, colour) in enumerate(SERIES):
            value = int(day.get(key, 0))
            h = round(CHART_H * value / peak, 2)
            parts.append(
                f'<rect class="bar {key.replace("_", "-")}" data-series="{key}" data-value="{value}" '
                f'x="{x0 + j * BAR_W}" y="{round(CHART_H + 5 - h, 2)}" width="{BAR_W - 1}" height="{h}" '
                f'fill="{colour}"/>'
            )
        if len(daily) <= 31:
            parts.append(f'<text x="{x0}" y="{CHART_H + 20}" font-size="9">{_e(str(day["date"])[5:])}</text>')
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def render_html(r: Mapping[str, Any]) -> str:
    """The whole page."""
    out: list[str] = []
    period = r["period"]
    title = f"credbroker audit report {str(period['since'])[:10]} to {str(period['until'])[:10]}"
    out.append(f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>")
    out.append('<meta name="viewport" content="width=device-width,initial-scale=1">')
    out.append(f"<style>{CSS}</style></head><body>")
    out.append(f"<h1>{_e(title)}</h1>")
    out.append(f'<p class="muted">{_ts(period["since"])} to {_ts(period["until"])} UTC, '
               f'{int(r["records_in_period"])} records in the period.</p>')

    sf = r["signature_failures"]
    out.append('<section id="signature-failures"><h2>Signature failures</h2>')
    if sf["total"]:
        out.append(f'<p class="alert"><strong>{int(sf["total"])} signature failure(s)</strong> in the period: '
                   "they can mean a leaked key, or someone trying to use one. Review them first.</p>")
        out.append(_table(
            ["Code", "Count", "Meaning", "First", "Last", "Profiles", "Endpoints", "Times"],
            [[g["code"], g["count"], g.get("reason") or "", _Raw(_ts(g["first"])), _Raw(_ts(g["last"])),
              ", ".join(g["profiles"]), ", ".join(g["endpoints"]),
              _Raw("<br>".join(_ts(t) for t in g["times"][:50]))] for g in sf["by_code"]],
            num=(1,), table_id="signature-failures-table"))
    else:
        out.append('<p class="ok">No signature failures in the period.</p>')
    out.append("</section>")

    chain = r["chain"]
    out.append('<section id="chain"><h2>Audit chain</h2>')
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

    out.append('<section id="activity"><h2>Daily activity</h2><p class="legend">')
    for _, label, colour in SERIES:
        out.append(f'<span><i class="sw" style="background:{colour}"></i>{_e(label)}</span>')
    out.append("</p>")
    out.append(chart_svg(r["daily"]))
    out.append("</section>")

    out.append('<section id="profiles"><h2>Profiles</h2>')
    out.append(_table(
        ["Profile", "Accesses", "Runs", "Commands", "Hosts", "Users", "Versions", "Refused", "Sig. failures"],
        [[p["profile"], p["accesses"], p["injections"], p["distinct_commands"], p["distinct_hosts"],
          p["distinct_users"], " ".join(f"v{v}: {n}" for v, n in p["versions"].items()) or "-",
          p["refusals"], p["signature_failures"]] for p in r["profiles"]],
        num=(1, 2, 3, 4, 5, 7, 8), table_id="profiles-table"))
    out.append("</section>")

    stale = r["stale_versions"]
    out.append('<section id="stale-versions"><h2>Bots on an old secret version</h2>')
    if stale:
        out.append(f'<p class="warn">{len(stale)} bot(s) still use a version older than the newest one.</p>')
        out.append(_table(["Profile", "Host", "Command", "Uses", "Latest", "State"],
                          [[b["profile"], b["host"], _Raw(f"<code>{_e(b['command'])}</code>"), f"v{b['version']}",
                            f"v{b['latest_version']}", "running" if b["running"] else f"started {_ts(b['last_start'])}"]
                           for b in stale], table_id="stale-table"))
    else:
        out.append('<p class="ok">Every bot seen uses the newest version.</p>')
    out.append("</section>")

    def listing(ident: str, title: str, block: Mapping[str, Any], headers: list[str], row: Any) -> None:
        out.append(f'<section id="{ident}"><h2>{_e(title)} ({int(block["total"])})</h2>')
        if block["items"]:
            out.append(_table(headers, [row(i) for i in block["items"]], table_id=f"{ident}-table"))
            if block["truncated"]:
                out.append(f'<p class="muted">{int(block["total"]) - len(block["items"])} more in --json.</p>')
        else:
            out.append('<p class="muted">None.</p>')
        out.append("</section>")

    listing("new-commands", "Commands never seen before the period", r["new_commands"],
            ["First seen", "Profile", "Host", "Command"],
            lambda i: [_Raw(_ts(i["first_seen"])), i["profile"], i["host"], _Raw(f"<code>{_e(i['command'])}</code>")])
    listing("new-hosts", "Hosts never seen before the period", r["new_hosts"],
            ["First seen", "Profile", "Host", "User"],
            lambda i: [_Raw(_ts(i["first_seen"])), i["profile"], i["host"], i["user"]])
    listing("unusual-hours", f"Accesses at unusual hours ({r['unusual_hours_rule']})", r["unusual_hours"],
            ["When", "Profile", "Host", "Command"],
            lambda i: [_Raw(_ts(i["ts"])), i["profile"], i["host"], i.get("command") or "(fetch)"])
    listing("refusals", "Fail-closed refusals", r["refusals"], ["When", "Profile", "Error", "Reason"],
            lambda i: [_Raw(_ts(i["ts"])), i["profile"], i.get("error"), i.get("reason")])
    listing("rotations", "Rotations detected", r["rotations"], ["When", "Profile", "Old", "New"],
            lambda i: [_Raw(_ts(i["ts"])), i["profile"], i["old_version"], i["new_version"]])

    pr = r.get("policy_refusals") or {"total": 0, "by_rule": []}
    out.append(f'<section id="policy-refusals"><h2>Signing policy refusals ({int(pr["total"])})</h2>')
    if pr["by_rule"]:
        out.append(_table(["Profile", "Rule", "Count"], [[i["profile"], i["rule"], i["count"]] for i in pr["by_rule"]],
                          num=(2,), table_id="policy-refusals-table"))
    else:
        out.append('<p class="muted">None.</p>')
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
        out.append("</section>")

    data = json.dumps(r, separators=(",", ":")).replace("</", "<\\/")
    out.append(f'<script type="application/json" id="report-data">{data}</script>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"
