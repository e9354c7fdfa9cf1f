"""Retention: remove rotated files older than ``--keep``, keeping the rest verifiable.

Binance keeps its own API audit trail for 90 days, hence the default. Only a
prefix of the rotated files goes (oldest first; never a hole in the middle),
never the active file, and only files whose *last* record is older than the
cut-off. Before anything is removed a ``pruned`` record is committed to the
log naming the last removed record's seq and hash (``through_seq``,
``anchor``): ``verify`` accepts a log that starts at ``through_seq + 1`` only
when that record's ``prev`` is the anchor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ..errors import AuditError
from .files import first_header, last_header, rotated_files
from .log import PRUNED, AuditLog


@dataclass(frozen=True)
class PruneResult:
    """What ``prune`` removed."""

    removed: tuple[str, ...]
    through_seq: int | None
    kept: int

    def to_dict(self) -> dict[str, object]:
        return {"removed": list(self.removed), "through_seq": self.through_seq, "kept_files": self.kept}


def prune(log: AuditLog, keep: timedelta, *, now: datetime | None = None, dry_run: bool = False) -> PruneResult:
    """Remove rotated files whose newest record is older than ``keep``."""
    now = now or datetime.now(timezone.utc)
    cutoff = (now - keep).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    rotated = rotated_files(log.path)
    doomed: list[Path] = []
    last = None
    for path in rotated:
        tail = last_header(path)
        if tail is None:
            raise AuditError(f"cannot read the last record of {path}", "run `credbroker audit verify` first")
        if tail.ts >= cutoff:
            break
        doomed.append(path)
        last = tail
    kept = len(rotated) - len(doomed)
    if not doomed or last is None:
        return PruneResult(removed=(), through_seq=None, kept=kept)
    if dry_run:
        return PruneResult(removed=tuple(str(p) for p in doomed), through_seq=last.seq, kept=kept)
    first = first_header(doomed[0])
    days = keep.total_seconds() / 86400
    log.record(PRUNED, {
        "files": [p.name for p in doomed],
        "first_seq": first.seq if first else None,
        "through_seq": last.seq,
        "anchor": last.digest,
        "keep_days": round(days, 3),
    }, durable=True)
    for path in doomed:
        try:
            path.unlink()
        except FileNotFoundError:
            pass  # another prune got there first
    dfd = os.open(log.path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return PruneResult(removed=tuple(str(p) for p in doomed), through_seq=last.seq, kept=kept)
