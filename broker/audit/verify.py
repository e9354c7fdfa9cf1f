"""Checking the chain: names the first edited, deleted, inserted, reordered or forged record.

The verifier streams (one 1 MB block of lines in memory at a time, plus a few
hashes), so the report can run it in the same pass over a 90-day log.

What it tells apart (issue 3, item 3):

- ``edited``: a record's hash/MAC does not match its bytes, or a record does
  not link to the one before it (that one was replaced and re-hashed).
- ``forged``: in a keyed log, a record that is unkeyed or keyed with another
  key (someone recomputed the chain without the key), or a MAC that does not match.
- ``deleted``: a gap in ``seq``; a log that starts after seq 1 with no
  ``pruned`` record anchoring it.
- ``inserted``: a record with a ``seq`` the chain already had; a line that is
  not a record at all.
- ``reordered``: a missing ``seq`` that turns up a few lines later.
- ``truncated``: the head file says more records were committed than the log holds; the
  head file is missing while records exist; a Vault anchor names a record past the end.
- ``gap``: a writer found records missing and said so with a ``gap`` record (status
  ``gap``, exit 1, whether or not an operator acknowledged it: the records are gone).
- ``forged``: also a keyed head file or a Vault anchor whose MAC does not match.
- a crash's partial last line (no newline, nothing committed after it) is a
  *note*, not a problem; one that a later writer recovered (a ``partial_tail``
  record naming its offset and SHA-256 follows it) is a note too.

``verify`` exits 0 when there is no problem (notes allowed) and 1 otherwise,
including when records are keyed and no key is available to check them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, cast

from ..events import Event
from ..errors import AuditError
from .chain import (
    ALG_HMAC,
    ALG_SHA256,
    GENESIS,
    HASH_KEY,
    HASH_SUFFIX_LEN,
    HEAD_LABEL,
    SHA256_LABEL,
    TS_LEN,
    Header,
    digest_matches,
    labelled_mac,
    make_hasher,
    parse_header,
)
from .files import Head, first_header, head_message, log_set, read_head, rotated_files
from .keys import key_id

REORDER_WINDOW = 16
#: ``_walk`` reads files in blocks of this size and checks up to BATCH_LINES lines at once.
BLOCK_BYTES = 1024 * 1024
BATCH_LINES = 256
#: ``_batcher``'s check: (lines, i, j, next seq, last hash) -> (k, the last two hashes, time stamps, events)
Batch = Callable[[list[bytes], int, int, int, str], tuple[int, list[str], list[bytes], list[bytes]]]


def _line_blocks(fh: BinaryIO, size: int = BLOCK_BYTES) -> Iterator[tuple[list[bytes], bytes, bool]]:
    """A file as lists of whole lines (without their newline), read ``size`` bytes at a time, each with
    what follows its last newline (b"" except at the end of a file that ends in a partial line) and
    whether every byte of those lines is ASCII (one C call per block instead of one per line)."""
    tail = b""
    while True:
        data = fh.read(size)
        if not data:
            if tail:
                yield [], tail, tail.isascii()
            return
        ascii_only = data.isascii() and tail.isascii()
        lines = data.split(b"\n")
        if tail:
            lines[0] = tail + lines[0]
        tail = lines.pop()
        if lines:
            yield lines, b"", ascii_only


@dataclass(frozen=True)
class Finding:
    """One problem or note, with where it is."""

    kind: str
    file: str
    line: int
    message: str
    seq: int | None = None

    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "file": self.file, "line": self.line, "seq": self.seq, "message": self.message}


@dataclass(frozen=True)
class VerifyResult:
    """The chain's status."""

    status: str  # "intact" | "broken" | "unverified" | "empty"
    records: int
    files: tuple[str, ...]
    first_seq: int | None
    last_seq: int | None
    alg: str | None
    key_id: str | None
    problem: Finding | None
    notes: tuple[Finding, ...] = ()
    gaps: tuple[Finding, ...] = ()
    #: how many Vault anchors were compared (None: not checked)
    anchors_checked: int | None = None

    @property
    def ok(self) -> bool:
        """True when nothing is wrong (notes such as a crash's partial tail allowed)."""
        return self.status in ("intact", "empty")

    def summary(self) -> str:
        """One line a person reads first."""
        if self.status == "empty":
            return "audit log: no records yet"
        span = f"{self.records} records, seq {self.first_seq}..{self.last_seq}, {len(self.files)} file(s)"
        chain = f"{self.alg} chain" + (f", key id {self.key_id}" if self.key_id else "")
        if self.anchors_checked is not None:
            chain += f", {self.anchors_checked} Vault anchor(s) matched"
        if self.problem is not None:
            p = self.problem
            more = f" ({len(self.gaps)} gap(s) recorded)" if self.gaps and p.kind != "gap" else ""
            return f"audit log NOT intact: {p.where()}: {p.kind}: {p.message}{more}"
        return f"audit log intact: {span}, {chain}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "ok": self.ok,
            "records": self.records,
            "files": list(self.files),
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "alg": self.alg,
            "key_id": self.key_id,
            "problem": self.problem.to_dict() if self.problem else None,
            "notes": [n.to_dict() for n in self.notes],
            "gaps": [g.to_dict() for g in self.gaps],
            "anchors_checked": self.anchors_checked,
        }


class Entry(NamedTuple):
    """A line that has a record's header, as the report consumes it."""

    header: Header
    line: bytes
    file: str
    lineno: int

    def load(self) -> dict[str, Any]:
        """The full record (a JSON parse; only for the events that need detail)."""
        value: dict[str, Any] = json.loads(self.line)
        return value


@dataclass
class _Gap:
    file: str
    line: int
    seq: int
    expected: int
    left: int


@dataclass
class _Bad:
    file: str
    line: int
    offset: int
    sha256: str
    size: int


@dataclass
class Verifier:
    """Feed it files in chain order (``walk``), then read ``result()``."""

    key: bytes | None = None
    head: Head | None = None
    head_file: str | None = None
    problems: list[tuple[tuple[int, int], Finding]] = field(default_factory=list)
    notes: list[Finding] = field(default_factory=list)
    #: the active file was checked and has no head file next to it
    head_missing: bool = False
    #: the active file is missing although rotated files exist (its name)
    active_missing: str | None = None
    #: Vault anchors to compare (``anchor.Anchor``); None: not checked
    anchors: Sequence[Any] | None = None
    anchor_place: str = ""
    active_name: str | None = None

    def __post_init__(self) -> None:
        _, self._sha = make_hasher(None)
        self._mac = make_hasher(self.key)[1] if self.key is not None else None
        self.key_id = key_id(self.key) if self.key is not None else None
        self.records = 0
        self.files: list[str] = []
        self._file_index = 0
        self._broken = False
        self._first: tuple[str, int, int, str] | None = None
        self._first_pos = (0, 0)
        self._last_seq: int | None = None
        self._last_hash = GENESIS
        self._before_last_hash: str | None = None
        self._last_line: tuple[str, int] = ("", 0)
        self._gap: _Gap | None = None
        self._bad: _Bad | None = None
        self._anchors: list[tuple[int, str]] = []
        self._keyed_seen = False
        self._unkeyed_seen = False
        self._unverifiable = 0
        self._unverifiable_kid: str | None = None
        self._algs: set[str] = set()
        self._head_seen = False
        self.gaps: list[Finding] = []
        self._acks: dict[int, str] = {}
        self._first_is_gap = False
        self._anchor_want: dict[int, list[Any]] = {}
        self._anchor_seen: dict[int, str] = {}
        self._anchors_bad: list[Finding] = []
        for a in self.anchors or ():
            place = f"Vault {self.anchor_place} version {a.version}"
            if not a.mac_ok:
                self._anchors_bad.append(Finding(
                    "forged", place, 0, "this anchor's MAC does not match the audit key: written by someone "
                    "without the key (or with another key)", a.seq if a.seq >= 0 else None))
            elif a.log is not None and self.active_name is not None and a.log != self.active_name:
                self.notes.append(Finding("anchor", place, 0, f"an anchor of another log ({a.log}) at the same "
                                                              "place; give each log its own [audit] anchor"))
            else:
                self._anchor_want.setdefault(a.seq, []).append(a)

    # -- problems -----------------------------------------------------------------------
    def _problem(self, kind: str, file: str, line: int, message: str, seq: int | None = None,
                 pos: tuple[int, int] | None = None) -> None:
        self.problems.append((pos or (self._file_index, line), Finding(kind, file, line, message, seq)))
        self._broken = True

    # -- the walk -----------------------------------------------------------------------
    def walk(self, paths: Sequence[Path]) -> Iterator[Entry]:
        """Yield every record-shaped line of ``paths`` (in chain order), checking as it goes."""
        return self._walk(paths, emit=True)  # type: ignore[return-value]

    def walk_records(self, paths: Sequence[Path], *, since: str | None = None,
                     keep: frozenset[str] = frozenset()) -> Iterator[tuple[str, str, bytes]]:
        """(ts, event, line) of the records of ``paths`` in chain order, checking every one as it goes.

        The report's pass in one: the common record costs what ``check`` costs (no header parse),
        plus two small slices, so verifying and reporting read each line once. With ``since``, a
        record older than it whose event is not in ``keep`` is checked but not handed out (the
        very first record always is): what a report of a recent period does not look at.
        """
        self._skip = (since.encode("ascii"), frozenset(e.encode("ascii") for e in keep)) if since else None
        return self._walk(paths, emit=False, records=True)  # type: ignore[return-value]

    def check(self, paths: Sequence[Path]) -> VerifyResult:
        """Walk ``paths`` without yielding anything; return the result."""
        for _ in self._walk(paths, emit=False):
            pass
        return self.result()

    def _walk(self, paths: Sequence[Path], *, emit: bool, records: bool = False
              ) -> Iterator[Entry | tuple[str, str, bytes]]:
        # The common case (the next seq, linked, the expected algorithm, nothing pending)
        # runs inline on local variables: the report streams 10^6 records through here.
        # Anything else goes through _feed with the state written back first.
        fast_alg, fast_kid = (ALG_HMAC, self.key_id) if self._mac is not None else (ALG_SHA256, None)
        fast_hash = self._mac if self._mac is not None else self._sha
        special = (Event.PRUNED, Event.AUDIT_KEYED, Event.PARTIAL_TAIL, Event.GAP, Event.GAP_ACKNOWLEDGED)
        # Records the slow path must see: the head's and every anchored one.
        watch = frozenset({self.head.seq if self.head is not None else -1, *self._anchor_want})
        compare = hmac.compare_digest
        parse = parse_header
        # Without Entries to hand out (``check``), the common case needs no parse at all:
        # the exact bytes the next record must start with are known, and whatever does
        # not match them takes the general path below.
        precheck = not emit
        special_b = tuple(e.encode() for e in special)
        alg_part = (b'","alg":"hmac-sha256","kid":"' + fast_kid.encode() + b'",') if fast_kid else b'","alg":"sha256",'
        hash_key = b',"hash":"'
        skip: tuple[bytes, frozenset[bytes]] | None = getattr(self, "_skip", None) if records else None
        skip_before, skip_keep = skip if skip is not None else (b"", frozenset())
        batch = self._batcher(alg_part, watch, frozenset(special_b), records) if precheck else None
        for index, path in enumerate(paths):
            self._file_index = index
            name = str(path)
            self.files.append(name)
            last_file = index == len(paths) - 1
            try:
                fh = path.open("rb", buffering=1024 * 1024)
            except OSError as exc:
                raise AuditError(f"cannot read {path}: {exc.strerror or exc}", "check the path and its permissions") from exc
            with fh:
                offset = 0
                lineno = 0
                fast = 0  # records taken by the fast path since the state was last synced
                last_seq = self._last_seq
                last_hash = self._last_hash
                before_last = self._before_last_hash
                clean = self._fast_ok(fast_kid)
                partial = b""
                window = BATCH_LINES
                for lines, partial, ascii_only in _line_blocks(fh):
                    i = 0
                    n = len(lines)
                    while i < n:
                        if batch is not None and clean and ascii_only and n - i >= 2:
                            # Many lines at once, checked in C (``_batch``); it stops before the first
                            # line it cannot vouch for, which then takes the per-line path below.
                            end = min(n, i + window)
                            k, hashes, stamps, events = batch(lines, i, end, last_seq + 1, last_hash)  # type: ignore[operator]
                            # After a line it could not vouch for, small batches again (the next line
                            # that needs the per-line path may be close), doubling while all is well.
                            window = min(BATCH_LINES, window * 2) if k else 16
                            if k:
                                fast += k
                                last_seq += k  # type: ignore[operator]
                                before_last = hashes[-2] if k > 1 else last_hash
                                last_hash = hashes[-1]
                                lineno += k
                                offset += sum(map(len, lines[i : i + k])) + k
                                if records:
                                    got = zip(stamps, events, lines[i : i + k])
                                    if min(stamps) >= skip_before:
                                        yield from zip(map(bytes.decode, stamps), map(bytes.decode, events),
                                                       lines[i : i + k])
                                    elif max(stamps) < skip_before:  # before the period: the events kept only
                                        for ts_b, event_b, line in compress(got, map(skip_keep.__contains__, events)):
                                            yield ts_b.decode("ascii"), event_b.decode("ascii"), line
                                    else:
                                        for ts_b, event_b, line in zip(stamps, events, lines[i : i + k]):
                                            if ts_b >= skip_before or event_b in skip_keep:
                                                yield ts_b.decode("ascii"), event_b.decode("ascii"), line
                                i += k
                                continue
                        raw = lines[i] + b"\n"
                        i += 1
                        lineno += 1
                        if precheck and clean:
                            nxt = last_seq + 1  # type: ignore[operator]
                            start = b'{"v":1,"seq":%d,"ts":"' % nxt
                            if raw.startswith(start) and nxt not in watch:
                                p = len(start) + TS_LEN
                                q = raw.find(b'"', p + 11)
                                cut = len(raw) - 1 - HASH_SUFFIX_LEN
                                if (
                                    q > 0
                                    and raw.startswith(b'","event":"', p)
                                    and raw[p + 11 : q] not in special_b
                                    and raw.startswith(b'","prev":"' + last_hash.encode() + alg_part, q)
                                    and raw.startswith(hash_key, cut)
                                    and raw.endswith(b'"}\n')
                                ):
                                    digest = raw[cut + 9 : cut + 73].decode("ascii", "replace")
                                    if compare(fast_hash(raw[:cut]), digest):
                                        fast += 1
                                        before_last = last_hash
                                        last_seq = nxt
                                        last_hash = digest
                                        offset += len(raw)
                                        if records:
                                            ts_b = raw[p - TS_LEN : p]
                                            event_b = raw[p + 11 : q]
                                            if ts_b < skip_before and event_b not in skip_keep and nxt != 1:
                                                continue
                                            yield ts_b.decode("ascii"), event_b.decode("ascii"), raw
                                        continue
                        line = raw[:-1]
                        h = parse(line)
                        if (
                            clean
                            and h is not None
                            and h.seq == last_seq + 1  # type: ignore[operator]
                            and h.alg == fast_alg
                            and h.kid == fast_kid
                            and h.seq not in watch
                            and h.event not in special
                            and compare(fast_hash(h.prefix), h.digest)
                            and compare(h.prev, last_hash)
                        ):
                            fast += 1
                            before_last = last_hash
                            last_seq = h.seq
                            last_hash = h.digest
                            entry: Entry | None = Entry(h, line, name, lineno) if emit or records else None
                        else:
                            self._sync(fast, last_seq, last_hash, before_last, name, lineno - 1)
                            fast = 0
                            entry = self._feed(h, name, lineno, offset, line)
                            last_seq, last_hash, before_last = self._last_seq, self._last_hash, self._before_last_hash
                            clean = self._fast_ok(fast_kid)
                        offset += len(raw)
                        if entry is not None:
                            yield (entry.header.ts, entry.header.event, entry.line) if records else entry
                if partial:
                    lineno += 1
                    self._sync(fast, last_seq, last_hash, before_last, name, lineno - 1)
                    if last_file:
                        self.notes.append(Finding(
                            "partial_tail", name, lineno,
                            f"unterminated last line ({len(partial)} bytes): a write cut short by a crash; "
                            "the next writer records and writes past it"))
                    else:
                        self._problem("truncated", name, lineno, "a rotated file ends in a partial line")
                else:
                    self._sync(fast, last_seq, last_hash, before_last, name, lineno)
                if self._bad is not None and self._bad.file == name:
                    self._bad_line_unexplained()
        self._finish()

    def _batcher(self, alg_part: bytes, watch: frozenset[int], special: frozenset[bytes],
                 records_wanted: bool) -> Batch:
        """A check of many lines at once for ``_walk``: each step is one C call over all the lines.

        ``batch(lines, i, j, nxt, last_hash)`` returns ``(k, hashes, ts, events)``: either k = 0
        (the caller takes line i down the per-line path), or lines[i:i+k] (k <= j - i) are all
        records seq nxt, nxt+1, ... in the writer's exact header layout (``parse_header``'s
        syntax), of the expected algorithm (and key id), each linked to the one before (the first
        to ``last_hash``), each hash/MAC matching its bytes, with no special event (they change
        the chain's state) and no head or anchored seq among them (the per-line path checks those).
        ``hashes`` are the last two lines' hashes (str), the time stamps and events those of the k lines.

        The cost is per line, so every step is one C call over the whole batch, and as few steps
        as possible make a Python object per line: the headers' fixed columns (format version,
        seq, time stamp) are checked in one joined string (``seq`` by its digit columns, no int
        per line); the recorded hashes are never sliced out: the computed ones are joined into
        the exact tails the lines must end with, and into the exact links they must hold.
        """
        compare = hmac.compare_digest
        getitem = cast("Callable[[bytes, slice], bytes]", operator.getitem)
        add = operator.add
        find = bytes.find
        prefix_of = operator.itemgetter(slice(None, -HASH_SUFFIX_LEN))
        tail_of = operator.itemgetter(slice(-HASH_SUFFIX_LEN, None))
        event_key = b'","event":"'
        prev_key = b'","prev":"'
        alg_len = len(alg_part)
        link_len = len(prev_key) + 64 + alg_len
        # The lines' exact tails and links: the computed hashes joined with these.
        tail_join = '"}' + HASH_KEY.decode("ascii")
        tail_start, tail_end = HASH_KEY.decode("ascii"), '"}'
        link_join = alg_part.decode("ascii") + prev_key.decode("ascii")
        link_start, link_end = prev_key.decode("ascii"), alg_part.decode("ascii")
        # Syntax checked by translating: every digit becomes "0" (then the header's start is one fixed
        # template, stricter than parse_header's pattern), an event loses its [a-z0-9_].
        zeros = bytes.maketrans(b"123456789", b"000000000")
        event_chars = b"abcdefghijklmnopqrstuvwxyz0123456789_"
        if self._mac is not None:
            mac = self._mac

            def digests(prefixes: Iterable[bytes]) -> list[str]:
                return list(map(mac, prefixes))
        else:
            # SHA-256(label || prefix) as hex, without a Python frame per record.
            label_add = SHA256_LABEL.__add__
            hexdigest = type(hashlib.sha256()).hexdigest
            sha256 = hashlib.sha256

            def digests(prefixes: Iterable[bytes]) -> list[str]:
                return list(map(hexdigest, map(sha256, map(label_add, prefixes))))

        nothing: tuple[int, list[str], list[bytes], list[bytes]] = (0, [], [], [])

        def batch(lines: list[bytes], i: int, j: int, nxt: int, last_hash: str
                  ) -> tuple[int, list[str], list[bytes], list[bytes]]:
            digits = len(str(nxt))
            j = min(j, i + 10**digits - nxt)  # one width of seq: the columns below sit at fixed offsets
            k = j - i
            if k <= 0 or any(nxt <= s < nxt + k for s in watch):
                return nothing
            part = lines[i:j]  # ASCII only: the caller checked the block
            t = 20 + digits  # where the time stamp starts
            e = t + TS_LEN + len(event_key)  # where the event starts
            template = b'{"v":0,"seq":' + b"0" * digits + b',"ts":"0000-00-00T00:00:00.000000Z' + event_key
            heads = b"".join(map(operator.itemgetter(slice(None, e)), part))
            # the template's only "{" is its first byte: k of these means every line starts so
            if heads.translate(zeros) != template * k or heads.count(b'{"v":1,"seq":') != k:
                return nothing
            # seq: digit column c of every header (stride e) against column c of nxt, nxt+1, ...
            want = "".join(map(str, range(nxt, nxt + k))).encode("ascii")
            if any(heads[13 + c :: e] != want[c::digits] for c in range(digits)):
                return nothing
            at = list(map(find, part, repeat(prev_key), repeat(e + 1)))  # the event's end
            # (a line too short for its link and tail fails the comparisons of both below)
            if -1 in at or max(at) > e + 64:
                return nothing
            events = list(map(getitem, part, map(slice, repeat(e), at)))
            if min(events) < b"a" or b"".join(events).translate(None, event_chars) or not special.isdisjoint(events):
                return nothing
            # Each line ends with its own hash/MAC (computed here over its bytes): `,"hash":"<hex>"}`.
            hashes = digests(map(prefix_of, part))
            if not compare(b"".join(map(tail_of, part)), (tail_start + tail_join.join(hashes) + tail_end).encode("ascii")):
                return nothing
            # Each record links to the one before: its prev is the hash before it (the first: last_hash),
            # followed by the expected algorithm (and key id).
            links = b"".join(map(getitem, part, map(slice, at, map(add, at, repeat(link_len)))))
            prevs = link_join.join([last_hash, *hashes[:-1]])
            if not compare(links, (link_start + prevs + link_end).encode("ascii")):
                return nothing
            stamps = list(map(operator.itemgetter(slice(t, t + TS_LEN)), part)) if records_wanted else []
            return k, hashes[-2:], stamps, events

        return batch

    def _fast_ok(self, fast_kid: str | None) -> bool:
        return (not self._broken and self._bad is None and self._gap is None and self._last_seq is not None
                and (fast_kid is None or self._keyed_seen))

    def _sync(self, fast: int, last_seq: int | None, last_hash: str, before_last: str | None, name: str,
              lineno: int) -> None:
        """Write the fast path's local state back (only when it took any record)."""
        if fast:
            self.records += fast
            self._last_seq = last_seq
            self._last_hash = last_hash
            self._before_last_hash = before_last
            self._last_line = (name, lineno)

    def _bad_line_unexplained(self) -> None:
        bad = self._bad
        assert bad is not None
        self._bad = None
        if not self._broken:
            self._problem("inserted", bad.file, bad.line,
                          "this line is not an audit record (inserted text, or a damaged record)")

    def _feed(self, h: Header | None, name: str, lineno: int, offset: int, line: bytes) -> Entry | None:
        if h is None:
            if self._bad is not None:
                self._bad_line_unexplained()
            self._bad = _Bad(name, lineno, offset, hashlib.sha256(line).hexdigest(), len(line))
            return None
        self.records += 1
        self._algs.add(h.alg)
        if self._bad is not None:
            self._check_recovery(h, line, name, lineno)
        if not self._broken:
            self._check_record(h, line, name, lineno)
        self._advance(h, name, lineno)
        return Entry(h, line, name, lineno)

    def _check_recovery(self, h: Header, line: bytes, name: str, lineno: int) -> None:
        bad = self._bad
        assert bad is not None
        ok = False
        if h.event == Event.PARTIAL_TAIL and bad.file == name and bad.line == lineno - 1:
            try:
                data = json.loads(line).get("data", {})
                ok = (data.get("offset") == bad.offset and data.get("bytes") == bad.size
                      and digest_matches(str(data.get("sha256", "")), bad.sha256))
            except ValueError:
                ok = False
        if ok:
            self._bad = None
            self.notes.append(Finding("partial_tail", bad.file, bad.line,
                                      f"a partial line left by a crash ({bad.size} bytes), recorded by "
                                      f"the next writer at line {lineno}"))
        else:
            self._bad_line_unexplained()

    def _check_record(self, h: Header, line: bytes, name: str, lineno: int) -> None:
        # 1. the record's own hash or MAC
        if h.alg == ALG_HMAC:
            if self._mac is None:
                self._unverifiable += 1
                self._unverifiable_kid = h.kid
            elif h.kid != self.key_id:
                self._problem("forged", name, lineno,
                              f"keyed with another key (id {h.kid}, configured {self.key_id})", h.seq)
                return
            elif not digest_matches(self._mac(h.prefix), h.digest):
                self._problem("forged", name, lineno, "its MAC does not match its content: edited or forged", h.seq)
                return
            if self._mac is not None and not self._keyed_seen and self._unkeyed_seen \
                    and h.event not in (Event.AUDIT_KEYED, Event.PARTIAL_TAIL):
                self._problem("forged", name, lineno,
                              "keyed records follow unkeyed ones without an audit_keyed record", h.seq)
                return
            self._keyed_seen = True
        else:
            if self._mac is not None and self._keyed_seen:
                self._problem("forged", name, lineno,
                              "not keyed, in a keyed log: written or re-chained without the audit key", h.seq)
                return
            self._unkeyed_seen = True
            if not digest_matches(self._sha(h.prefix), h.digest):
                self._problem("edited", name, lineno, "its hash does not match its content: the record was edited",
                              h.seq)
                return
        # 2. its place in the chain
        if h.event == Event.GAP:
            self._check_gap_record(h, name, lineno)
            return
        if h.event == Event.GAP_ACKNOWLEDGED:
            data = self._data(h)
            if isinstance(data.get("gap_seq"), int):
                user = _record_field(h, "user")
                self._acks[data["gap_seq"]] = (f"acknowledged at {h.ts[:19]}Z by {user or '?'}: "
                                               f"{str(data.get('reason', ''))[:200]}")
        if self._gap is not None:
            gap = self._gap
            if h.seq == gap.expected:
                self._gap = None
                self._problem("reordered", gap.file, gap.line,
                              f"seq {gap.seq} comes before seq {gap.expected} (found at line {lineno}): "
                              "records were moved", gap.seq)
                return
            gap.left -= 1
            if gap.left <= 0:
                self._gap_is_deletion()
            return
        if self._last_seq is None:
            self._first = (name, lineno, h.seq, h.prev)
            self._first_pos = (self._file_index, lineno)
            return
        expected = self._last_seq + 1
        if h.seq == expected:
            if not digest_matches(h.prev, self._last_hash):
                lf, ll = self._last_line
                self._problem("edited", lf, ll,
                              f"the next record (line {lineno}) does not link to it: it was replaced or re-hashed",
                              self._last_seq)
            return
        if h.seq == self._last_seq:
            lf, ll = self._last_line
            if digest_matches(h.digest, self._last_hash):
                self._problem("inserted", name, lineno, f"a copy of the record before it (seq {h.seq})", h.seq)
            elif self._before_last_hash is not None and digest_matches(h.prev, self._before_last_hash):
                self._problem("inserted", lf, ll,
                              f"a record with seq {h.seq} that the chain does not hold (the real one follows "
                              f"at line {lineno})", h.seq)
            else:
                self._problem("inserted", name, lineno, f"seq {h.seq} repeats the record before it", h.seq)
            return
        if h.seq > expected:
            self._gap = _Gap(name, lineno, h.seq, expected, REORDER_WINDOW)
            return
        self._problem("reordered", name, lineno, f"seq {h.seq} comes after seq {self._last_seq}", h.seq)

    def _check_gap_record(self, h: Header, name: str, lineno: int) -> None:
        """A writer's ``gap`` record: it links to the last record left and skips the lost seqs."""
        if self._gap is not None:
            self._gap_is_deletion()
        data = self._data(h)
        if self._last_seq is None:
            self._first = (name, lineno, h.seq, h.prev)
            self._first_pos = (self._file_index, lineno)
            self._first_is_gap = digest_matches(h.prev, GENESIS)
        elif h.seq <= self._last_seq:
            self._problem("reordered", name, lineno, f"seq {h.seq} comes after seq {self._last_seq}", h.seq)
            return
        elif not digest_matches(h.prev, self._last_hash):
            lf, ll = self._last_line
            self._problem("edited", lf, ll,
                          f"the next record (line {lineno}) does not link to it: it was replaced or re-hashed",
                          self._last_seq)
            return
        missing = data.get("missing")
        lost = (f"seq {missing[0]}..{missing[1]} lost" if isinstance(missing, list) and len(missing) == 2
                else "an unknown number of records lost")
        self.gaps.append(Finding("gap", name, lineno,
                                 f"a writer found records missing: {lost} ({str(data.get('reason', ''))[:200]})",
                                 h.seq))

    def _data(self, h: Header) -> dict[str, Any]:
        try:
            data = json.loads(self._prefix_json(h)).get("data", {})
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _gap_is_deletion(self) -> None:
        gap = self._gap
        assert gap is not None
        self._gap = None
        missing = f"seq {gap.expected}" if gap.seq - gap.expected == 1 else f"seq {gap.expected}..{gap.seq - 1}"
        self._problem("deleted", gap.file, gap.line, f"{missing} missing before this record (seq {gap.seq})", gap.seq)

    def _advance(self, h: Header, name: str, lineno: int) -> None:
        self._before_last_hash = self._last_hash if self._last_seq is not None else None
        self._last_seq = h.seq
        self._last_hash = h.digest
        self._last_line = (name, lineno)
        if h.event == Event.PRUNED:
            try:
                data = json.loads(self._prefix_json(h)).get("data", {})
            except ValueError:
                data = {}
            through, anchor = data.get("through_seq"), data.get("anchor")
            if isinstance(through, int) and isinstance(anchor, str):
                self._anchors.append((through, anchor))
        if h.seq in self._anchor_want:
            self._anchor_seen[h.seq] = h.digest
        if self.head is not None and h.seq == self.head.seq and name == self.head_file:
            self._head_seen = True
            if not digest_matches(h.digest, self.head.hash) and not self._broken:
                self._problem("edited", name, lineno,
                              "this record differs from the one the head file recorded: replaced", h.seq)

    @staticmethod
    def _prefix_json(h: Header) -> bytes:
        # The prefix is the line without its hash: still a JSON object once closed.
        return h.prefix + b"}"

    def _finish(self) -> None:
        if self._bad is not None:
            self._bad_line_unexplained()
        if self._gap is not None:
            self._gap_is_deletion()
        if self._first is not None:
            name, line, seq, prev = self._first
            if self._first_is_gap:
                pass  # the gap record says what was lost before it
            elif seq == 1:
                if prev != GENESIS:
                    self._problem("edited", name, line, "the first record does not start the chain", seq,
                                  pos=self._first_pos)
            elif any(t == seq - 1 and digest_matches(a, prev) for t, a in self._anchors):
                self.notes.append(Finding("pruned", name, line, f"records 1..{seq - 1} were pruned (anchored)", seq))
            else:
                self._problem("deleted", name, line,
                              f"the log starts at seq {seq}: seq 1..{seq - 1} missing and no prune record "
                              "accounts for them", seq, pos=self._first_pos)
        if self.head is not None and self.head_file is not None:
            if self.head.seq < 0:
                self._problem("edited", self.head_file + ".head", 1, "the head file is damaged", pos=(1 << 30, 0))
            elif self._last_seq is not None and self.head.seq > self._last_seq:
                self._problem("truncated", self.head_file, self._last_line[1] + 1,
                              f"the log ends at seq {self._last_seq} but seq {self.head.seq} was committed: "
                              "records were cut off the end", pos=(1 << 30, 0))
            elif self._last_seq is None and self.head.seq > 0:
                self._problem("truncated", self.head_file, 1,
                              f"the log is empty but seq {self.head.seq} was committed", pos=(1 << 30, 0))
        if self.head is not None and self.head.seq > 0 and self._last_seq is not None \
                and self._last_seq > self.head.seq:
            self.notes.append(Finding(
                "after_head", self.head_file or "", self._last_line[1],
                f"{self._last_seq - self.head.seq} record(s) after the last committed head (seq {self.head.seq}): "
                "a writer was cut off before updating the head, or records were appended outside the broker"))
        self._finish_head()
        self._finish_anchors()
        if self._mac is not None and self.records and ALG_HMAC not in self._algs:
            self._problem("forged", self.files[0] if self.files else "", 1,
                          "no record is keyed although an audit key is configured: the chain was recomputed "
                          "without the key (or nothing was written since the key was configured)", pos=(0, 0))

    def _finish_head(self) -> None:
        end = (1 << 30, 0)
        if self.head_missing and self.records and self.head_file is not None:
            self._problem("truncated", self.head_file + ".head", 1,
                          "the head file is missing: records may have been cut off the end", pos=end)
        if self.active_missing is not None and self.records:
            head = self.head
            if head is not None and head.seq == self._last_seq and digest_matches(head.hash, self._last_hash) \
                    and self._head_authentic(head) is not False:
                self.notes.append(Finding("active_missing", self.active_missing, 0,
                                          "the active file is missing but the head names the last rotated record "
                                          "(a crash during a rotation; the next writer creates it)"))
            else:
                self._problem("deleted", self.active_missing, 0,
                              "the active file is missing: records after the last rotated file may have been "
                              "deleted", pos=end)
        head = self.head
        if head is not None and head.seq >= 0 and self._mac is not None and ALG_HMAC in self._algs \
                and self._head_authentic(head) is False:
            self._problem("forged", (self.head_file or self.active_missing or "") + ".head", 1,
                          "the head file is not authenticated by the audit key: rewritten to fit a shortened log "
                          "(or left by an older credbroker; the next writer records a gap)", pos=end)

    def _head_authentic(self, head: Head) -> bool | None:
        """None when it cannot be checked (no key)."""
        if self.key is None:
            return None
        if head.mac is None or head.kid != self.key_id:
            return False
        mac = labelled_mac(self.key, HEAD_LABEL)(head_message(head.seq, head.hash, head.kid))
        return digest_matches(mac, head.mac)

    def _finish_anchors(self) -> None:
        end = (1 << 30, 1)
        for finding in self._anchors_bad:
            self.problems.append((end, finding))
            self._broken = True
        first_seq = self._first[2] if self._first is not None else None
        for seq, anchors in sorted(self._anchor_want.items()):
            for a in anchors:
                place = f"Vault {self.anchor_place} version {a.version}"
                seen = self._anchor_seen.get(seq)
                if seen is not None:
                    if not digest_matches(seen, a.hash):
                        self._problem("edited", place, 0, f"the log's record at seq {seq} is not the one anchored "
                                      "in Vault: the log was rewritten", seq, pos=end)
                elif self._last_seq is None or seq > self._last_seq:
                    self._problem("truncated", place, 0,
                                  f"Vault holds an anchor for seq {seq} but the log ends at seq {self._last_seq or 0}: "
                                  "records were cut off after the anchor (every local file may have been rewritten)",
                                  seq, pos=end)
                elif first_seq is not None and seq < first_seq and not self._first_is_gap and any(
                        t >= seq for t, _ in self._anchors):
                    self.notes.append(Finding("anchor", place, 0, f"anchored seq {seq} was pruned", seq))
                elif any(g.seq is not None and g.seq > seq for g in self.gaps):
                    self.notes.append(Finding("anchor", place, 0, f"anchored seq {seq} is among the records a "
                                              "recorded gap lost", seq))
                else:
                    self._problem("deleted", place, 0, f"Vault holds an anchor for seq {seq}, which the log does "
                                  "not hold", seq, pos=end)

    def result(self) -> VerifyResult:
        """The status after ``walk`` has been exhausted."""
        problem = min(self.problems, key=lambda p: p[0])[1] if self.problems else None
        alg = None
        if self._algs:
            alg = ALG_HMAC if ALG_HMAC in self._algs else ALG_SHA256
        gaps = tuple(Finding(g.kind, g.file, g.line, g.message + "; " + self._acks.get(g.seq or 0, "NOT acknowledged"),
                             g.seq) for g in self.gaps)
        if problem is not None:
            status = "broken"
        elif gaps:
            status = "gap"
            problem = gaps[0]
        elif self._unverifiable:
            status = "unverified"
            problem = Finding(
                "unverified", self.files[-1] if self.files else "", 0,
                f"{self._unverifiable} records are keyed (key id {self._unverifiable_kid}) and no audit key is "
                "available to check them; set [audit] key or CREDBROKER_AUDIT_KEY")
        elif self.records == 0:
            status = "empty"
        else:
            status = "intact"
        first_seq = self._first[2] if self._first else None
        return VerifyResult(status=status, records=self.records, files=tuple(self.files), first_seq=first_seq,
                            last_seq=self._last_seq, alg=alg, key_id=self.key_id or self._unverifiable_kid,
                            problem=problem, notes=tuple(self.notes), gaps=gaps,
                            anchors_checked=None if self.anchors is None else len(self._anchor_seen))


def order_files(paths: Sequence[Path]) -> list[Path]:
    """Explicit files in chain order (by their first record's seq; unreadable ones last, as given)."""
    keyed = []
    for i, p in enumerate(paths):
        if not p.is_file():
            raise AuditError(f"no audit log at {p}", "check the path")
        h = first_header(p)
        keyed.append(((0, h.seq, i) if h else (1, 0, i), p))
    return [p for _, p in sorted(keyed, key=lambda t: t[0])]


def make_verifier(active: Path | None, files: Sequence[Path], key: bytes | None, *, whole_set: bool = False,
                  anchors: Sequence[Any] | None = None, anchor_place: str = "") -> Verifier:
    """A Verifier that also checks the head file when the active log is among ``files``.

    ``whole_set``: ``files`` is the active log's whole set, so a missing active
    file (rotated files left) or a missing head is itself a finding.
    """
    head = None
    head_file = None
    head_missing = False
    active_missing = None
    if active is not None and any(p.resolve() == active.resolve() for p in files if p.exists()):
        head = read_head(active)
        head_file = str(next(p for p in files if p.exists() and p.resolve() == active.resolve()))
        head_missing = head is None and whole_set
    elif active is not None and whole_set and not active.exists() and rotated_files(active):
        active_missing = str(active)
        head = read_head(active)
    return Verifier(key=key, head=head, head_file=head_file, head_missing=head_missing, active_missing=active_missing,
                    anchors=anchors, anchor_place=anchor_place,
                    active_name=str(active) if active is not None else None)


def verify_files(files: Sequence[Path] | None, *, active: Path, key: bytes | None = None,
                 anchors: Sequence[Any] | None = None, anchor_place: str = "") -> VerifyResult:
    """Verify explicit ``files`` (any order), or the whole log set of ``active``.

    ``anchors`` (``anchor.Anchor``, as ``anchor.read_all`` returns them) are compared
    with the chain: each must name a record the log holds, with the same hash.
    """
    if files:
        paths = order_files(files)
        # An explicitly named active log gets its head check too.
        verifier = make_verifier(paths[-1] if (Path(str(paths[-1]) + ".head")).exists() else None, paths, key,
                                 anchors=anchors, anchor_place=anchor_place)
    else:
        paths = log_set(active)
        if not paths:
            head = read_head(active)
            if anchors or head is not None:
                # The log is gone, but its head (or Vault) remembers records.
                verifier = Verifier(key=key, head=head, head_file=str(active) if head is not None else None,
                                    anchors=anchors, anchor_place=anchor_place, active_name=str(active))
                return verifier.check([])
            raise AuditError(f"no audit log at {active}", "check [audit] path / $CREDBROKER_AUDIT_LOG")
        verifier = make_verifier(active, paths, key, whole_set=True, anchors=anchors, anchor_place=anchor_place)
    return verifier.check(paths)


def _record_field(h: Header, name: str) -> str | None:
    try:
        value = json.loads(h.prefix + b"}").get(name)
    except ValueError:
        return None
    return value if isinstance(value, str) else None
