"""The weekly review's inputs, for ``credbroker audit report`` and for code that builds the same report.

What the CLI used to compute itself: the period (``7d`` / ``12h`` ago or an ISO date), the ``--fail-on``
names, the configured Vault paths and the broker's token hash for the Vault cross-check, each Vault
profile's current KV version, and writing the HTML page readable by its owner only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AuditError, BrokerError, ConfigError, VaultSealed, VaultUnreachable

if TYPE_CHECKING:
    from ..config import Config
    from ..vault.settings import VaultSettings
    from .model import Report

#: The HTML page's mode: it names profiles, hosts and commands; its owner only.
HTML_MODE = 0o600


def parse_since(text: str, now: datetime, option: str = "--since") -> datetime:
    """``7d`` / ``12h`` (before ``now``) or an ISO date/time (UTC when it names no zone)."""
    from .. import units

    if text and text[-1] in units.DURATION_UNITS and text[:-1].strip().isascii() and text[:-1].strip().isdigit():
        return now - units.duration(text, option)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{option} {text!r}: not a duration or a date", "write e.g. 7d, 24h or 2026-11-17") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def fail_on_names(text: str | None) -> list[str]:
    """``--fail-on a,b`` -> names, each one the summary knows (``all``: every one)."""
    from .model import FAIL_ON_NAMES

    if not text:
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    if "all" in names:
        return list(FAIL_ON_NAMES)
    unknown = [n for n in names if n not in FAIL_ON_NAMES]
    if unknown:
        raise ConfigError(f"--fail-on: unknown name {unknown[0]!r}", f"use some of: all, {', '.join(FAIL_ON_NAMES)}")
    return names


def vault_paths(config: Config) -> list[str]:
    """The KV paths the configured Vault profiles read: the broker's own reads, for the Vault cross-check."""
    return [str(p.options.get("path")) for p in config.profiles.values()
            if p.source == "vault" and p.options.get("path")]


def vault_settings(env: Mapping[str, str]) -> VaultSettings | None:
    """The review's Vault settings, resolved once for the whole report; None without a Vault address in
    the environment or ``[vault]`` (nothing is asked of Vault then), or when they do not resolve (the
    report still comes, without what Vault would have said)."""
    from ..vault.origins import value
    from ..vault.settings import VaultSettings

    if not value(env, "VAULT_ADDR", "BAO_ADDR"):
        return None
    try:
        return VaultSettings.from_env(env)
    except BrokerError:
        return None


def token_hash(vault: VaultSettings | None, device: str) -> str | None:
    """The broker's token as Vault's audit device ``device`` hashes it, or None when Vault cannot say (the
    report then says reads are not attributed to a token)."""
    from .vaultcheck import token_audit_hash

    if vault is None:
        return None
    try:
        return token_audit_hash(vault, device)
    except BrokerError:
        return None


def kv_versions(config: Config, vault: VaultSettings | None) -> dict[str, tuple[int, str]]:
    """(current version, created_time) of each configured Vault profile's secret, where metadata is readable.

    Only with Vault settings (``vault_settings``: a Vault address is set); one that does not answer is not
    asked again for the next profile (the report still comes).
    """
    from ..sources.vault import current_version_created

    if vault is None:
        return {}
    out: dict[str, tuple[int, str]] = {}
    for profile in config.profiles.values():
        if profile.source != "vault" or not profile.options.get("path"):
            continue
        try:
            got = current_version_created(profile, vault)
        except BrokerError as exc:
            if isinstance(exc, (VaultUnreachable, VaultSealed)):
                break
            continue
        if got is not None:
            out[got[0]] = (got[1], got[2])
    return out


def write_html(report: Report, path: Path) -> None:
    """The report as a self-contained HTML page at ``path``, created with mode 0600 (replaced if there)."""
    from .html import render_html

    page = render_html(report).encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, HTML_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(page)
    except OSError as exc:
        raise AuditError(f"cannot write {path}: {exc.strerror or exc}", "check the --html path") from exc
