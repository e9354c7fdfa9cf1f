"""The ``[audit]`` table: validated once, into a frozen value.

Keys (all optional)::

    [audit]
    path = "~/.local/state/credbroker/audit.log"   # where the active log lives
    key = "vault:secret/credbroker/audit#key"      # keyed chain (or "keyring:SERVICE:FIELD")
    rotate = "weekly"                              # "weekly" (default), "daily" or "size"
    max_size = "64MiB"                             # rotate earlier when the file grows past this
    keep = "90d"                                   # default of `credbroker audit prune --keep`
    work_hours = "06-22"                           # UTC hours the report treats as usual
    anchor = "secret/credbroker-audit"             # KV v2 MOUNT/PATH the keyed head is anchored under
                                                   # (+ "/<host>"); "off" to turn it off
    anchor_interval = "5m"                         # also anchor this often during long runs
    fsync = "every"                                # "every": each commit fsynced before it returns;
                                                   # "group": written before it returns, fsynced in
                                                   # groups within FSYNC_GROUP_WINDOW (50 ms)

Where the log is, first match wins (documented in the README):

1. ``[audit] path`` (``~`` expanded; a relative path is taken from the current folder)
2. ``$CREDBROKER_AUDIT_LOG``
3. ``$XDG_STATE_HOME/credbroker/audit.log`` (default ``~/.local/state/credbroker/audit.log``)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

from .. import units
from ..errors import ConfigError
from .keys import ENV_KEY as ENV_KEY  # where it is defined; importable from here too
from .keys import parse_key_spec

ENV_LOG = "CREDBROKER_AUDIT_LOG"

KNOWN_KEYS = frozenset({"path", "key", "rotate", "max_size", "keep", "work_hours", "anchor", "anchor_interval",
                        "fsync"})
DEFAULT_ANCHOR = "secret/credbroker-audit"
DEFAULT_ANCHOR_INTERVAL = timedelta(minutes=5)
ROTATE_CHOICES = ("weekly", "daily", "size")
#: "every": a commit is fsynced before it returns. "group": a batch commit (the signing agent's
#: records, ``flush()``) is written to the file before it returns and fsynced by a background thread,
#: at most FSYNC_GROUP_WINDOW seconds later (a writer that gets further ahead waits for the disk).
#: A ``durable=True`` record is always fsynced before it returns.
FSYNC_CHOICES = ("every", "group")
FSYNC_GROUP_WINDOW = 0.05
DEFAULT_MAX_SIZE = 64 * 1024 * 1024
DEFAULT_KEEP = timedelta(days=90)

_HOURS = re.compile(r"^\s*(\d{1,2})\s*-\s*(\d{1,2})\s*$")


class AuditSettings(NamedTuple):
    """Validated audit settings. Holds a key *reference*, never a key."""

    path: Path
    key_spec: str | None = None
    rotate: str = "weekly"
    max_size: int = DEFAULT_MAX_SIZE
    keep: timedelta = DEFAULT_KEEP
    #: (start, end) UTC hours that are usual, end exclusive; None = learn from history
    work_hours: tuple[int, int] | None = None
    #: KV v2 "MOUNT/PATH" prefix of the Vault anchor (the host name is appended), or None when
    #: anchoring is off. Used only for a keyed chain and when Vault is configured.
    anchor: str | None = DEFAULT_ANCHOR
    anchor_interval: timedelta = DEFAULT_ANCHOR_INTERVAL
    #: "every" or "group" (FSYNC_CHOICES)
    fsync: str = "every"


def default_log_path(env: Mapping[str, str]) -> Path:
    """``$XDG_STATE_HOME/credbroker/audit.log`` (XDG base directory spec's state folder)."""
    base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local" / "state")
    return Path(base) / "credbroker" / "audit.log"


def parse_hours(value: object, what: str = "[audit] work_hours") -> tuple[int, int]:
    """``"06-22"`` -> (6, 22): UTC hours [start, end); a range may wrap past midnight."""
    m = _HOURS.match(str(value)) if isinstance(value, str) else None
    if not m:
        raise ConfigError(f"{what}: invalid hours {value!r}", 'write a UTC range, e.g. work_hours = "06-22"')
    start, end = int(m.group(1)), int(m.group(2))
    if not (0 <= start <= 23 and 0 <= end <= 24) or start == end:
        raise ConfigError(f"{what}: invalid hours {value!r}", "hours run from 0 to 24 and the range is not empty")
    return start, end


def load_settings(audit_config: Mapping[str, Any] | None, env: Mapping[str, str]) -> AuditSettings:
    """Validate ``[audit]`` (as ``Config.audit`` passes it, raw) against ``env``."""
    cfg = dict(audit_config or {})
    for key in cfg:
        if key not in KNOWN_KEYS:
            raise ConfigError(f"[audit] {key}: unknown key", f"expected one of: {', '.join(sorted(KNOWN_KEYS))}")

    raw_path = cfg.get("path")
    if raw_path is not None:
        if not isinstance(raw_path, str) or not raw_path.strip():
            raise ConfigError("[audit] path: expected a file path", 'write e.g. path = "/var/lib/bots/audit.log"')
        path = Path(raw_path).expanduser()
    elif env.get(ENV_LOG):
        path = Path(env[ENV_LOG]).expanduser()
    else:
        path = default_log_path(env)
    if not path.is_absolute():
        path = Path.cwd() / path
    if path.name in ("", ".", ".."):
        raise ConfigError(f"audit log path {path} names a folder", "name a file, e.g. .../audit.log")

    key_spec = cfg.get("key")
    if key_spec is not None:
        if not isinstance(key_spec, str):
            raise ConfigError("[audit] key: expected a string", 'write key = "vault:MOUNT/PATH#FIELD" or "keyring:SERVICE:FIELD"')
        parse_key_spec(key_spec)  # validate the reference now; fetch only when used

    rotate = cfg.get("rotate", "weekly")
    if rotate not in ROTATE_CHOICES:
        raise ConfigError(f"[audit] rotate: unknown value {rotate!r}", f"use one of: {', '.join(ROTATE_CHOICES)}")
    max_size = (units.size(cfg["max_size"], "[audit] max_size", minimum=4096) if "max_size" in cfg
                else DEFAULT_MAX_SIZE)
    keep = units.duration(cfg["keep"], "[audit] keep") if "keep" in cfg else DEFAULT_KEEP
    hours = parse_hours(cfg["work_hours"]) if "work_hours" in cfg else None
    anchor = parse_anchor(cfg.get("anchor", DEFAULT_ANCHOR))
    interval = (units.duration(cfg["anchor_interval"], "[audit] anchor_interval") if "anchor_interval" in cfg
                else DEFAULT_ANCHOR_INTERVAL)
    fsync = cfg.get("fsync", "every")
    if fsync not in FSYNC_CHOICES:
        raise ConfigError(f"[audit] fsync: unknown value {fsync!r}", f"use one of: {', '.join(FSYNC_CHOICES)}")
    return AuditSettings(path=path, key_spec=key_spec, rotate=str(rotate), max_size=max_size, keep=keep,
                         work_hours=hours, anchor=anchor, anchor_interval=interval, fsync=str(fsync))


_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*\Z")


def parse_anchor(value: object) -> str | None:
    """``"MOUNT/PATH"`` (plain segments only) or ``"off"`` -> the prefix, or None."""
    hint = 'write anchor = "secret/credbroker-audit" (a KV v2 mount and path), or anchor = "off"'
    if value is False or value == "off":
        return None
    if not isinstance(value, str):
        raise ConfigError("[audit] anchor: expected a KV v2 path or \"off\"", hint)
    parts = value.strip().strip("/").split("/")
    if len(parts) < 2 or not all(_SEGMENT.match(p) and p not in (".", "..") for p in parts):
        raise ConfigError(f"[audit] anchor: {value!r} is not MOUNT/PATH of plain segments", hint)
    return "/".join(parts)


def ensure_private_folder(folder: Path) -> None:
    """Create the log's folder 0700 (and its parents as needed)."""
    if not folder.is_dir():
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask
        except OSError as exc:
            from ..errors import AuditError

            raise AuditError(
                f"cannot create the audit log folder {folder}: {exc.strerror or exc}",
                "check the permissions of its parent, or set [audit] path",
            ) from exc
