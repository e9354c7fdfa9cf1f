"""Patterns in signature failures, called out as findings instead of left in a table.

Pure logic over what the report's pass collected (no I/O), so each pattern is
tested with recorded events:

- failures that start right after a rotation of that profile: the new secret
  may not be registered at the exchange;
- a profile whose failures all come from one of the hosts it runs on: that
  host's outbound IP may have changed (or its copy of the key differs);
- a failure on a key that had none in the weeks before;
- a burst: more than ``burst`` failures within one minute;
- a listenKey gone (-1125, or the stream's error) within its 60 minutes of
  life: something with the API key closed it.

Each finding names the records (sequence numbers) it rests on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import NamedTuple

from .model import FINDING_ORDER, Finding, FindingKind

#: Failures that begin this soon after a rotation are read as caused by it.
AFTER_ROTATION = timedelta(hours=24)
#: A key "had no failures" when it had none for this long before (and was in use that long).
QUIET_BEFORE = timedelta(days=14)
BURST_WINDOW = timedelta(minutes=1)
DEFAULT_BURST = 10
SEQ_CAP = 50  # sequence numbers listed per finding; counts stay exact


class FailureMark(NamedTuple):
    """One signature_failure record, as much as the patterns need."""

    seq: int
    ts: str
    profile: str
    host: str
    key: str  # the API key masked to its last 4, or "" when the record has none
    label: str  # "-1022" / "HTTP 401"


class RotationMark(NamedTuple):
    """A new version of a profile's secret first seen in the log (rotation_detected or a fetch)."""

    seq: int
    ts: str
    profile: str
    old_version: int | None
    new_version: int | None


def _dt(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def _seqs(marks: Iterable[FailureMark], *extra: int) -> tuple[int, ...]:
    out = list(extra)
    for m in marks:
        if len(out) >= SEQ_CAP:
            break
        out.append(m.seq)
    return tuple(out)


def _codes(marks: Sequence[FailureMark]) -> str:
    return ", ".join(sorted({m.label for m in marks}))


def after_rotation(failures: Sequence[FailureMark], rotations: Sequence[RotationMark], since: str) -> list[Finding]:
    """Failures of a profile that begin within ``AFTER_ROTATION`` of its rotation, none in as long before."""
    out = []
    by_profile: dict[str, list[RotationMark]] = {}
    for r in rotations:
        by_profile.setdefault(r.profile, []).append(r)
    for profile, rots in by_profile.items():
        mine = [f for f in failures if f.profile == profile]
        for i, rot in enumerate(rots):
            t = _dt(rot.ts)
            end = _dt(rots[i + 1].ts) if i + 1 < len(rots) else None
            before = [f for f in mine if t - AFTER_ROTATION <= _dt(f.ts) < t]
            after = [f for f in mine if f.ts >= rot.ts and (end is None or _dt(f.ts) < end)]
            if before or not after or _dt(after[0].ts) - t > AFTER_ROTATION or after[-1].ts < since:
                continue
            version = f" (v{rot.old_version} -> v{rot.new_version})" if rot.new_version is not None else ""
            out.append(Finding(
                kind=FindingKind.FAILURES_AFTER_ROTATION, profile=profile, first=rot.ts, last=after[-1].ts,
                seqs=_seqs(after, rot.seq), count=len(after),
                summary=f"{len(after)} signature failure(s) ({_codes(after)}) began "
                        f"{_ago(_dt(after[0].ts) - t)} after the rotation of {profile}{version}, with none in the "
                        f"{_ago(AFTER_ROTATION)} before it",
                advice="the new secret may not be registered at the exchange: check that the API key in Binance's "
                       "API management and the api_key of the new Vault version are the same key pair",
                host=after[0].host if len({f.host for f in after}) == 1 else None,
            ))
    return out


def on_one_host(failures: Sequence[FailureMark], hosts: Mapping[str, set[str]], since: str) -> list[Finding]:
    """A profile whose bots ran on several hosts (``hosts``: profile -> hosts that started it in the
    period) and whose failures in the period come from one of them only."""
    out = []
    for profile in sorted({f.profile for f in failures if f.ts >= since}):
        mine = [f for f in failures if f.profile == profile and f.ts >= since]
        where = {f.host for f in mine}
        others = hosts.get(profile, set()) - where
        if len(where) != 1 or not others:
            continue
        host = next(iter(where))
        out.append(Finding(
            kind=FindingKind.FAILURES_ON_ONE_HOST, profile=profile, first=mine[0].ts, last=mine[-1].ts,
            seqs=_seqs(mine), count=len(mine), host=host,
            summary=f"{len(mine)} signature failure(s) ({_codes(mine)}) of {profile}, all on host {host}; "
                    f"{', '.join(sorted(others))} ran it without any",
            advice=f"that host's outbound IP may have changed: compare {host}'s public IP with the key's IP "
                   f"allow-list, and its copy of the profile with the other hosts'",
        ))
    return out


def first_on_key(failures: Sequence[FailureMark], first_use: Mapping[str, str], since: str) -> list[Finding]:
    """The first failure in ``QUIET_BEFORE`` on a key that was in use all that time."""
    out = []
    last_seen: dict[tuple[str, str], str] = {}
    flagged: dict[tuple[str, str], list[FailureMark]] = {}
    for f in failures:
        key = (f.profile, f.key)
        previous = last_seen.get(key)
        last_seen[key] = f.ts
        if key in flagged:
            flagged[key].append(f)
            continue
        if f.ts < since:
            continue
        used_since = first_use.get(f.profile)
        quiet_from = _dt(f.ts) - QUIET_BEFORE
        if used_since is None or _dt(used_since) > quiet_from:
            continue  # not enough history to call it new
        if previous is not None and _dt(previous) >= quiet_from:
            continue
        flagged[key] = [f]
    for (profile, api_key), marks in flagged.items():
        shown = f"key ...{api_key}" if api_key else "key"
        out.append(Finding(
            kind=FindingKind.FIRST_FAILURE_ON_KEY, profile=profile, first=marks[0].ts, last=marks[-1].ts,
            seqs=_seqs(marks), count=len(marks), host=marks[0].host if len({m.host for m in marks}) == 1 else None,
            summary=f"first signature failure ({_codes(marks)}) on {profile}'s {shown} in "
                    f"{QUIET_BEFORE.days} days of use, from host {marks[0].host}",
            advice="something changed for a key that worked: read the failure's causes below, and if none "
                   "applies treat the key as leaked (disable it at the exchange, rotate it)",
        ))
    return out


def bursts(failures: Sequence[FailureMark], burst: int, since: str) -> list[Finding]:
    """More than ``burst`` failures of one profile within one minute; overlapping windows merge."""
    out = []
    for profile in sorted({f.profile for f in failures if f.ts >= since}):
        window: deque[FailureMark] = deque()
        current: list[FailureMark] | None = None
        runs: list[list[FailureMark]] = []
        for f in (f for f in failures if f.profile == profile and f.ts >= since):
            t = _dt(f.ts)
            window.append(f)
            while t - _dt(window[0].ts) >= BURST_WINDOW:
                window.popleft()
            if len(window) > burst:
                if current is None or _dt(current[-1].ts) < _dt(window[0].ts):
                    current = list(window)
                    runs.append(current)
                else:
                    current.extend(m for m in window if m.seq > current[-1].seq)
        for run in runs:
            out.append(Finding(
                kind=FindingKind.FAILURE_BURST, profile=profile, first=run[0].ts, last=run[-1].ts,
                seqs=_seqs(run), count=len(run), host=run[0].host if len({m.host for m in run}) == 1 else None,
                summary=f"{len(run)} signature failures ({_codes(run)}) of {profile} between "
                        f"{run[0].ts[11:19]} and {run[-1].ts[11:19]} UTC on {run[0].ts[:10]}: more than {burst} "
                        "in a minute",
                advice="a bot retrying in a loop, or someone trying the key: check which process sent them "
                       "(host, pid) and stop it; if none of yours did, disable the key at the exchange",
            ))
    return out


class ListenKeyMark(NamedTuple):
    """One listen_key_* record: ``alive`` (created, kept alive, recreated) or ``gone`` (-1125, a stream error)."""

    seq: int
    ts: str
    profile: str
    host: str
    key: str  # the API key masked to its last 4, or ""
    alive: bool
    label: str


#: A listenKey lives this long after its creation or last keepalive (Binance); less a margin for clocks.
LISTEN_KEY_LIFE = timedelta(minutes=55)


def listen_key_closed_early(marks: Sequence[ListenKeyMark], since: str) -> list[Finding]:
    """A listenKey the exchange called gone (-1125, or the stream's error) within its 60 minutes of life:
    it did not expire, someone closed it, and closing takes only the API key."""
    out = []
    last_alive: dict[tuple[str, str], ListenKeyMark] = {}
    early: dict[tuple[str, str], list[tuple[ListenKeyMark, ListenKeyMark]]] = {}
    for m in marks:
        key = (m.profile, m.key)
        if m.alive:
            last_alive[key] = m
            continue
        alive = last_alive.get(key)
        if m.ts >= since and alive is not None and _dt(m.ts) - _dt(alive.ts) < LISTEN_KEY_LIFE:
            early.setdefault(key, []).append((alive, m))
            del last_alive[key]  # one finding per life of a key
    for (profile, api_key), pairs in early.items():
        gone = [g for _, g in pairs]
        shown = f"key ...{api_key}" if api_key else "API key"
        first_alive, first_gone = pairs[0]
        out.append(Finding(
            kind=FindingKind.LISTEN_KEY_CLOSED_EARLY, profile=profile, first=first_gone.ts, last=gone[-1].ts,
            seqs=tuple(s for a, g in pairs for s in (a.seq, g.seq))[:SEQ_CAP], count=len(gone),
            host=first_gone.host if len({g.host for g in gone}) == 1 else None,
            summary=f"{len(gone)} time(s) the listenKey of {profile}'s {shown} was gone ({_labels(gone)}) "
                    f"{_ago(_dt(first_gone.ts) - _dt(first_alive.ts))} after it was last created or kept alive: "
                    "it had not expired (60 minutes), so something closed it",
            advice="closing a listenKey takes only the API key: if no bot of yours using this API key closed it, "
                   "someone else holds the key: disable it at the exchange and rotate it",
        ))
    return out


def _labels(marks: Sequence[ListenKeyMark]) -> str:
    return ", ".join(sorted({m.label for m in marks}))


def find_all(failures: Sequence[FailureMark], rotations: Sequence[RotationMark], *, since: str,
             hosts: Mapping[str, set[str]], first_use: Mapping[str, str], burst: int = DEFAULT_BURST,
             listen_keys: Sequence[ListenKeyMark] = ()) -> tuple[Finding, ...]:
    """Every pattern, most urgent kind first, then by time."""
    found = (after_rotation(failures, rotations, since) + on_one_host(failures, hosts, since)
             + first_on_key(failures, first_use, since) + bursts(failures, burst, since)
             + listen_key_closed_early(listen_keys, since))
    order = {kind: i for i, kind in enumerate(FINDING_ORDER)}
    return tuple(sorted(found, key=lambda f: (order[f.kind], f.first, f.profile)))


def _ago(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"
