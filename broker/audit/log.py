"""The writer: one append path for every event, durable, safe with many writers.

How an append works (issue 3, "Durability and concurrency"):

1. ``flock(LOCK_EX)`` on ``audit.log.lock``: several brokers on one host take
   turns, so records never interleave. (A separate lock file, because the log
   itself is renamed when it rotates.)
2. If the file was renamed by another writer (rotation), reopen it. If it
   changed since this process last wrote, read its tail for the last ``seq``
   and ``hash``.
3. A tail without a final newline is what a crash mid-write leaves. It is
   terminated and a ``partial_tail`` record naming its offset, length and
   SHA-256 is written right after it, so ``verify`` can tell it from tampering.
4. Rotate if due (weekly / daily / size), then write every pending line in one
   ``write(2)`` and ``fdatasync(2)`` before the lock is released: a
   ``durable=True`` record is on disk when ``record()`` returns (the runner
   records the fetch/inject before the child starts).
5. Update ``audit.log.head`` with the last seq and hash (truncation check).

Batched appends (signatures, high-rate events) are the same path with many
records per write and per fsync (group commit)::

    with log.batch():                 # flushes at the end of the block
        for ... in ...:
            log.record("sign", {...}, durable=False)

or ``log.record(..., durable=False)`` and later ``log.flush()``. Pending
records are also flushed when 1000 are waiting, when the oldest has waited a
second (checked at the next ``record``), by any durable record (order is
kept), and at interpreter exit.

``[audit] fsync = "group"`` (the way Vault's file audit device works, which
does not fsync each entry): a batch commit (``flush()``) writes its records
to the file and updates nothing else before it returns, so the records are
in the kernel's page cache when the signing agent answers (a crash of
credbroker loses none); a background thread then fdatasyncs the file and
writes the head. A record is fsynced at most ``FSYNC_GROUP_WINDOW`` (50 ms)
after it was written: a ``flush()`` that finds older records still waiting
for the disk fsyncs them itself before it returns. A crash of the machine
(power loss, kernel panic) can therefore lose the records of the last 50 ms,
and the head may name a record a little before the last one (which the gap
check accepts, as it accepts a writer cut off between its write and its head
update). ``durable=True`` records are fsynced before they return in both modes.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple

from ..events import Event
from ..errors import AuditError
from ..secret import Secret
from .chain import (
    ALG_HMAC,
    ALG_SHA256,
    EVENT_NAME,
    FORMAT_VERSION,
    GENESIS,
    HEAD_LABEL,
    MAX_LINE,
    Header,
    build_prefix,
    digest_matches,
    encode_rest,
    finish_line,
    labelled_mac,
    make_hasher,
    utc_timestamp,
)
from .files import (
    Head,
    encode_head,
    first_header,
    head_message,
    head_path,
    last_header,
    lock_path,
    read_head,
    read_tail,
    rotated_files,
)
from .keys import key_id
from .settings import FSYNC_GROUP_WINDOW, AuditSettings, ensure_private_folder

BATCH_MAX = 1000
#: How every record line, and so every audit log file, begins (``chain.build_prefix``).
_RECORD_START = f'{{"v":{FORMAT_VERSION},"seq":'.encode()
BATCH_MAX_AGE = 1.0
#: Group mode: the syncer fsyncs once the oldest unsynced commit is this old (half the window:
#: the other half is the fsync's own time before a writer would wait for the disk itself).
SYNCER_DELAY = FSYNC_GROUP_WINDOW / 2

#: Event names (every one is in ``broker.events.Event``; these names stay importable from here).
#: The schema stays open: any name matching ``[a-z][a-z0-9_]*`` is accepted.
SECRET_FETCHED = Event.SECRET_FETCHED
SECRET_INJECTED = Event.SECRET_INJECTED
CHILD_EXITED = Event.CHILD_EXITED
REFUSED = Event.REFUSED
SIGNATURE_FAILURE = Event.SIGNATURE_FAILURE
ROTATION_DETECTED = Event.ROTATION_DETECTED
#: Written by the audit log itself.
PARTIAL_TAIL = Event.PARTIAL_TAIL
PRUNED = Event.PRUNED
AUDIT_KEYED = Event.AUDIT_KEYED
#: Records were lost (the log is shorter than its head, the head or the active file is missing):
#: written by the first writer that finds it, before anything else. A keyed log then takes no
#: record but ``gap_acknowledged`` (``credbroker audit acknowledge-gap``).
GAP = Event.GAP
GAP_ACKNOWLEDGED = Event.GAP_ACKNOWLEDGED
ANCHOR_FAILED = Event.ANCHOR_FAILED




def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


#: Exactly these types are plain scalars (not subclasses: a str subclass may carry anything).
_SCALARS = frozenset({str, int, bool, type(None)})


def check_fields(value: Any, where: str = "fields") -> Any:
    """A JSON-ready copy of ``value``; AuditError for a secret or anything not plain data.

    The guard that keeps secret values out of the log: a ``Secret`` (or a
    ``Credentials``, whose values are Secrets) anywhere in the fields is refused.
    """
    if type(value) is dict and all(type(k) is str and (type(v) in _SCALARS or type(v) is list and all(
            type(x) in _SCALARS for x in v)) for k, v in value.items()):
        # The common flat record (names, numbers, lists of names): one pass, no recursion.
        return {k: list(v) if type(v) is list else v for k, v in value.items()}
    if isinstance(value, Secret):
        raise AuditError(
            f"refusing to write a secret value into the audit log ({where})",
            "record field names, versions and paths, never values",
        )
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise AuditError(f"audit field {where} is not a finite number", "record a finite number")
        return value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise AuditError(f"audit field {where} has a non-string key", "use string keys")
            out[k] = check_fields(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [check_fields(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise AuditError(f"refusing raw bytes in the audit log ({where})", "record names or lengths, never bytes")
    raise AuditError(
        f"audit field {where} is a {type(value).__name__}, not plain data",
        "pass str, int, float, bool, None, lists and dicts",
    )


#: Event names (plain str) already checked against ``EVENT_NAME``: a few dozen in practice.
_VALID_EVENTS: set[str] = set()

_STR_KEYS = frozenset({str})


# NamedTuples and a slotted class, not dataclasses: this module is on every
# `credbroker run`, and each dataclass costs about a millisecond to create.
class _Pending(NamedTuple):
    ts: str
    event: str
    rest: str
    record: dict[str, Any]


class _State:
    """What the writer knows of the active file's end (mutable: updated per commit)."""

    __slots__ = ("ino", "size", "seq", "hash", "alg", "kid", "event")

    def __init__(self, ino: int, size: int, seq: int, hash: str, alg: str | None, kid: str | None,
                 event: str | None = None) -> None:
        self.ino = ino
        self.size = size
        self.seq = seq
        self.hash = hash
        self.alg = alg
        self.kid = kid
        self.event = event  # the last record's event (an unacknowledged gap stops a keyed log)


class _Gap(NamedTuple):
    """What a writer found missing, for the ``gap`` record."""

    reason: str
    last_seq: int  # the last record still there (0: none)
    head_seq: int | None  # what the head named, when it could be trusted
    skip_to: int  # the gap record's own seq - 1 (seq numbers of lost records are never reused)


_LIVE: weakref.WeakSet[AuditLog] = weakref.WeakSet()


def _flush_all_at_exit() -> None:
    for log in list(_LIVE):
        try:
            log.flush()
            log.sync()
        except Exception:  # noqa: BLE001 - at exit, nowhere left to raise to
            pass
        try:
            log.anchor_now()  # the end of a run: the head goes to the Vault witness
        except (AuditError, OSError):
            pass  # a failure is already recorded and warned by the anchorer; nothing left to raise to


atexit.register(_flush_all_at_exit)


def _forget_after_fork() -> None:
    """In a forked child: drop the parent's pending records, descriptors and locks.

    Otherwise a child that exits normally would write the parent's batch a second
    time, and an unlock on the shared lock description would release the parent's lock.
    """
    for log in list(_LIVE):
        log._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


class AuditLog:
    """An append-only, hash-chained audit log (see the module docstring)."""

    def __init__(self, settings: AuditSettings, key: Secret | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.path: Path = settings.path
        self._path_str = str(settings.path)
        raw_key = key.reveal() if key is not None else None
        self.key_id: str | None = key_id(raw_key) if raw_key is not None else None
        # The hmac objects keep their own copies of the key for the process lifetime.
        self.alg, self._hash = make_hasher(raw_key)
        self._head_mac = labelled_mac(raw_key, HEAD_LABEL) if raw_key is not None else None
        self.anchorer: Any = None
        if raw_key is not None and env is not None:
            self.anchorer = self._make_anchorer(raw_key, env)
        del raw_key
        self._thread_lock = threading.RLock()
        self._pending: list[_Pending] = []
        self._pending_since = 0.0
        self._upgrade_ok = False
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._state: _State | None = None
        self._first_ts: tuple[int, str | None] | None = None  # (ino, ts of the file's first record)
        self._active_created = False
        self._ack_reason: str | None = None
        self._acked: dict[str, Any] | None = None
        self._host = os.uname().nodename
        self._user = _user()
        self._pid = os.getpid()  # renewed in a forked child
        self._rotate_at: tuple[int, float] | None = None
        self._fd_ino = -1  # inode of self._fd
        self._fresh_stat: os.stat_result | None = None  # the active file's stat, taken this commit  # (ino, epoch when the time rule rotates it)
        # fsync = "group": written-but-not-fsynced commits, synced by a background thread.
        self._group = settings.fsync == "group"
        self._sync_lock = threading.Lock()  # held around fdatasync and around closing the active fd
        self._sync_wake = threading.Condition(self._thread_lock)
        self._written = 0  # commits written (group mode)
        self._unsynced: deque[tuple[int, float]] = deque()  # (commit number, when written), oldest first
        self._sync_thread: threading.Thread | None = None
        self._sync_stop = False
        self._head_seq = -1  # the seq this writer last wrote into the head
        _LIVE.add(self)

    # -- public API ---------------------------------------------------------------------
    def record(self, event: str, fields: Mapping[str, Any], *, durable: bool = True) -> dict[str, Any]:
        """Append one event; return the record (completed with seq/hash once committed).

        ``durable=True``: written and fsync'ed before this returns. ``durable=False``:
        queued for a group commit (``flush()``, ``batch()``, or automatically).
        """
        if type(event) is not str or event not in _VALID_EVENTS:
            if not isinstance(event, str) or not EVENT_NAME.match(event):
                raise AuditError(f"invalid audit event name {event!r}", "use lower-case letters, digits and '_'")
            if type(event) is str and len(_VALID_EVENTS) < 1024:
                _VALID_EVENTS.add(event)  # a plain str that matched: no regex for it again
        pid = self._pid
        if (type(fields) is dict and set(map(type, fields.values())) <= _SCALARS
                and set(map(type, fields)) <= _STR_KEYS):
            # The common flat record (every signature's): checked by type in C, no walk through
            # check_fields; encoded by the same encoder as every other record.
            data: Any = dict(fields)
        else:
            data = check_fields(fields if fields is not None else {}, "fields")
            if not isinstance(data, dict):
                raise AuditError("audit fields must be a mapping", "pass a dict of field name -> value")
        try:
            rest = _encode_record({"data": data, "host": self._host, "pid": pid, "user": self._user})[1:-1]
        except (TypeError, ValueError) as exc:
            raise AuditError(f"audit fields cannot be written as JSON: {type(exc).__name__}", "pass plain data") from None
        if len(rest) > MAX_LINE - 400:
            raise AuditError(f"audit record for {event} is too large ({len(rest)} bytes)", "record less detail")
        ts = utc_timestamp()
        rec: dict[str, Any] = {"v": FORMAT_VERSION, "ts": ts, "event": event, "data": data, "host": self._host,
                               "pid": pid, "user": self._user}
        with self._thread_lock:
            now = time.monotonic()
            if not self._pending:
                self._pending_since = now
            self._pending.append(_Pending(ts, event, rest, rec))
            if durable:
                self._flush(durable=True)
            elif len(self._pending) >= BATCH_MAX or now - self._pending_since >= BATCH_MAX_AGE:
                self.flush()
        return rec

    def flush(self) -> None:
        """Commit every pending record: one write, under the file lock, and one fsync (``fsync =
        "every"``) or a deferred one (``"group"``, see the module docstring)."""
        self._flush(durable=not self._group)

    def sync(self) -> None:
        """Fsync what is written but not yet on disk (group mode) and update the head now."""
        with self._thread_lock:
            if not self._unsynced or self._fd is None or self._state is None:
                return
            try:
                with self._locked():
                    self._sync_locked(self._fd, self._state)
            except OSError as exc:
                raise self._write_error(exc) from exc

    def unsynced(self) -> int:
        """Commits written but not yet fsynced (group mode; 0 in "every" mode)."""
        return len(self._unsynced)

    def _flush(self, *, durable: bool) -> None:
        with self._thread_lock:
            if not self._pending:
                if durable and self._unsynced:
                    self.sync()
                return
            pending, self._pending = self._pending, []
            try:
                self._commit(pending, durable=durable)
            except OSError as exc:
                raise self._write_error(exc) from exc

    def _write_error(self, exc: OSError) -> AuditError:
        return AuditError(
            f"cannot write the audit log {self.path}: {exc.strerror or type(exc).__name__}",
            "check the folder's permissions and free space, or set [audit] path",
        )

    @contextmanager
    def batch(self) -> Iterator[AuditLog]:
        """Group-commit every ``record(..., durable=False)`` made inside the block."""
        try:
            yield self
        finally:
            self.flush()

    def enable_key(self) -> bool:
        """Continue an unkeyed log keyed: write an ``audit_keyed`` record. False if already keyed."""
        if self.key_id is None:
            raise AuditError("no audit key is configured", "set [audit] key or CREDBROKER_AUDIT_KEY")
        with self._thread_lock:
            self.flush()
            self._upgrade_ok = True
            try:
                return self._commit([])
            finally:
                self._upgrade_ok = False

    def check_writable(self) -> None:
        """Open the folder, lock and active file now, and check the chain's end (a gap, a
        key mismatch), so a log that cannot be written stops a caller before it touches
        any secret (fail closed), not after."""
        with self._thread_lock:
            try:
                self.flush()
                self._commit([])
            except OSError as exc:
                raise AuditError(
                    f"cannot write the audit log {self.path}: {exc.strerror or type(exc).__name__}",
                    "check the folder's permissions and free space, or set [audit] path",
                ) from exc

    def last_seq(self) -> int | None:
        """The seq of the last record this writer committed (None before its first commit)."""
        return self._state.seq if self._state is not None else None

    def acknowledge_gap(self, reason: str) -> dict[str, Any] | None:
        """Record an operator's acknowledgment of the unacknowledged gap; None when there is none."""
        if not reason.strip():
            raise AuditError("an acknowledgment needs a reason", "pass --reason TEXT: what happened and who checked")
        with self._thread_lock:
            self.flush()
            self._ack_reason = reason.strip()[:500]
            try:
                self._commit([])
                return self._acked
            finally:
                self._ack_reason = None
                self._acked = None

    def anchor_now(self) -> bool:
        """Anchor the head in Vault now (a run's end); False when it failed (recorded and warned)."""
        anchorer = self.anchorer
        return True if anchorer is None else bool(anchorer.anchor_now())

    def rotate(self) -> Path | None:
        """Rotate the active file now (if it holds any record); return the rotated file's path."""
        with self._thread_lock, self._locked():
            fd = self._open_active()
            if os.fstat(fd).st_size == 0:
                return None
            return self._rotate_locked()

    def close(self) -> None:
        """Flush, fsync, stop the background syncer and release the file descriptors."""
        self._stop_syncer()
        with self._thread_lock:
            try:
                self._flush(durable=True)
            finally:
                for fd in (self._fd, self._lock_fd):
                    if fd is not None:
                        os.close(fd)
                self._fd = self._lock_fd = None
                self._state = None

    def _make_anchorer(self, raw_key: bytes, env: Mapping[str, str]) -> Any:
        from .anchor import Anchorer, place_for, vault_configured
        from .chain import ANCHOR_LABEL

        place = place_for(self.settings, self.key_id)
        if place is None or not vault_configured(env):
            return None
        return Anchorer(env, place, self.settings.anchor_interval.total_seconds(),
                        labelled_mac(raw_key, ANCHOR_LABEL), self.key_id, str(self.path),
                        lambda fields: self.record(ANCHOR_FAILED, fields))

    def _after_fork(self) -> None:
        if self.anchorer is not None:
            self.anchorer.forget_after_fork()
            self.anchorer = None
        self._pid = os.getpid()
        self._thread_lock = threading.RLock()
        self._sync_lock = threading.Lock()
        self._sync_wake = threading.Condition(self._thread_lock)
        self._sync_thread = None
        self._sync_stop = False
        self._unsynced.clear()
        self._pending = []
        self._fd = self._lock_fd = None  # O_CLOEXEC: gone at exec; never used by this child
        self._state = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()

    def __repr__(self) -> str:
        keyed = f"keyed, key id {self.key_id}" if self.key_id else "unkeyed"
        return f"AuditLog({str(self.path)!r}, {keyed})"

    # -- internals ----------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock_fd = self._lock()
        try:
            yield
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)

    def _lock(self) -> int:
        """Take the file lock (``flock`` on ``audit.log.lock``); return its fd for the unlock."""
        lock_fd = self._lock_fd
        if lock_fd is None:
            ensure_private_folder(self.path.parent)
            lock_fd = self._lock_fd = os.open(lock_path(self.path),
                                              os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        return lock_fd

    def _open_active(self) -> int:
        """The active file's fd, reopened if another writer rotated it away."""
        if self._fd is not None:
            try:
                st = os.stat(self._path_str)
                if st.st_ino == self._fd_ino:
                    self._fresh_stat = st  # the same file: _current_state needs no fstat of its own
                    return self._fd
            except FileNotFoundError:
                pass
            with self._sync_lock:  # what group mode left unsynced goes to disk before the fd goes
                if self._unsynced:
                    os.fdatasync(self._fd)
                    self._unsynced.clear()
                os.close(self._fd)
                self._fd = None
            self._state = None
        ensure_private_folder(self.path.parent)
        existed = self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        st = os.fstat(fd)
        if st.st_size and not _RECORD_START.startswith(os.pread(fd, len(_RECORD_START), 0)[:st.st_size]):
            # Another file (a path mistyped, or CREDBROKER_AUDIT_LOG=/etc/passwd under root): neither
            # appended to nor made 0600 (which would lock every other user out of /etc/passwd).
            os.close(fd)
            raise AuditError(f"{self.path} is not a credbroker audit log (its first line is not an audit record); "
                             "nothing was written to it",
                             "point [audit] path or CREDBROKER_AUDIT_LOG at credbroker's own log, or at a file "
                             "that does not exist yet")
        if st.st_mode & 0o077 and st.st_uid == os.getuid():
            os.fchmod(fd, 0o600)  # 0600, whatever the umask or an earlier tool did
        if not existed:
            _fsync_dir(self.path.parent)
        self._fd = fd
        self._fd_ino = st.st_ino
        self._fresh_stat = None
        self._active_created = not existed
        return fd

    def _current_state(self, fd: int) -> tuple[_State, int | None, bytes, _Gap | None]:
        """Last seq/hash, any partial last line a crash left (its offset and bytes), and
        what is missing when the log's end does not match its head."""
        st, self._fresh_stat = self._fresh_stat or os.fstat(fd), None
        cached = self._state
        if cached is not None and cached.ino == st.st_ino and cached.size == st.st_size:
            return cached, None, b"", None
        tail = read_tail(fd, str(self.path))
        created, self._active_created = self._active_created, False
        rotated = rotated_files(self.path)
        last: Header | None = tail.last
        if last is None and rotated:
            last = last_header(rotated[-1])
            if last is None:
                raise AuditError(
                    f"cannot find the last record of {rotated[-1]}",
                    "run `credbroker audit verify` to see what is wrong with it",
                )
        if last is not None:
            state = _State(st.st_ino, st.st_size, last.seq, last.digest, last.alg, last.kid, last.event)
        else:
            state = _State(st.st_ino, st.st_size, 0, GENESIS, None, None)
        gap = self._find_gap(last, created and bool(rotated) and tail.size == 0)
        return state, tail.partial_offset, tail.partial, gap

    def _find_gap(self, last: Header | None, active_missing: bool) -> _Gap | None:
        """Compare the log's last record with the head the last writer left (see ``GAP``)."""
        head = read_head(self.path)
        last_seq = last.seq if last is not None else 0
        if head is None:
            if last is None:
                return None  # a new log
            why = "the active file and the head file are missing" if active_missing else "the head file is missing"
            return _Gap(f"{why}: records may have been cut off the end", last_seq, None, last_seq)
        keyed = last is not None and last.alg == ALG_HMAC
        if head.seq < 0:
            return _Gap("the head file is damaged", last_seq, None, last_seq)
        if keyed and not self._head_authentic(head):
            return _Gap("the head file is not authenticated by the audit key (rewritten, or left by an older "
                        "credbroker)", last_seq, None, last_seq)
        if head.seq > last_seq:
            where = "the active file is missing and " if active_missing else ""
            return _Gap(f"{where}the log ends at seq {last_seq} but the head names seq {head.seq}: records were "
                        "cut off the end", last_seq, head.seq, head.seq)
        if head.seq == last_seq and last is not None and not digest_matches(head.hash, last.digest):
            return _Gap(f"the record at seq {last_seq} is not the one the head names: the end was replaced",
                        last_seq, head.seq, head.seq)
        if head.seq == 0 and last is not None:
            return _Gap("the head names no record but the log holds some", last_seq, None, last_seq)
        # head.seq < last_seq: a writer was cut off between its write and its head update.
        return None

    def _head_authentic(self, head: Head) -> bool:
        if self._head_mac is None or head.mac is None or head.kid != self.key_id:
            return False
        return digest_matches(self._head_mac(head_message(head.seq, head.hash, head.kid)), head.mac)

    def _gap_line(self, state: _State, gap: _Gap) -> bytes:
        """The ``gap`` record: linked to the last record still there, numbered past every lost one."""
        missing = [gap.last_seq + 1, gap.head_seq] if gap.head_seq is not None and gap.head_seq > gap.last_seq \
            else None
        state.seq = max(state.seq, gap.skip_to)
        return self._line(state, utc_timestamp(), GAP, encode_rest({
            "data": {"reason": gap.reason, "last_seq": gap.last_seq, "head_seq": gap.head_seq, "missing": missing},
            "host": self._host, "pid": os.getpid(), "user": self._user}), None)

    def _ack_line(self, state: _State, reason: str) -> bytes:
        data = {"gap_seq": state.seq, "reason": reason}
        rec: dict[str, Any] = {"event": GAP_ACKNOWLEDGED, "data": data}
        line = self._line(state, utc_timestamp(), GAP_ACKNOWLEDGED, encode_rest({
            "data": data, "host": self._host, "pid": os.getpid(), "user": self._user}), rec)
        self._acked = rec
        return line

    def _refuse_after_gap(self, state: _State) -> AuditError:
        return AuditError(
            f"the audit log {self.path} lost records (gap recorded at seq {state.seq}); a keyed log takes no "
            "record until an operator acknowledges it",
            "check with `credbroker audit verify`, then run `credbroker audit acknowledge-gap --reason TEXT`",
        )

    def _recovery_line(self, state: _State, offset: int, partial: bytes) -> bytes:
        """Terminate a crash's partial line and record it in the chain itself."""
        import hashlib

        return b"\n" + self._line(state, utc_timestamp(), PARTIAL_TAIL, encode_rest({
            "data": {"offset": offset, "bytes": len(partial), "sha256": hashlib.sha256(partial).hexdigest()},
            "host": self._host, "pid": os.getpid(), "user": self._user}), None)

    def _line(self, state: _State, ts: str, event: str, rest: str, rec: dict[str, Any] | None) -> bytes:
        """Build the next line on ``state`` and advance it."""
        seq = state.seq + 1
        prefix = build_prefix(seq, ts, event, state.hash, self.alg, self.key_id, rest)
        digest = self._hash(prefix)
        if rec is not None:
            rec.update(seq=seq, prev=state.hash, alg=self.alg, hash=digest)
            if self.key_id:
                rec["kid"] = self.key_id
        state.seq, state.hash, state.alg, state.kid = seq, digest, self.alg, self.key_id
        return finish_line(prefix, digest)

    def _check_key_continuity(self, state: _State) -> bool:
        """Refuse a downgrade or a key change; True when the chain switches from unkeyed to keyed."""
        if state.alg is None:
            return False
        if state.alg == ALG_HMAC and self.alg == ALG_SHA256:
            raise AuditError(
                f"the audit log {self.path} is keyed (key id {state.kid}) but no audit key is configured",
                "set [audit] key or CREDBROKER_AUDIT_KEY to the same key",
            )
        if state.alg == ALG_HMAC and state.kid != self.key_id:
            raise AuditError(
                f"the audit log {self.path} is keyed with key id {state.kid}, not the configured {self.key_id}",
                "configure the same key, or move the log files and its .head aside to start a new chain",
            )
        if state.alg == ALG_SHA256 and self.alg == ALG_HMAC:
            if not self._upgrade_ok:
                # Not implicit: someone who re-chained the file without the key must not
                # get their history blessed by the next keyed writer.
                raise AuditError(
                    f"the audit log {self.path} is unkeyed but an audit key is configured",
                    "check it with `credbroker audit verify`, then run `credbroker audit enable-key` "
                    "to continue the chain keyed (or move the log files and its .head aside)",
                )
            return True
        return False

    def _keyed_marker(self, state: _State) -> bytes:
        """The first keyed record after unkeyed ones says so (verify accepts the unkeyed prefix)."""
        return self._line(state, utc_timestamp(), AUDIT_KEYED, encode_rest({
            "data": {"kid": self.key_id, "unkeyed_through": state.seq},
            "host": self._host, "pid": os.getpid(), "user": self._user}), None)

    def _rotation_due(self, fd: int, size: int, adding: int) -> bool:
        if size == 0:
            return False
        if size + adding > self.settings.max_size:
            return True
        if self.settings.rotate == "size":
            return False
        ino = self._fd_ino
        if self._rotate_at is None or self._rotate_at[0] != ino:
            self._rotate_at = (ino, self._rotation_time(ino))
        return time.time() >= self._rotate_at[1]

    def _rotation_time(self, ino: int) -> float:
        """When the active file (``ino``) is due by the calendar rule: the start of the UTC day
        (daily) or ISO week (weekly) after its first record's; never when it has none."""
        if self._first_ts is None or self._first_ts[0] != ino:
            first = first_header(self.path)
            self._first_ts = (ino, first.ts if first else None)
        first_ts = self._first_ts[1]
        if first_ts is None:
            return float("inf")
        # fromisoformat, not strptime: the same parse without importing _strptime (and its regexes) on every run
        then = datetime.fromisoformat(first_ts[:10]).replace(tzinfo=timezone.utc)
        if self.settings.rotate == "daily":
            return (then + timedelta(days=1)).timestamp()
        return (then + timedelta(days=7 - then.weekday())).timestamp()

    def _rotate_locked(self) -> Path:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        n = 0
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.{stamp}-{n}")
        os.rename(self.path, target)
        _fsync_dir(self.path.parent)
        state = self._state
        self._open_active()  # a new, empty active file
        self._active_created = False  # made by the rotation itself: not a missing file
        if state is not None and self._fd is not None:
            # The chain carries on from the rotated file's last record.
            self._state = _State(os.fstat(self._fd).st_ino, 0, state.seq, state.hash, state.alg, state.kid,
                                 state.event)
        return target

    def _commit(self, pending: list[_Pending], *, durable: bool = True) -> bool:
        # The lock by hand, not ``with self._locked()``: this runs once per signature batch.
        lock_fd = self._lock()
        try:
            return self._commit_locked(pending, durable)
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)

    def _commit_locked(self, pending: list[_Pending], durable: bool) -> bool:
        state = self._state
        fd = self._fd
        if pending and state is not None and fd is not None and self._ack_reason is None:
            # The steady state (every signature batch): the same file, as this writer left it
            # (same inode and size: nobody rotated, appended or cut it), the same algorithm and
            # key id, no gap to refuse over, no rotation due. What the general path below does
            # then, without its checks' calls; anything else takes the general path.
            try:
                st: os.stat_result | None = os.stat(self._path_str)
            except FileNotFoundError:
                st = None  # removed or renamed away: the general path reopens it and records the gap
            if (st is not None and st.st_ino == self._fd_ino == state.ino and st.st_size == state.size
                    and state.alg == self.alg and state.kid == self.key_id
                    and not (state.event == GAP and self.alg == ALG_HMAC)
                    and not self._rotation_due(fd, state.size, sum([len(p.rest) for p in pending])
                                               + 300 * len(pending))):
                line = self._line
                chunks = [line(state, p.ts, p.event, p.rest, p.record) for p in pending]
                state.event = pending[-1].event
                self._write_locked(fd, state, chunks, durable=durable)
                return True
        fd = self._open_active()
        state, partial_offset, partial, gap = self._current_state(fd)
        switch_to_keyed = self._check_key_continuity(state)  # raises before anything is written
        if partial_offset is not None:
            _write_all(fd, self._recovery_line(state, partial_offset, partial))
            state.size = os.fstat(fd).st_size
        keyed = self.alg == ALG_HMAC and not switch_to_keyed
        if gap is not None:
            # Never continue silently over a gap: say so in the chain itself, first.
            self._write_locked(fd, state, [self._gap_line(state, gap)])
            state.event = GAP
        if self._ack_reason is not None:
            if state.event != GAP:
                self._state = state
                return False
            self._write_locked(fd, state, [self._ack_line(state, self._ack_reason)])
            state.event = GAP_ACKNOWLEDGED
            return True
        if keyed and state.event == GAP:
            self._state = state
            raise self._refuse_after_gap(state)
        chunks = [self._keyed_marker(state)] if switch_to_keyed else []
        if not pending and not chunks:
            self._state = state
            return gap is not None
        estimate = sum([len(p.rest) for p in pending]) + 300 * len(pending)
        if self._rotation_due(fd, state.size, estimate):
            self._state = state
            self._rotate_locked()
            fd = self._open_active()
            assert self._state is not None
            state = self._state
        for p in pending:
            chunks.append(self._line(state, p.ts, p.event, p.rest, p.record))
        if pending:
            state.event = pending[-1].event
        self._write_locked(fd, state, chunks, durable=durable)
        return True

    def _write_locked(self, fd: int, state: _State, chunks: list[bytes], *, durable: bool = True) -> None:
        """Write, then fdatasync and update the head (and tell the anchorer), under the file lock.

        ``durable=False`` (group mode): written only; the syncer thread fsyncs it soon, and this
        writer fsyncs itself when the oldest unsynced commit is older than the window.
        """
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        written = os.write(fd, data)
        if written != len(data):  # a short write (a full disk): write the rest, or raise
            _write_all(fd, data[written:])
        # Under the file lock nobody else appends: the size follows without an fstat.
        state.size += len(data)
        state.ino = self._fd_ino
        self._state = state
        if not durable and self._head_seq >= 0:
            # (A writer's first commit is synced here, head included: a log whose head is
            # missing after a crash would read as records cut off the end.)
            now = time.monotonic()
            self._written += 1
            self._unsynced.append((self._written, now))
            if now - self._unsynced[0][1] < FSYNC_GROUP_WINDOW:
                if len(self._unsynced) == 1:
                    self._wake_syncer()  # the first unsynced commit starts the syncer's clock
                return
        self._sync_locked(fd, state)

    def _sync_locked(self, fd: int, state: _State) -> None:
        """fdatasync ``fd`` (everything written so far) and write the head, under the file lock."""
        with self._sync_lock:
            os.fdatasync(fd)
        self._unsynced.clear()
        self._write_head(state)
        if self.anchorer is not None and state.alg == ALG_HMAC:
            self.anchorer.committed(state.seq, state.hash)

    # -- group mode's syncer ------------------------------------------------------------
    def _wake_syncer(self) -> None:
        """Called with the thread lock held."""
        if self._sync_thread is None:
            self._sync_stop = False
            self._sync_thread = threading.Thread(target=self._syncer, name="credbroker-audit-sync", daemon=True)
            self._sync_thread.start()
        self._sync_wake.notify()

    def _stop_syncer(self) -> None:
        with self._thread_lock:
            thread, self._sync_thread = self._sync_thread, None
            self._sync_stop = True
            self._sync_wake.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)

    def _syncer(self) -> None:
        """Fsync written commits once the oldest is half a window old (one fsync and one head
        write for every commit of that half window, not one per commit: this thread competes
        with the writer for the GIL and the thread lock); then write the head they reach."""
        while True:
            with self._thread_lock:
                while not self._sync_stop:
                    if self._unsynced:
                        delay = self._unsynced[0][1] + SYNCER_DELAY - time.monotonic()
                        if delay <= 0:
                            break
                        self._sync_wake.wait(delay)
                    else:
                        self._sync_wake.wait()
                if self._sync_stop:
                    return
                fd, state, upto = self._fd, self._state, self._written
                if fd is None or state is None:
                    self._unsynced.clear()
                    continue
                head = _State(state.ino, state.size, state.seq, state.hash, state.alg, state.kid)
            try:
                with self._sync_lock:
                    if self._fd != fd:
                        continue  # closed meanwhile: synced before it was closed
                    os.fdatasync(fd)  # the GIL is released: the writer goes on meanwhile
                with self._thread_lock:
                    while self._unsynced and self._unsynced[0][0] <= upto:
                        self._unsynced.popleft()
                    if self._fd == fd and self._lock_fd is not None and head.seq > self._head_seq:
                        with self._locked():
                            self._write_head(head)
                        if self.anchorer is not None and head.alg == ALG_HMAC:
                            self.anchorer.committed(head.seq, head.hash)
            except (OSError, AuditError):
                # The next writer past the window fsyncs itself and reports the error to its caller.
                time.sleep(FSYNC_GROUP_WINDOW)

    def _write_head(self, state: _State) -> None:
        fd = os.open(head_path(self.path), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            mac = None
            if self._head_mac is not None and state.alg == ALG_HMAC:
                mac = self._head_mac(head_message(state.seq, state.hash, self.key_id))
            os.pwrite(fd, encode_head(state.seq, state.hash, self.path.name, self.key_id, mac), 0)
        finally:
            os.close(fd)
        self._head_seq = state.seq


_encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
_encode_rest = _encoder.encode


def _reused_encoder() -> Any:
    """``_encode_rest`` without building the json module's C encoder anew for every record (what
    ``JSONEncoder.encode`` does): the C encoder made once with the same settings, used only if it
    writes a sample exactly as ``_encode_rest`` does and refuses NaN as it does; else ``_encode_rest``.
    (No circular-reference markers: a record's fields are a fresh tree from ``check_fields``.)"""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return _encode_rest
    try:
        iterencode = make(None, _encoder.default, json.encoder.encode_basestring_ascii, None, ":", ",", True,
                          False, False)

        def encode(body: dict[str, Any]) -> str:
            return "".join(iterencode(body, 0))

        sample = {"data": {"s": "é \u2028 \"\\\n", "i": -7, "b": True, "n": None, "f": 1.5, "l": [1, "x", [2.5e-9]],
                           "d": {"z": 1, "a": 2}}, "host": "h", "pid": 1, "user": "ü"}
        if encode(sample) != _encode_rest(sample):
            return _encode_rest
        try:
            encode({"x": float("nan")})
        except ValueError:
            return encode
        return _encode_rest
    except (TypeError, ValueError):  # another Python's C encoder: the general one is always right
        return _encode_rest


_encode_record = _reused_encoder()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(folder: Path) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
