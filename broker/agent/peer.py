"""Who may connect to the signing agent: the bot's process tree, checked from ``/proc``.

At every connection the agent reads the peer's credentials (``SO_PEERCRED``):
the uid must be the bot's, and the pid must be the bot the broker started or
one of its descendants (the parent chain in ``/proc/PID/stat`` leads to the
child's pid). A process the bot double-forked away (re-parented to init) is
outside the tree and refused too. The check never blocks: the uid (one
``getsockopt``) first, then the parent chain.

Refusals are counted per peer (``RefusalTally``) and recorded once per window,
never one fsync each. The signing proxy uses ``in_tree`` for its TCP peers.
"""

from __future__ import annotations

import os
from typing import Any

_MAX_TREE_DEPTH = 128
_MAX_OUTSIDERS = 4096

#: Refusals are counted per peer and recorded once per window of this many seconds.
REFUSAL_WINDOW = 10.0
#: Peers recorded one by one per window; the rest share one record.
MAX_PEERS_RECORDED = 64


def _stat(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (None if the process is gone).

    Read with ``os.open``/``os.read``: a third of the cost of ``open()``, and this
    runs for every connection a stranger makes.
    """
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ')'.
    try:
        return data[data.rindex(b")") + 2:].split()
    except ValueError:
        return None


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` from ``/proc/PID/stat`` (None if it is gone)."""
    fields = _stat(pid)
    try:
        return int(fields[1]) if fields is not None else None
    except (ValueError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot): with the pid, names one process, never its successor."""
    fields = _stat(pid)
    try:
        return int(fields[19]) if fields is not None else None
    except (ValueError, IndexError):
        return None


def in_tree(pid: int, root: int) -> bool:
    """True when ``pid`` is ``root`` or one of its descendants."""
    return tree_walk(pid, root) is True


def tree_walk(pid: int, root: int) -> bool | None:
    """True: ``pid`` is ``root`` or below it; False: the chain reached init without it;
    None: a process of the chain vanished during the walk (no lasting verdict)."""
    current: int | None = pid
    for _ in range(_MAX_TREE_DEPTH):
        if current is None:
            return None
        if current <= 1:
            return False
        if current == root:
            return True
        current = parent_pid(current)
    return False


class PeerCheck:
    """The refusal verdict for a connecting peer, remembering processes found outside the tree."""

    def __init__(self, peer_uid: int) -> None:
        #: the uid the bot runs as
        self.peer_uid = peer_uid
        #: pid -> (start time, bot pid) of processes found outside the bot's tree.
        self._outsiders: dict[int, tuple[int, int]] = {}

    def refusal(self, pid: int, uid: int, child: int | None) -> str | None:
        """Why a peer may not sign (None: it may). Never blocks; the cheapest checks come first."""
        if uid != self.peer_uid:
            return f"uid {uid} is not the bot's"
        if child is None:
            return "no bot is running"
        # A process whose whole parent chain up to init lies outside the bot's tree never
        # enters it (re-parenting only moves a process to one of its own ancestors), so that
        # verdict is remembered for the process (pid and start time) and the bot's pid: a
        # stranger's repeated connections cost one /proc read each.
        started = start_time(pid)
        if started is not None and self._outsiders.get(pid) == (started, child):
            return f"pid {pid} is not the bot (pid {child}) or one of its descendants"
        verdict = tree_walk(pid, child)
        if verdict is not True:
            if verdict is False and started is not None:
                if len(self._outsiders) >= _MAX_OUTSIDERS:
                    self._outsiders.clear()
                self._outsiders[pid] = (started, child)
            return f"pid {pid} is not the bot (pid {child}) or one of its descendants"
        return None


class RefusalTally:
    """Refused connections counted per peer, turned into one audit record per peer per window."""

    def __init__(self, window: float | None = None, max_peers: int | None = None) -> None:
        self.window = REFUSAL_WINDOW if window is None else window
        self.max_peers = MAX_PEERS_RECORDED if max_peers is None else max_peers
        self.counts: dict[tuple[int | None, int | None, str], int] = {}
        self.started: float | None = None

    def add(self, pid: int | None, uid: int | None, reason: str, now: float) -> int:
        """Count one refusal; how many this peer has had in this window."""
        if self.started is None:
            self.started = now
        key = (pid, uid, reason)
        if key not in self.counts and len(self.counts) >= self.max_peers:
            key = (None, None, "more peers than recorded one by one in this window")
        count = self.counts[key] = self.counts.get(key, 0) + 1
        return count

    def due(self, now: float) -> bool:
        return self.started is not None and now - self.started >= self.window

    def deadline(self) -> float | None:
        return None if self.started is None else self.started + self.window

    def drain(self, profile: str, now: float) -> list[dict[str, Any]]:
        """The records for the window so far (and start a new one)."""
        seconds = 0.0 if self.started is None else round(now - self.started, 3)
        records = [{"profile": profile, "pid": pid, "uid": uid, "reason": reason, "count": count,
                    "window_s": seconds} for (pid, uid, reason), count in self.counts.items()]
        self.counts, self.started = {}, None
        return records
