"""The files of one audit log: the active file, rotated files, the head and the lock.

For an active log ``audit.log`` in its folder::

    audit.log                      the file being appended to
    audit.log.20261117T000012Z     rotated files, named by rotation time (UTC); oldest first
    audit.log.head                 seq and hash of the last committed record (truncation check);
                                   in a keyed log MAC'd with the chain key, so it cannot be rewritten
                                   to fit a log cut short
    audit.log.lock                 flock(2) target shared by every writer on the host

The chain runs across files: the first record of a rotated-in file links to
the last record of the file before it. ``prune`` writes a ``pruned`` record
that names the last removed record's seq and hash, which anchors what remains.
"""

from __future__ import annotations

import json
import os
import re
from typing import NamedTuple
from pathlib import Path

from ..errors import AuditError
from .chain import MAX_LINE, Header, parse_header

HEAD_SIZE = 512


def rotated_pattern(active: Path) -> re.Pattern[str]:
    return re.compile(re.escape(active.name) + r"\.(\d{8}T\d{6}Z(?:-\d+)?)\Z")


def rotated_files(active: Path) -> list[Path]:
    """Rotated files of an active log, oldest first."""
    folder = active.parent
    if not folder.is_dir():
        return []
    pat = rotated_pattern(active)
    found = []
    for entry in os.scandir(folder):
        m = pat.match(entry.name)
        if m and entry.is_file(follow_symlinks=False):
            stamp = m.group(1)
            base, _, n = stamp.partition("-")
            found.append(((base, int(n or 0)), Path(entry.path)))
    return [p for _, p in sorted(found)]


def log_set(active: Path) -> list[Path]:
    """Every file of the log, oldest first, the active file last (if it exists)."""
    files = rotated_files(active)
    if active.is_file():
        files.append(active)
    return files


def head_path(active: Path) -> Path:
    return active.with_name(active.name + ".head")


def lock_path(active: Path) -> Path:
    return active.with_name(active.name + ".lock")


class Head(NamedTuple):
    """The last committed record as the writer saw it."""

    seq: int
    hash: str
    kid: str | None = None
    mac: str | None = None  # keyed logs: HMAC of head_message() under HEAD_LABEL


def head_message(seq: int, digest: str, kid: str | None) -> bytes:
    """What a keyed head's MAC covers."""
    return f"{seq}\x00{digest}\x00{kid or ''}".encode("ascii")


def read_head(active: Path) -> Head | None:
    """The head file, or None when there is none (or it is unreadable: verify reports that)."""
    try:
        text = head_path(active).read_bytes().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"cannot read {head_path(active)}: {exc.strerror or exc}", "check its permissions") from exc
    try:
        data = json.loads(text)
        kid, mac = data.get("kid"), data.get("mac")
        return Head(seq=int(data["seq"]), hash=str(data["hash"]), kid=kid if isinstance(kid, str) else None,
                    mac=mac if isinstance(mac, str) else None)
    except (ValueError, KeyError, TypeError, AttributeError):
        return Head(seq=-1, hash="")  # present but damaged: the verifier names it


def encode_head(seq: int, digest: str, file_name: str, kid: str | None = None, mac: str | None = None) -> bytes:
    fields: dict[str, object] = {"v": 1, "seq": seq, "hash": digest, "file": file_name[:200]}
    if mac is not None:
        fields.update(kid=kid, mac=mac)
    body = json.dumps(fields, separators=(",", ":")).encode()
    return body + b" " * max(0, HEAD_SIZE - 1 - len(body)) + b"\n"


class Tail(NamedTuple):
    """The end of a log file, as the writer needs it."""

    size: int
    last: Header | None  # the last complete record
    partial_offset: int | None = None  # an unterminated last line (a crash mid-write)
    partial: bytes = b""


def read_tail(fd: int, name: str) -> Tail:
    """Read the end of an open log file: its last record and any partial last line."""
    size = os.fstat(fd).st_size
    if size == 0:
        return Tail(size=0, last=None)
    want = min(size, 2 * MAX_LINE + 2)
    start = size - want
    chunk = os.pread(fd, want, start)
    partial_offset: int | None = None
    partial = b""
    if chunk.endswith(b"\n"):
        body = chunk[:-1]
    else:
        idx = chunk.rfind(b"\n")
        if idx == -1 and start > 0:
            raise _damaged(name, "its last line is longer than any record")
        partial_offset = start + idx + 1
        partial = chunk[idx + 1 :]
        body = chunk[: max(idx, 0)] if idx >= 0 else b""
    if not body and (start == 0):
        return Tail(size=size, last=None, partial_offset=partial_offset, partial=partial)
    j = body.rfind(b"\n")
    if j == -1 and start > 0:
        raise _damaged(name, "its last line is longer than any record")
    header = parse_header(body[j + 1 :])
    if header is None:
        raise _damaged(name, "its last complete line is not an audit record")
    return Tail(size=size, last=header, partial_offset=partial_offset, partial=partial)


def first_header(path: Path) -> Header | None:
    """The first record of a file (None if empty or not a record)."""
    try:
        with path.open("rb") as fh:
            line = fh.readline(MAX_LINE + 2)
    except OSError:
        return None
    return parse_header(line.rstrip(b"\n")) if line.endswith(b"\n") else None


def last_header(path: Path) -> Header | None:
    """The last complete record of a file (None if there is none)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return read_tail(fd, str(path)).last
    except AuditError:
        return None
    finally:
        os.close(fd)


def _damaged(name: str, why: str) -> AuditError:
    return AuditError(
        f"the audit log {name} is damaged: {why} (not a crash's partial line)",
        "run `credbroker audit verify` to see where; move the log files and its .head aside to start a new chain",
    )
