"""Stopping the bot's whole process tree, even when the broker dies by SIGKILL.

``PR_SET_PDEATHSIG`` reaches the broker's direct child only: a bot behind
``sh -c`` or one that ignores SIGTERM would keep trading after the broker is
gone. So every bot runs in a process group of its own, and a small watchdog
process (a separate interpreter, started in a session of its own so no
terminal signal reaches it) holds the read end of a pipe whose only writer is
the broker. The broker names each bot's group on that pipe. When the pipe
closes, because the broker exited or was killed, the watchdog sends SIGTERM to
every group still named, waits up to the grace period, then sends SIGKILL.

On its normal exit paths the broker stops the group itself first
(``stop_group``), then tells the watchdog the group is gone.

Where credbroker may make a cgroup (v2; as root, or in a subtree delegated
to its user), the bot is also moved into a fresh one before it executes, and
everything in it is stopped the same way: a process that left the bot's
process group (``setsid``, a double-forking daemon) is caught there too.
Without a cgroup such a process is outside this net; the README says so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

#: Run as ``python -I -S -c WATCHDOG GRACE``: no site, no imports beyond os/signal/time,
#: so it starts in milliseconds and holds nothing of the broker (not even its environment).
WATCHDOG = r"""
import os, signal, sys, time
for s in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGTSTP, signal.SIGPIPE):
    signal.signal(s, signal.SIG_IGN)
grace = float(sys.argv[1])
groups = set()
cgroup = None
buf = b""
while True:
    try:
        chunk = os.read(0, 4096)
    except InterruptedError:
        continue
    if not chunk:
        break
    buf += chunk
    *lines, buf = buf.split(b"\n")
    for line in lines:
        if line.startswith(b"cg "):
            cgroup = line[3:].decode()
        elif line.startswith(b"-"):
            groups.discard(int(line[1:]))
        elif line:
            groups.add(int(line))

def alive(g):
    try:
        os.kill(-g, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True

def send(g, sig):
    try:
        os.kill(-g, sig)
    except (ProcessLookupError, PermissionError):
        pass

def members():
    try:
        with open(cgroup + "/cgroup.procs") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError, TypeError):
        return []

def send_pid(p, sig):
    try:
        os.kill(p, sig)
    except (ProcessLookupError, PermissionError):
        pass

live = [g for g in groups if alive(g)]
for g in live:
    send(g, signal.SIGTERM)
    send(g, signal.SIGCONT)
for p in members():
    send_pid(p, signal.SIGTERM)
    send_pid(p, signal.SIGCONT)
deadline = time.monotonic() + grace
while (live or members()) and time.monotonic() < deadline:
    time.sleep(0.05)
    live = [g for g in live if alive(g)]
for g in live:
    send(g, signal.SIGKILL)
if cgroup is not None:
    try:
        with open(cgroup + "/cgroup.kill", "w") as f:
            f.write("1")
    except OSError:
        for p in members():
            send_pid(p, signal.SIGKILL)
    for _ in range(100):
        try:
            os.rmdir(cgroup)
            break
        except FileNotFoundError:
            break  # the broker removed it already (its normal exit): nothing to wait for
        except OSError:
            time.sleep(0.05)
"""

DEFAULT_GRACE = 10.0


class Watchdog:
    """The broker's end: start once per run, ``guard``/``release`` each bot's group, ``close`` at the end."""

    def __init__(self, grace: float = DEFAULT_GRACE) -> None:
        read_fd, self._write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(  # noqa: S603 - our own interpreter
                [sys.executable, "-I", "-S", "-c", WATCHDOG, repr(float(grace))],
                stdin=read_fd, stdout=subprocess.DEVNULL, close_fds=True, start_new_session=True,
                env={"PATH": os.defpath},
            )
        except OSError:
            os.close(self._write_fd)
            self._write_fd = -1
            self._proc = None
            raise
        finally:
            os.close(read_fd)

    def _say(self, line: str) -> None:
        if self._write_fd < 0:
            return
        try:
            os.write(self._write_fd, line.encode() + b"\n")
        except OSError:
            pass  # the watchdog is gone; the broker's own stop still runs

    def guard_cgroup(self, path: str) -> None:
        """From now on, the broker's death also stops every process in cgroup ``path`` and removes it."""
        self._say(f"cg {path}")

    def guard(self, pgid: int) -> None:
        """From now on, the broker's death stops process group ``pgid``."""
        self._say(str(pgid))

    def release(self, pgid: int) -> None:
        """Group ``pgid`` is stopped (or empty): forget it, so a reused number is never signalled."""
        self._say(f"-{pgid}")

    def close(self) -> None:
        """Close the pipe; the watchdog acts on any group still guarded and exits. Idempotent."""
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
        proc, self._proc = self._proc, None
        if proc is not None:
            # Not waited for: it exits by itself (at once when every group was released,
            # after the grace otherwise), and a short run should not wait for its start-up.
            proc.poll()


def group_alive(pgid: int) -> bool:
    """True while any process (zombies included) is in process group ``pgid``."""
    try:
        os.kill(-pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def signal_group(pgid: int, signum: int) -> None:
    """Send ``signum`` to every process of group ``pgid``; a vanished group is fine."""
    try:
        os.kill(-pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(pgid: int, grace: float, reap: object = None) -> None:
    """SIGTERM to the whole group, up to ``grace`` seconds for it to empty, then SIGKILL.

    ``reap`` (a callable) is called while waiting, so that the broker's own
    direct child, once a zombie, is collected and stops counting as a member.
    """
    if not group_alive(pgid):
        return
    signal_group(pgid, signal.SIGTERM)
    signal_group(pgid, signal.SIGCONT)  # a stopped member must run to act on SIGTERM
    deadline = time.monotonic() + grace
    while group_alive(pgid):
        if callable(reap):
            reap()
        if not group_alive(pgid):
            return
        if time.monotonic() >= deadline:
            signal_group(pgid, signal.SIGKILL)
            if callable(reap):
                reap()
            return
        time.sleep(0.02)


def make_cgroup() -> str | None:
    """A fresh cgroup v2 under our own, or None where this process may not make one (best effort)."""
    try:
        with open("/proc/self/mountinfo") as f:
            mount = next((line.split()[4] for line in f if " - cgroup2 " in line), None)
        with open("/proc/self/cgroup") as f:
            ours = next((line[3:].strip() for line in f if line.startswith("0::")), None)
    except OSError:
        return None
    if mount is None or ours is None:
        return None
    path = os.path.join(mount, ours.lstrip("/"), f"credbroker-{os.getpid()}")
    try:
        os.mkdir(path)
    except OSError:
        return None
    if not os.access(os.path.join(path, "cgroup.procs"), os.W_OK):
        remove_cgroup(path)
        return None
    return path


def cgroup_members(path: str) -> list[int]:
    """The pids in cgroup ``path`` (empty if it is gone)."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


def stop_cgroup(path: str, grace: float) -> None:
    """SIGTERM to every process left in the cgroup, up to ``grace`` seconds, then SIGKILL (``cgroup.kill``)."""
    left = cgroup_members(path)
    if not left:
        return
    for pid in left:
        for sig in (signal.SIGTERM, signal.SIGCONT):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + grace
    while cgroup_members(path):
        if time.monotonic() >= deadline:
            try:
                with open(os.path.join(path, "cgroup.kill"), "w") as f:
                    f.write("1")
            except OSError:  # before Linux 5.14: one by one
                for pid in cgroup_members(path):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            return
        time.sleep(0.02)


def remove_cgroup(path: str) -> None:
    """Remove an empty cgroup (its last processes may take a moment to leave after SIGKILL)."""
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)
