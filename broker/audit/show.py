"""Reading records without opening the JSONL by hand: ``audit show`` and ``audit tail --follow``.

Records are read as they are on disk (no chain check: that is ``audit
verify``); lines that are not records are skipped. A filter keeps records by
event name, profile, time and sequence number. ``follow`` waits for new
records in the active file and moves to the new one when the writer rotates.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import log_set

#: How often ``follow`` looks for new records: a person reads them, not a program racing the writer.
FOLLOW_POLL_S = 0.5


@dataclass(frozen=True)
class RecordFilter:
    """Which records to keep; empty sets keep everything."""

    events: frozenset[str] = frozenset()
    profiles: frozenset[str] = frozenset()
    since: str | None = None  # the log's timestamp format (UTC); string order is time order
    until: str | None = None
    seqs: frozenset[int] = frozenset()

    def keep(self, rec: dict[str, Any]) -> bool:
        ts = rec.get("ts")
        if not isinstance(ts, str):
            return False
        if self.since is not None and ts < self.since:
            return False
        if self.until is not None and ts > self.until:
            return False
        if self.events and rec.get("event") not in self.events:
            return False
        if self.seqs and rec.get("seq") not in self.seqs:
            return False
        if self.profiles:
            data = rec.get("data")
            if not isinstance(data, dict) or data.get("profile") not in self.profiles:
                return False
        return True


def _record(raw: bytes) -> dict[str, Any] | None:
    if not raw.startswith(b'{"v":'):
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def records(paths: Iterable[Path], keep: RecordFilter) -> Iterator[dict[str, Any]]:
    """Every record of ``paths`` (oldest first) that ``keep`` accepts."""
    for path in paths:
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            continue  # rotated away or pruned since it was listed
        with fh:
            for raw in fh:
                rec = _record(raw)
                if rec is not None and keep.keep(rec):
                    yield rec


def last(active: Path, keep: RecordFilter, n: int) -> list[dict[str, Any]]:
    """The last ``n`` matching records of the whole log."""
    return list(deque(records(log_set(active), keep), maxlen=n)) if n > 0 else []


class _Cursor:
    """Where ``follow`` is: the newest sequence number seen, and a line not finished yet."""

    def __init__(self, last_seq: int) -> None:
        self.last_seq = last_seq
        self.partial = b""

    def take(self, raw: bytes, keep: RecordFilter, emit: Callable[[dict[str, Any]], None]) -> None:
        rec = _record(raw)
        seq = rec.get("seq") if rec is not None else None
        if rec is None or not isinstance(seq, int) or seq <= self.last_seq:
            return  # not a record, or one already seen (a file read again after a rotation)
        self.last_seq = seq
        if keep.keep(rec):
            emit(rec)


def follow(active: Path, keep: RecordFilter, emit: Callable[[dict[str, Any]], None], *,
           stop: Callable[[], bool] = lambda: False) -> None:
    """Emit each matching record written from now on, in order, across rotations.

    Records are told apart by sequence number, so a file read again is not
    printed twice, and files the writer rotated away between two looks (a
    burst) are read from the rotated set before the new active file.
    """
    from .files import last_header, rotated_files

    head = last_header(active)
    cursor = _Cursor(head.seq if head is not None else 0)
    fh = None
    ino = None
    try:
        while not stop():
            if fh is None:
                for path in rotated_files(active):  # written since our last look, then rotated away
                    last = last_header(path)
                    if last is not None and last.seq > cursor.last_seq:
                        for raw in _lines(path):
                            cursor.take(raw, keep, emit)
                try:
                    fh = active.open("rb")
                except FileNotFoundError:
                    time.sleep(FOLLOW_POLL_S)
                    continue
                ino = os.fstat(fh.fileno()).st_ino
                cursor.partial = b""
                if head is not None:  # the file we started with: from its end
                    fh.seek(0, os.SEEK_END)
                    head = None
            if _emit_new(fh, keep, emit, cursor):
                continue
            try:
                rotated = os.stat(active).st_ino != ino
            except FileNotFoundError:
                rotated = True
            if rotated:
                # The writer renamed the file: read what it appended just before, then go on.
                _emit_new(fh, keep, emit, cursor)
                fh.close()
                fh = None
                continue
            time.sleep(FOLLOW_POLL_S)
    finally:
        if fh is not None:
            fh.close()


def _lines(path: Path) -> Iterator[bytes]:
    try:
        with path.open("rb") as fh:
            yield from (raw.rstrip(b"\n") for raw in fh)
    except FileNotFoundError:
        return  # pruned meanwhile


def _emit_new(fh: Any, keep: RecordFilter, emit: Callable[[dict[str, Any]], None], cursor: _Cursor) -> bool:
    """Emit the whole records appended to ``fh`` since the last read; a partial line waits."""
    chunk = fh.read()
    if not chunk:
        return False
    *lines, cursor.partial = (cursor.partial + chunk).split(b"\n")
    for raw in lines:
        cursor.take(raw, keep, emit)
    return True


def printable(text: str) -> str:
    """``text`` with control characters (terminal escapes, carriage returns) shown as ``\\xNN``.

    What the log holds came partly from bots (command lines, exchange
    messages): printed raw, an escape sequence could rewrite the reviewer's
    terminal and hide a line.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\n" else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
                   for c in text)


def format_record(rec: dict[str, Any]) -> str:
    """One line: ``seq  time  event  profile  key=value ...``."""
    data = rec.get("data") if isinstance(rec.get("data"), dict) else {}
    assert isinstance(data, dict)
    profile = data.get("profile") or "-"
    fields = " ".join(f"{k}={_value(v)}" for k, v in data.items() if k != "profile")
    ts = str(rec.get("ts", ""))[:23].replace("T", " ")
    host = rec.get("host") or "?"
    line = f"{rec.get('seq', '?'):>6}  {ts}  {rec.get('event', '?'):<18} {profile:<14} host={host} {fields}".rstrip()
    return printable(line.replace("\n", "\\n"))


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value and "=" not in value else json.dumps(value)
    return json.dumps(value, separators=(",", ":"))
