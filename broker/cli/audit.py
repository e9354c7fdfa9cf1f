"""``credbroker audit``: verify the chain, the weekly review report, reading records, retention.

Thin: parses, calls ``broker.audit``, prints. Exit codes: ``verify`` 0 when
the chain is intact (a crash's partial tail is a note, not a failure), 1 when
not; ``report`` 0 unless ``--fail-on`` names a count that is not 0 (then 1);
every command 125 when it cannot run at all (bad config, key not fetchable,
no log).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timedelta, timezone
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import click

from . import json_flag
from ..audit.review import fail_on_names, parse_since
from ..errors import AuditError, ConfigError


def _context(ctx: click.Context) -> tuple[Any, Mapping[str, str], Any]:
    """(settings, env) from the config file the root command was given."""
    from ..audit.settings import load_settings
    from ..config import load
    from ..config import with_config_defaults

    root = ctx.find_root().obj or {}
    config = load(root.get("config_path"))
    env = with_config_defaults(os.environ, config)
    return load_settings(config.audit or None, env), env, config


def _key_bytes(settings: Any, env: Mapping[str, str]) -> bytes | None:
    from ..audit.keys import resolve_key

    secret = resolve_key(settings.key_spec, env)
    if secret is None:
        return None
    try:
        return secret.reveal()
    finally:
        secret.wipe()


@click.group("audit")
def audit() -> None:
    """Verify the audit log and produce the weekly review.

    \b
    The log: [audit] path, else $CREDBROKER_AUDIT_LOG, else
    $XDG_STATE_HOME/credbroker/audit.log (~/.local/state/credbroker/audit.log).
    A keyed chain needs the key: $CREDBROKER_AUDIT_KEY (hex) or [audit] key.
    """


_HOST_LOGS = click.option(
    "--host-logs", "host_logs", multiple=True, metavar="DIR|NAME=PATH",
    help="Logs collected from several hosts: DIR holds one folder per host (DIR/HOST/audit.log*), or NAME=PATH "
         "names one host's file or folder (repeatable). Each host's chain is checked on its own.")


@audit.command("verify")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@_HOST_LOGS
@json_flag("Print JSON.")
@click.option("--vault-anchors/--no-vault-anchors", "vault_anchors", default=None,
              help="Compare the chain with its anchors in Vault. Default: on for a keyed log when [audit] "
                   "anchor is not off and a Vault address is set.")
@click.pass_context
def verify_cmd(ctx: click.Context, files: tuple[Path, ...], host_logs: tuple[str, ...], as_json: bool,
               vault_anchors: bool | None) -> None:
    """Check the hash chain of the log (or of FILE...); exit 0 when intact, 1 when not.

    Names the first edited, deleted, inserted, reordered or forged record with
    its file and line, and every gap a writer recorded (records lost: exit 1,
    acknowledged or not). A partial last line left by a crash is reported as a
    note, not as tampering. With Vault anchors, records cut after the last
    anchor are caught even when every local file was rewritten.
    """
    from ..audit.verify import verify_files

    settings, env, _ = _context(ctx)
    key = _key_bytes(settings, env)
    if host_logs:
        if files:
            raise ConfigError("give FILE... or --host-logs, not both", "verify one host's files, or the fleet")
        _verify_fleet(host_logs, settings, env, key, vault_anchors, as_json)
    anchors, place, anchor_error = _read_anchors(settings, env, key, vault_anchors)
    if not files and not anchors and _never_written(settings.path):
        _nothing_recorded(settings.path, as_json)  # a new install, not an erased log: no head, no anchor
    result = verify_files(list(files) or None, active=settings.path, key=key, anchors=anchors, anchor_place=place)
    ok = result.ok and anchor_error is None
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "ok": ok, "anchors_error": anchor_error}, indent=2))
    else:
        click.echo(result.summary())
        for gap in result.gaps:
            if gap is not result.problem:
                click.echo(f"  gap: {gap.where()}: {gap.message}")
        for note in result.notes:
            click.echo(f"  note: {note.where()}: {note.message}")
        if anchor_error is not None:
            click.echo(f"  anchors: NOT checked: {anchor_error}")
    sys.exit(0 if ok else 1)


def _verify_fleet(specs: tuple[str, ...], settings: Any, env: Mapping[str, str], key: bytes | None,
                  wanted: bool | None, as_json: bool) -> NoReturn:
    """``verify --host-logs``: one line per host; exit 1 when any host's chain (or its anchors) is not intact."""
    from ..audit.fleet import discover, host_anchors, make_jobs, run_jobs, verify_job

    hosts = discover(specs)
    now = datetime.now(timezone.utc)
    jobs = make_jobs(hosts, since=now, until=now, key=key, anchors=host_anchors(settings, env, key, wanted, hosts))
    results = run_jobs(jobs, work=verify_job)
    rows = []
    for r in results:
        if r.error is not None:
            raise AuditError(f"host {r.host}: {r.error[0]}", r.error[1] or "check that host's files")
        rows.append((r.host, r.chain or {}, r.anchor_error))
    ok = all(c["ok"] and err is None for _, c, err in rows)
    if as_json:
        click.echo(json.dumps({"ok": ok, "hosts": [{"host": h, **c, "ok": c["ok"] and err is None,
                                                     "anchors_error": err} for h, c, err in rows]}, indent=2))
    else:
        for h, c, err in rows:
            click.echo(f"{h}: {c['summary']}")
            for gap in c["gaps"]:
                if gap != c["problem"]:
                    click.echo(f"  {h}: gap: {gap['file']}:{gap['line']}: {gap['message']}")
            for note in c["notes"]:
                click.echo(f"  {h}: note: {note['file']}:{note['line']}: {note['message']}")
            if err is not None:
                click.echo(f"  {h}: anchors: NOT checked: {err}")
        bad = [h for h, c, err in rows if not (c["ok"] and err is None)]
        click.echo(f"{len(rows)} host(s): " + (f"NOT intact on {', '.join(bad)}" if bad else "every chain intact"))
    sys.exit(0 if ok else 1)


def _never_written(active: Path) -> bool:
    """No log file and no head file: nothing was ever recorded here (a removed log leaves its head, which
    verify reports as a gap; a log removed with its head is caught by the Vault anchors, when kept)."""
    from ..audit.files import log_set

    return not log_set(active) and not Path(str(active) + ".head").exists()


def _nothing_recorded(active: Path, as_json: bool) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"ok": True, "records": 0, "nothing_recorded": True, "log": str(active)}))
    else:
        click.echo(f"nothing recorded yet at {active} (credbroker writes there at the first run, check or import)")
    sys.exit(0)


def _read_anchors(settings: Any, env: Mapping[str, str], key: bytes | None, wanted: bool | None
                  ) -> tuple[list[Any] | None, str, str | None]:
    """(anchors or None when not checked, their place, why they could not be read)."""
    from ..audit.anchor import place_for, read_all, vault_configured
    from ..errors import BrokerError

    from ..audit.keys import key_id

    if wanted is False:
        return None, "", None
    place = place_for(settings, key_id(key) if key is not None else None)
    if wanted is None and (key is None or place is None or not vault_configured(env)):
        return None, "", None
    if place is None:
        raise ConfigError("--vault-anchors: [audit] anchor is off, or the log is not keyed",
                          'set [audit] anchor = "secret/credbroker-audit" and an audit key')
    if not vault_configured(env):
        raise ConfigError("--vault-anchors: no Vault address", "set VAULT_ADDR, or [vault] addr in the config")
    try:
        from ..vault.settings import VaultSettings

        return read_all(VaultSettings.from_env(env), place, key), str(place), None
    except BrokerError as exc:
        if wanted:
            raise AuditError(f"cannot read the audit anchors at {place}: {exc.message}",
                             exc.remedy or "check the token's policy (credbroker-audit-anchor)") from exc
        return None, str(place), f"cannot read them at {place}: {exc}"


@audit.command("acknowledge-gap")
@click.option("--reason", required=True, metavar="TEXT", help="What happened, and who checked it (recorded).")
@click.pass_context
def acknowledge_gap_cmd(ctx: click.Context, reason: str) -> None:
    """Let a keyed log take records again after a recorded gap (the acknowledgment is recorded).

    A writer that finds records missing (the log shorter than its head, the
    head or the active file gone) records a `gap` and, in a keyed log, refuses
    every later record until this is run. `credbroker audit verify` keeps
    reporting the gap: the records it names are lost.
    """
    from .. import audit as audit_pkg

    _, env, config = _context(ctx)
    log = audit_pkg.open_log(config.audit or None, env=env)
    acked = log.acknowledge_gap(reason)
    if acked is None:
        click.echo(f"audit log {log.path}: no unacknowledged gap; nothing to do")
        return
    click.echo(f"audit log {log.path}: gap at seq {acked['data']['gap_seq']} acknowledged (record seq {acked['seq']})")


@audit.command("report")
@click.option("--since", default="7d", show_default=True, metavar="AGE|DATE",
              help="Start of the period: 7d, 24h, 2w ago, or an ISO date (UTC).")
@click.option("--until", "until_text", default=None, metavar="DATE", help="End of the period (default: now).")
@json_flag("Print the report as JSON.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              metavar="FILE", help="Also write a self-contained HTML page with a daily-activity chart.")
@click.option("--vault-audit", "vault_audit", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              metavar="FILE", help="Vault's file audit device log: flag reads of bot secrets the broker did not make.")
@click.option("--vault-audit-device", default="file", show_default=True, metavar="PATH",
              help="The audit device's path in Vault (for sys/audit-hash).")
@click.option("--work-hours", metavar="HH-HH", help="Usual UTC hours (default: [audit] work_hours, else learned).")
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Active log file to read (default: the configured one).")
@_HOST_LOGS
@click.option("--fail-on", "fail_on", metavar="NAME,...",
              help="Exit 1 when any of these summary counts is not 0 (e.g. broken,signature-failures,"
                   "unmatched-reads; 'all' for every one). Without it the exit status is 0.")
@click.option("--burst", default=10, show_default=True, type=click.IntRange(1, 100000), metavar="N",
              help="A finding when one profile has more than N signature failures within a minute.")
@click.option("--rotate-days", default=90, show_default=True, type=click.IntRange(1, 100000), metavar="DAYS",
              help="Count keys whose newest version is older than this.")
@click.pass_context
def report_cmd(ctx: click.Context, since: str, until_text: str | None, as_json: bool, html_file: Path | None,
               vault_audit: Path | None, vault_audit_device: str, work_hours: str | None,
               log_path: Path | None, host_logs: tuple[str, ...], fail_on: str | None, burst: int,
               rotate_days: int) -> None:
    """The weekly review: a verdict, findings, signature failures with what to check, then the detail.

    \b
    Exit status: 0 (whatever the report holds) unless --fail-on names a count
    that is not 0: then 1; 125 when the report cannot be made.
    """
    from ..audit.files import log_set
    from ..audit.report import build_report, render_text
    from ..audit import review
    from ..audit.settings import parse_hours

    names = fail_on_names(fail_on)
    if vault_audit is None and "unmatched-reads" in names:
        if fail_on and "all" in [n.strip() for n in fail_on.split(",")]:
            names.remove("unmatched-reads")  # "all" means every count this run can know
        else:  # a cron line that forgot the file must not pass in silence
            raise ConfigError("--fail-on unmatched-reads needs --vault-audit FILE",
                              "add --vault-audit with Vault's file audit device log")
    settings, env, config = _context(ctx)
    now = datetime.now(timezone.utc)
    until = parse_since(until_text, now) if until_text else now
    start = parse_since(since, until)
    if start >= until:
        raise ConfigError("--since is not before --until", "give an earlier --since")
    if host_logs and log_path:
        raise ConfigError("give --log or --host-logs, not both", "report on this host's log, or on the fleet")
    active = log_path.expanduser().absolute() if log_path else settings.path
    files = log_set(active) if not host_logs else []
    if not files and not host_logs:
        if _never_written(active):
            _nothing_recorded(active, as_json)
        raise AuditError(f"no audit log at {active}, but its head file is there: the log was removed",
                         "treat it as tampering; `credbroker audit verify` says more")
    hours = parse_hours(work_hours, "--work-hours") if work_hours else settings.work_hours
    token_hash = None
    paths: list[str] = []
    vault = review.vault_settings(env) if vault_audit is not None or not host_logs else None  # once
    if vault_audit is not None:
        paths = review.vault_paths(config)
        token_hash = review.token_hash(vault, vault_audit_device)  # None: reads are not attributed to a token
    key = _key_bytes(settings, env)
    if host_logs:
        from ..audit.fleet import discover, fleet_report, host_anchors

        hosts = discover(host_logs)
        report = fleet_report(hosts, since=start, until=until, key=key, work_hours=hours, burst=burst,
                              rotate_days=rotate_days, anchors=host_anchors(settings, env, key, None, hosts, vault),
                              vault_audit=vault_audit, vault_paths=paths, vault_token_hash=token_hash)
    else:
        report = build_report(files, since=start, until=until, key=key, active=active,
                              work_hours=hours, vault_audit=vault_audit, vault_paths=paths,
                              vault_token_hash=token_hash, burst=burst, rotate_days=rotate_days,
                              kv_versions=review.kv_versions(config, vault))
    if html_file is not None:
        review.write_html(report, html_file)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(render_text(report), nl=False)
        if html_file is not None:
            click.echo(f"HTML report written to {html_file}")
    failing = report.present(names)
    if failing:
        click.echo(f"credbroker: --fail-on: {', '.join(failing)}", err=True)
        sys.exit(1)


def _record_filter(events: tuple[str, ...], profiles: tuple[str, ...], since: str | None, until_text: str | None,
                   seqs: tuple[int, ...]) -> Any:
    from ..audit.report import iso
    from ..audit.show import RecordFilter

    now = datetime.now(timezone.utc)
    until = parse_since(until_text, now) if until_text else None
    start = parse_since(since, until or now) if since else None
    return RecordFilter(events=frozenset(events), profiles=frozenset(profiles),
                        since=iso(start) if start else None, until=iso(until) if until else None,
                        seqs=frozenset(seqs))


def _printer(as_json: bool) -> Any:
    from ..audit.show import format_record

    def emit(rec: dict[str, Any]) -> None:
        click.echo(json.dumps(rec, separators=(",", ":")) if as_json else format_record(rec))
        sys.stdout.flush()

    return emit


_FILTERS = [
    click.option("--event", "events", multiple=True, metavar="NAME",
                 help="Only this event (repeatable), e.g. signature_failure."),
    click.option("--profile", "profiles", multiple=True, metavar="NAME", help="Only this profile (repeatable)."),
    click.option("--since", default=None, metavar="AGE|DATE", help="From 7d/24h ago, or an ISO date (UTC)."),
    click.option("--until", "until_text", default=None, metavar="DATE", help="Up to this time."),
    click.option("--seq", "seqs", multiple=True, type=int, metavar="N",
                 help="Only the record with this sequence number (repeatable)."),
    json_flag("One JSON record per line, as written."),
    click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
                 help="Active log file to read (default: the configured one)."),
]


def _with_filters(fn: Any) -> Any:
    for option in reversed(_FILTERS):
        fn = option(fn)
    return fn


def _active(ctx: click.Context, log_path: Path | None) -> Path:
    settings, _env, _config = _context(ctx)
    return log_path.expanduser().absolute() if log_path else Path(settings.path)


@audit.command("show")
@_with_filters
@click.pass_context
def show_cmd(ctx: click.Context, events: tuple[str, ...], profiles: tuple[str, ...], since: str | None,
             until_text: str | None, seqs: tuple[int, ...], as_json: bool, log_path: Path | None) -> None:
    """Print the log's records (all files, oldest first), filtered; no chain check (see verify)."""
    from ..audit.files import log_set
    from ..audit.show import records

    active = _active(ctx, log_path)
    files = log_set(active)
    if not files:
        click.echo(f"nothing recorded yet ({active} does not exist)", err=True)
        return
    emit = _printer(as_json)
    for rec in records(files, _record_filter(events, profiles, since, until_text, seqs)):
        emit(rec)


@audit.command("tail")
@_with_filters
@click.option("-n", "count", default=10, show_default=True, type=click.IntRange(0, 10**9),
              help="How many of the last matching records to print first.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new matching records as they are written.")
@click.pass_context
def tail_cmd(ctx: click.Context, events: tuple[str, ...], profiles: tuple[str, ...], since: str | None,
             until_text: str | None, seqs: tuple[int, ...], as_json: bool, log_path: Path | None, count: int,
             follow: bool) -> None:
    """The last records (like tail); --follow waits for new ones until interrupted."""
    from ..audit.show import follow as follow_log
    from ..audit.show import last

    active = _active(ctx, log_path)
    keep = _record_filter(events, profiles, since, until_text, seqs)
    emit = _printer(as_json)
    for rec in last(active, keep, count):
        emit(rec)
    if follow:
        try:
            follow_log(active, keep, emit)
        except KeyboardInterrupt:
            sys.exit(130)


@audit.command("prune")
@click.option("--keep", "keep_text", default=None, metavar="AGE",
              help="Keep rotated files with records newer than this (default: [audit] keep, 90d).")
@click.option("--dry-run", is_flag=True, help="Only say which files would go.")
@json_flag("Print JSON.")
@click.pass_context
def prune_cmd(ctx: click.Context, keep_text: str | None, dry_run: bool, as_json: bool) -> None:
    """Remove rotated log files older than --keep; what remains still verifies."""
    from .. import audit as audit_pkg
    from ..audit.prune import prune
    from .. import units

    settings, env, config = _context(ctx)
    keep: timedelta = units.duration(keep_text, "--keep") if keep_text else settings.keep
    log = audit_pkg.open_log(config.audit or None, env=env)
    result = prune(log, keep, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "dry_run": dry_run}, indent=2))
        return
    if not result.removed:
        click.echo(f"nothing to prune ({result.kept} rotated file(s), all newer than {keep.days}d)")
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(result.removed)} file(s) through seq {result.through_seq}; kept {result.kept}")
    for name in result.removed:
        click.echo(f"  {name}")


@audit.command("enable-key")
@click.pass_context
def enable_key_cmd(ctx: click.Context) -> None:
    """Continue an unkeyed log with the configured key (an explicit, recorded switch).

    Writers never switch on their own: someone who re-chained the file without
    the key must not get that history accepted by the next keyed writer. Run
    `credbroker audit verify` first.
    """
    from .. import audit as audit_pkg

    settings, env, config = _context(ctx)
    if settings.key_spec is None and not env.get("CREDBROKER_AUDIT_KEY"):
        raise AuditError("no audit key is configured", "set [audit] key or CREDBROKER_AUDIT_KEY")
    log = audit_pkg.open_log(config.audit or None, env=env)
    if log.enable_key():
        click.echo(f"audit log {log.path}: keyed from seq {log.last_seq()} on, key id {log.key_id}")
    else:
        click.echo(f"audit log {log.path}: already keyed or empty (key id {log.key_id}); nothing to do")
