"""``credbroker audit``: verify the chain, the weekly review report, retention.

Thin: parses, calls ``broker.audit``, prints. Exit codes: ``verify`` 0 when
the chain is intact (a crash's partial tail is a note, not a failure), 1 when
not; every command 125 when it cannot run at all (bad config, key not
fetchable, no log).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import click

from .errors import AuditError, ConfigError


def _context(ctx: click.Context) -> tuple[Any, dict[str, str], Any]:
    """(settings, env) from the config file the root command was given."""
    from .audit.settings import load_settings
    from .config import load
    from .config import with_config_defaults

    root = ctx.find_root().obj or {}
    config = load(root.get("config_path"))
    env = with_config_defaults(os.environ, config)
    return load_settings(config.audit or None, env), env, config


def _key_bytes(settings: Any, env: dict[str, str]) -> bytes | None:
    from .audit.keys import resolve_key

    secret = resolve_key(settings.key_spec, env)
    if secret is None:
        return None
    try:
        return secret.reveal()
    finally:
        secret.wipe()


def _parse_since(text: str, now: datetime) -> datetime:
    """``7d`` / ``12h`` (ago) or an ISO date/time (UTC)."""
    from .audit.settings import parse_duration

    if text and text[-1] in "smhdw" and text[:-1].strip().isdigit():
        return now - parse_duration(text, "--since")
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--since {text!r}: not a duration or a date", "write e.g. 7d, 24h or 2026-11-17") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


@click.group("audit")
def audit() -> None:
    """Verify the audit log and produce the weekly review.

    \b
    The log: [audit] path, else $CREDBROKER_AUDIT_LOG, else
    $XDG_STATE_HOME/credbroker/audit.log (~/.local/state/credbroker/audit.log).
    A keyed chain needs the key: $CREDBROKER_AUDIT_KEY (hex) or [audit] key.
    """


@audit.command("verify")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--vault-anchors/--no-vault-anchors", "vault_anchors", default=None,
              help="Compare the chain with its anchors in Vault. Default: on for a keyed log when [audit] "
                   "anchor is not off and a Vault address is set.")
@click.pass_context
def verify_cmd(ctx: click.Context, files: tuple[Path, ...], as_json: bool, vault_anchors: bool | None) -> None:
    """Check the hash chain of the log (or of FILE...); exit 0 when intact, 1 when not.

    Names the first edited, deleted, inserted, reordered or forged record with
    its file and line, and every gap a writer recorded (records lost: exit 1,
    acknowledged or not). A partial last line left by a crash is reported as a
    note, not as tampering. With Vault anchors, records cut after the last
    anchor are caught even when every local file was rewritten.
    """
    from .audit.verify import verify_files

    settings, env, _ = _context(ctx)
    key = _key_bytes(settings, env)
    anchors, place, anchor_error = _read_anchors(settings, env, key, vault_anchors)
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


def _read_anchors(settings: Any, env: dict[str, str], key: bytes | None, wanted: bool | None
                  ) -> tuple[list[Any] | None, str, str | None]:
    """(anchors or None when not checked, their place, why they could not be read)."""
    from .audit.anchor import place_for, read_all, vault_configured
    from .errors import BrokerError

    from .audit.keys import key_id

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
        return read_all(env, place, key), str(place), None
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
    from . import audit as audit_pkg

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
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              metavar="FILE", help="Also write a self-contained HTML page with a daily-activity chart.")
@click.option("--vault-audit", "vault_audit", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              metavar="FILE", help="Vault's file audit device log: flag reads of bot secrets the broker did not make.")
@click.option("--vault-audit-device", default="file", show_default=True, metavar="PATH",
              help="The audit device's path in Vault (for sys/audit-hash).")
@click.option("--work-hours", metavar="HH-HH", help="Usual UTC hours (default: [audit] work_hours, else learned).")
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Active log file to read (default: the configured one).")
@click.pass_context
def report_cmd(ctx: click.Context, since: str, until_text: str | None, as_json: bool, html_file: Path | None,
               vault_audit: Path | None, vault_audit_device: str, work_hours: str | None,
               log_path: Path | None) -> None:
    """The weekly review: signature failures first, then per-profile activity and anomalies."""
    from .audit.files import log_set
    from .audit.report import build_report, render_text
    from .audit.settings import parse_hours
    from .errors import BrokerError

    settings, env, config = _context(ctx)
    now = datetime.now(timezone.utc)
    until = _parse_since(until_text, now) if until_text else now
    start = _parse_since(since, until)
    if start >= until:
        raise ConfigError("--since is not before --until", "give an earlier --since")
    active = log_path.expanduser().absolute() if log_path else settings.path
    files = log_set(active)
    if not files:
        raise AuditError(f"no audit log at {active}", "check [audit] path / $CREDBROKER_AUDIT_LOG")
    hours = parse_hours(work_hours, "--work-hours") if work_hours else settings.work_hours
    token_hash = None
    vault_paths: list[str] = []
    if vault_audit is not None:
        from .audit.vaultcheck import token_audit_hash

        vault_paths = [str(p.options.get("path")) for p in config.profiles.values()
                       if p.source == "vault" and p.options.get("path")]
        try:
            token_hash = token_audit_hash(env, vault_audit_device)
        except BrokerError:
            token_hash = None  # the report says reads are not attributed to a token
    report = build_report(files, since=start, until=until, key=_key_bytes(settings, env), active=active,
                          work_hours=hours, vault_audit=vault_audit, vault_paths=vault_paths,
                          vault_token_hash=token_hash)
    if html_file is not None:
        from .audit.html import render_html

        page = render_html(report).encode("utf-8")
        try:
            fd = os.open(html_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(page)
        except OSError as exc:
            raise AuditError(f"cannot write {html_file}: {exc.strerror or exc}", "check the --html path") from exc
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render_text(report), nl=False)
        if html_file is not None:
            click.echo(f"HTML report written to {html_file}")


@audit.command("prune")
@click.option("--keep", "keep_text", default=None, metavar="AGE",
              help="Keep rotated files with records newer than this (default: [audit] keep, 90d).")
@click.option("--dry-run", is_flag=True, help="Only say which files would go.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def prune_cmd(ctx: click.Context, keep_text: str | None, dry_run: bool, as_json: bool) -> None:
    """Remove rotated log files older than --keep; what remains still verifies."""
    from . import audit as audit_pkg
    from .audit.prune import prune
    from .audit.settings import parse_duration

    settings, env, config = _context(ctx)
    keep: timedelta = parse_duration(keep_text, "--keep") if keep_text else settings.keep
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
    from . import audit as audit_pkg

    settings, env, config = _context(ctx)
    if settings.key_spec is None and not env.get("CREDBROKER_AUDIT_KEY"):
        raise AuditError("no audit key is configured", "set [audit] key or CREDBROKER_AUDIT_KEY")
    log = audit_pkg.open_log(config.audit or None, env=env)
    if log.enable_key():
        click.echo(f"audit log {log.path}: keyed from seq {log.last_seq()} on, key id {log.key_id}")
    else:
        click.echo(f"audit log {log.path}: already keyed or empty (key id {log.key_id}); nothing to do")
