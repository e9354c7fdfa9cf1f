"""One review for many hosts: logs collected from a fleet, each host's chain verified on its own.

The layout (what rsync or a syslog collector gives you)::

    DIR/                           --host-logs DIR
      bot-1/                       one folder per host; its name is the host's name in the report
        audit.log                  every file of that host's log, in any names (``audit.log``,
        audit.log.20261117T000012Z  ``audit.log.1`` from logrotate, ...): ordered by the first
        audit.log.head             record each holds; ``*.head``/``*.lock`` are not records (a head
      bot-2/                       file beside the newest file is checked like on the host)
        audit.log

``NAME=PATH`` names one host explicitly (PATH a file or such a folder).

Each host is its own chain: it is verified alone, its report built alone (its
own baseline, its own "new command" history), then the reports are merged row
by row with a ``host`` column. A broken chain on one host is that host's
finding; the other hosts' sections are still there. Anchors in Vault are
compared per host (``PREFIX/<host>/<key id>-<log id>``, the place each host's
writer anchors under).

Hosts are reported in parallel, one process per host at a time on each CPU;
each process streams its host's files (the chain check, then the report's
scan), so memory is bounded by the number of CPUs, not by the logs' size.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import AuditError
from .model import FINDING_ORDER, Report, SummaryItem

#: Files in a host folder that are not records.
NOT_RECORDS = (".head", ".lock", ".tmp")
#: Files a collector's logrotate may have compressed: refused by name rather than read as garbage.
COMPRESSED = (".gz", ".xz", ".bz2", ".zst", ".lz4")
#: Rows kept per merged list (counts stay exact), like one host's report.
LIST_CAP = 200


@dataclass(frozen=True)
class HostLog:
    """One host's collected log: its name and its files in chain order."""

    host: str
    files: tuple[Path, ...]
    #: the newest file, when a head file sits beside it (then the head is checked too)
    active: Path | None = None


def _host_files(host: str, path: Path) -> HostLog:
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = sorted(p for p in path.iterdir()
                            if (p.is_file() or (p.is_symlink() and not p.is_dir()))  # a dangling link: reported
                            and not p.name.startswith(".") and not p.name.endswith(NOT_RECORDS))
    else:
        raise AuditError(f"--host-logs: no such file or folder: {path}", "check the path of the collected logs")
    if not candidates:
        raise AuditError(f"--host-logs: host {host}: no log file in {path}",
                         "copy the host's audit.log* files there, or leave the folder out")
    for p in candidates:
        if p.name.endswith(COMPRESSED):
            raise AuditError(f"--host-logs: host {host}: {p} is compressed",
                             f"decompress it first (e.g. `gzip -d {p}`), or move it out of the folder")
        try:
            with p.open("rb"):
                pass
        except OSError as exc:
            raise AuditError(f"--host-logs: host {host}: cannot read {p}: {exc.strerror or exc}",
                             "check the file's permissions") from exc
    from .files import first_header

    firsts = [(first_header(p), i, p) for i, p in enumerate(candidates)]
    if all(h is None for h, _, _ in firsts):
        raise AuditError(f"--host-logs: host {host}: no audit record in {path} (its first line is not one)",
                         "point --host-logs at folders of credbroker audit logs, one folder per host")
    ordered = [p for _, p in sorted(((0, h.seq, i) if h else (1, 0, i), p) for h, i, p in firsts)]
    newest = ordered[-1]
    active = newest if Path(str(newest) + ".head").exists() else None
    return HostLog(host, tuple(ordered), active)


def discover(specs: Iterable[str]) -> list[HostLog]:
    """Hosts from ``--host-logs`` values: ``DIR`` (one subfolder per host) or ``NAME=PATH``."""
    hosts: list[HostLog] = []
    for spec in specs:
        name, eq, rest = spec.partition("=")
        if eq and name and "/" not in name:
            hosts.append(_host_files(name, Path(rest).expanduser()))
            continue
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise AuditError(f"--host-logs: no such folder: {folder}",
                             "give a folder holding one subfolder per host, or NAME=FILE")
        subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not subs:
            raise AuditError(f"--host-logs: {folder} has no host folders",
                             "lay the logs out as DIR/HOST/audit.log*, one folder per host")
        hosts.extend(_host_files(p.name, p) for p in subs)
    seen: set[str] = set()
    for h in hosts:
        if h.host in seen:
            raise AuditError(f"--host-logs: host {h.host} is given twice", "give each host once")
        seen.add(h.host)
    if not hosts:
        raise AuditError("--host-logs: no host given", "give --host-logs DIR")
    return hosts


# -- one host, in a worker process -----------------------------------------------------------
@dataclass(frozen=True)
class HostJob:
    """What a worker needs to report on one host (picklable)."""

    log: HostLog
    since: datetime
    until: datetime
    key: bytes | None = None
    work_hours: tuple[int, int] | None = None
    burst: int = 10
    rotate_days: int = 90
    anchors: tuple[Any, ...] | None = None
    anchor_place: str = ""
    anchor_error: str | None = None


@dataclass(frozen=True)
class HostResult:
    """One host's report, or the one-line error that stopped it."""

    host: str
    report: Report | None
    vault_reads: tuple[tuple[str, str, int | None, str | None], ...] = ()
    error: tuple[str, str | None] | None = None
    anchor_error: str | None = None
    #: ``verify`` only: the chain's result as a dict, with its one-line ``summary``
    chain: dict[str, Any] | None = None


def verify_host(log: HostLog, key: bytes | None, anchors: Sequence[Any] | None = None,
                anchor_place: str = "") -> Any:
    """One host's chain (``verify.VerifyResult``), streaming."""
    return host_verifier(log, key, anchors, anchor_place).check(list(log.files))


def host_verifier(log: HostLog, key: bytes | None, anchors: Sequence[Any] | None = None,
                  anchor_place: str = "") -> Any:
    """A ``verify.Verifier`` for one host's files (its head checked when one was collected)."""
    from .verify import make_verifier

    # The anchors were read from this host's own place (host, key id, log id): the log path they name is
    # the path on the host, never the collector's copy, so it is not compared.
    mine = [a._replace(log=None) for a in anchors] if anchors is not None else None
    return make_verifier(log.active, list(log.files), key, anchors=mine, anchor_place=anchor_place)


def report_host(job: HostJob) -> HostResult:
    """Verify one host's chain, then stream its records into a report of its own."""
    from ..errors import BrokerError
    from .report import BEFORE_PERIOD_EVENTS, ReportBuilder, iso

    try:
        verifier = host_verifier(job.log, job.key, job.anchors, job.anchor_place)
        builder = ReportBuilder(since=job.since, until=job.until, work_hours=job.work_hours, burst=job.burst,
                                rotate_days=job.rotate_days)
        feed = builder.feed
        # One pass: every record verified; the report sees the period and what it needs from before.
        for ts, event, line in verifier.walk_records(list(job.log.files), since=iso(job.since),
                                                     keep=BEFORE_PERIOD_EVENTS):
            feed(ts, event, line)
        report = builder.result(verifier.result().to_dict(), None, files=job.log.files)
    except BrokerError as exc:
        return HostResult(job.log.host, None, error=(exc.message, exc.remedy))
    except OSError as exc:
        return HostResult(job.log.host, None, error=(f"cannot read {exc.filename}: {exc.strerror or exc}",
                                                     "check the file's permissions"))
    return HostResult(job.log.host, report, tuple(builder.vault_reads), anchor_error=job.anchor_error)


def verify_job(job: HostJob) -> HostResult:
    """One host's chain only (``audit verify --host-logs``)."""
    from ..errors import BrokerError

    try:
        result = verify_host(job.log, job.key, job.anchors, job.anchor_place)
    except BrokerError as exc:
        return HostResult(job.log.host, None, error=(exc.message, exc.remedy))
    return HostResult(job.log.host, None, anchor_error=job.anchor_error,
                      chain={**result.to_dict(), "summary": result.summary()})


def run_jobs(jobs: Sequence[HostJob], workers: int | None = None,
             work: Callable[[HostJob], HostResult] = report_host) -> list[HostResult]:
    """``work`` for every job, one process per CPU (in the order given); one host alone runs here."""
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        return [work(j) for j in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx: Any
    try:
        ctx = multiprocessing.get_context("fork")
    except ValueError:
        ctx = multiprocessing.get_context()
    # The largest hosts first, so that no worker is left with a big host at the end while the others
    # idle; the results come back in the order given.
    order = sorted(range(len(jobs)), key=lambda n: -_log_size(jobs[n].log))
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        done = list(pool.map(work, [jobs[n] for n in order], chunksize=1))
    results: list[HostResult | None] = [None] * len(jobs)
    for n, r in zip(order, done):
        results[n] = r
    return [r for r in results if r is not None]


def _log_size(log: HostLog) -> int:
    """A host's bytes on disk (unreadable files count 0: the worker reports them)."""
    total = 0
    for p in log.files:
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total


#: Per host: (its Vault anchors, or None when not compared; their place; why they could not be read).
AnchorsByHost = Mapping[str, tuple[Sequence[Any] | None, str, str | None]]


def host_anchors(settings: Any, env: Mapping[str, str], key: bytes | None, wanted: bool | None,
                 hosts: Sequence[HostLog], vault: Any = None) -> AnchorsByHost:
    """Each host's anchors (``anchor.read_host``), when asked (``wanted``) or by default for a keyed log
    with ``[audit] anchor`` on and a Vault address. A host whose anchors cannot be read is reported
    as such; the other hosts are still compared. ``vault``: the command's Vault settings when it has
    resolved them already (the report's Vault cross-check); else they are resolved here, once."""
    from ..errors import BrokerError, ConfigError
    from .anchor import read_host, vault_configured

    if wanted is False:
        return {}
    usable = key is not None and settings.anchor is not None
    if wanted is None and (not usable or not vault_configured(env)):
        return {}
    if not usable:
        raise ConfigError("--vault-anchors: [audit] anchor is off, or the log is not keyed",
                          'set [audit] anchor = "secret/credbroker-audit" and an audit key')
    if not vault_configured(env):
        raise ConfigError("--vault-anchors: no Vault address", "set VAULT_ADDR, or [vault] addr in the config")
    from ..vault.settings import VaultSettings

    out: dict[str, tuple[Sequence[Any] | None, str, str | None]] = {}
    if vault is None:
        try:
            vault = VaultSettings.from_env(env)  # once for every host
        except BrokerError as exc:
            return {h.host: (None, "", f"cannot read them: {exc}") for h in hosts}
    for h in hosts:
        try:
            got, place = read_host(vault, settings, h.host, key)
            out[h.host] = (got, place, None)
        except BrokerError as exc:
            out[h.host] = (None, "", f"cannot read them: {exc}")
    return out


def make_jobs(hosts: Sequence[HostLog], *, since: datetime, until: datetime, key: bytes | None = None,
              anchors: AnchorsByHost | None = None, work_hours: tuple[int, int] | None = None, burst: int = 10,
              rotate_days: int = 90) -> list[HostJob]:
    """One job per host, with that host's anchors."""
    jobs = []
    for h in hosts:
        got, place, err = (anchors or {}).get(h.host, (None, "", None))
        jobs.append(HostJob(h, since, until, key, work_hours, burst, rotate_days,
                            tuple(got) if got is not None else None, place, err))
    return jobs


def fleet_report(hosts: Sequence[HostLog], *, since: datetime, until: datetime, key: bytes | None = None,
                 work_hours: tuple[int, int] | None = None, burst: int = 10, rotate_days: int = 90,
                 anchors: AnchorsByHost | None = None, vault_audit: Path | None = None,
                 vault_paths: Iterable[str] = (), vault_token_hash: str | None = None,
                 workers: int | None = None) -> Report:
    """The merged report over ``hosts`` (each verified and reported alone); raises on unreadable input."""
    jobs = make_jobs(hosts, since=since, until=until, key=key, anchors=anchors, work_hours=work_hours, burst=burst,
                     rotate_days=rotate_days)
    results = run_jobs(jobs, workers)
    for r in results:
        if r.error is not None:
            raise AuditError(f"host {r.host}: {r.error[0]}", r.error[1] or "check that host's files")
    vault = None
    if vault_audit is not None:
        from .vaultcheck import cross_check

        reads = [read for r in results for read in r.vault_reads]
        known = set(vault_paths) | {read[0] for read in reads}
        from .report import iso

        vault = cross_check(vault_audit, sorted(reads, key=lambda x: x[1]), known, since=iso(since),
                            until=iso(until), token_hash=vault_token_hash)
    return merge([(r.host, r.report, r.anchor_error) for r in results if r.report is not None], vault)


# -- merging -------------------------------------------------------------------------------------
def _with_host(row: Any, host: str) -> Any:
    if isinstance(row, dict):
        return {"host": host, **row} if "host" not in row else {**row, "log_host": host}
    return row


def _rows(values: Sequence[tuple[str, Any]]) -> list[Any]:
    return [_with_host(row, h) for h, v in values for row in (v or [])]


def _merge_block(values: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    first = values[0][1]
    out: dict[str, Any] = {}
    for key, value in first.items():
        column = [(h, v.get(key)) for h, v in values]
        if key == "items":
            rows = _rows(column)
            out[key] = rows[:LIST_CAP]
        elif isinstance(value, list):
            out[key] = _rows(column)
        elif key == "total":
            out[key] = sum(int(v or 0) for _, v in column)
        elif key == "note":  # "not enough history" only when no host has enough
            notes = [v for _, v in column]
            out[key] = "" if "" in notes else value
        else:
            out[key] = value
    if "truncated" in out:
        out["truncated"] = out.get("total", 0) > len(out.get("items", []))
    return out


def _merge_section(name: str, values: Sequence[tuple[str, Any]]) -> Any:
    first = values[0][1]
    if name == "events":
        total: Counter[str] = Counter()
        for _, v in values:
            total.update(v)
        return dict(sorted(total.items()))
    if name == "daily":
        days: dict[str, dict[str, Any]] = {}
        for _, v in values:
            for day in v:
                cur = days.setdefault(day["date"], {"date": day["date"]})
                for k, n in day.items():
                    if k != "date":
                        cur[k] = cur.get(k, 0) + n
        return [days[d] for d in sorted(days)]
    if isinstance(first, list):
        return _rows(values)
    if isinstance(first, dict):
        return _merge_block(values)
    return first


def _merge_chain(chains: Sequence[tuple[str, Mapping[str, Any], str | None]]) -> dict[str, Any]:
    per_host = []
    for h, c, anchor_error in chains:
        per_host.append({"host": h, **c, "anchors_error": anchor_error})
    broken = [c for c in per_host if not c.get("ok")]
    problem = broken[0].get("problem") if broken else None
    return {
        "ok": not broken and all(c["anchors_error"] is None for c in per_host),
        "status": ("broken" if any(c.get("status") == "broken" for c in broken) else broken[0]["status"])
                  if broken else ("intact" if any(c.get("status") == "intact" for c in per_host) else "empty"),
        "records": sum(int(c.get("records") or 0) for c in per_host),
        "files": [f for c in per_host for f in c.get("files", [])],
        "first_seq": None, "last_seq": None, "alg": None, "key_id": per_host[0].get("key_id"),
        "problem": {"host": broken[0]["host"], **problem} if problem else None,
        "notes": [{"host": c["host"], **n} for c in per_host for n in c.get("notes", [])],
        "gaps": [{"host": c["host"], **g} for c in per_host for g in c.get("gaps", [])],
        "anchors_checked": sum(c["anchors_checked"] for c in per_host if c.get("anchors_checked") is not None)
        if any(c.get("anchors_checked") is not None for c in per_host) else None,
        "broken_hosts": [c["host"] for c in broken],
        "hosts": per_host,
    }


def _merge_summary(reports: Sequence[tuple[str, Report]], chain: Mapping[str, Any],
                   findings: int, vault: Mapping[str, Any] | None) -> tuple[SummaryItem, ...]:
    out = []
    for item in reports[0][1].summary:
        items = [(h, r.item(item.name)) for h, r in reports]
        known = [i.count for _, i in items if i.count is not None]
        if item.name == "broken":
            count: int | None = len(chain["broken_hosts"])
            note = (f"host(s) {', '.join(chain['broken_hosts'])}" if chain["broken_hosts"] else "intact on every host")
        elif item.name == "findings":
            count, note = findings, ""
        elif item.name == "unmatched-reads":
            count = int(vault["unmatched_total"]) if vault is not None else None
            note = "" if vault is not None else item.note
        elif not known:
            count, note = None, item.note
        else:
            count = sum(known)
            unknown = [h for h, i in items if i.count is None]
            note = f"not known for {', '.join(unknown)}: {items[0][1].note or 'not enough history yet'}" \
                if unknown else item.note
        label = "hosts whose audit chain is not intact" if item.name == "broken" else item.label
        out.append(SummaryItem(item.name, label, count, item.anchor, note))
    return tuple(out)


def merge(reports: Sequence[tuple[str, Report, str | None]], vault: Mapping[str, Any] | None = None) -> Report:
    """One report from hosts' reports: rows carry a ``host``; counts add up; chains stay per host."""
    if not reports:
        raise AuditError("--host-logs: no host to report on", "give --host-logs DIR")
    pairs = [(h, r) for h, r, _ in reports]
    chain = _merge_chain([(h, r.chain, err) for h, r, err in reports])
    order = {k: i for i, k in enumerate(FINDING_ORDER)}
    findings = tuple(sorted((replace(f, host=f.host or h) for h, r in pairs for f in r.findings),
                            key=lambda f: (order[f.kind], f.host or "", f.first)))
    failures = tuple(sorted((replace(g, hosts=(h,)) for h, r in pairs for g in r.failures),
                            key=lambda g: (-g.count, g.label, g.hosts)))
    names = list(pairs[0][1].sections)
    for _, r in pairs[1:]:
        names += [n for n in r.sections if n not in names]
    sections: dict[str, Any] = {}
    for name in names:
        values = [(h, r.sections[name]) for h, r in pairs if name in r.sections]
        sections[name] = _merge_section(name, values)
    if vault is not None:
        sections["vault_audit"] = dict(vault)
    sections["fleet"] = True
    sections["hosts"] = [
        {"host": h, "chain": c["status"], "ok": c["ok"], "records": c.get("records"),
         "records_in_period": r.records_in_period, "files": len(r.files),
         "problem": c.get("problem"), "gaps": len(c.get("gaps") or []),
         "anchors_checked": c.get("anchors_checked"), "anchors_error": c.get("anchors_error"),
         "signature_failures": r.failure_total, "findings": len(r.findings)}
        for (h, r), c in zip(pairs, chain["hosts"])]
    return Report(
        since=pairs[0][1].since, until=pairs[0][1].until,
        files=tuple(f for _, r in pairs for f in r.files),
        records_in_period=sum(r.records_in_period for _, r in pairs), chain=chain,
        summary=_merge_summary(pairs, chain, len(findings), vault),
        findings=findings, failures=failures, failure_total=sum(r.failure_total for _, r in pairs),
        sections=sections)
