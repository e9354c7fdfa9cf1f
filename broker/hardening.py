"""Process hardening for the broker (Linux; best effort elsewhere).

* core dumps off (``RLIMIT_CORE`` = 0): a crash never writes the secret to
  disk. The limit is inherited by the child, whose environment holds the
  secret too, so the bot gets no core dumps either.
* not dumpable (``prctl(PR_SET_DUMPABLE, 0)``): other processes of the same
  user cannot ptrace the broker or read its ``/proc/PID/mem``/``environ``.
* the child gets ``PR_SET_PDEATHSIG``: if the broker dies, even by SIGKILL,
  the kernel sends the child SIGTERM, so a bot never runs unsupervised.

Secret buffers are locked into RAM (``mlock``) by ``broker.secret.Secret``.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import NamedTuple

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3

_libc: ctypes.CDLL | None = None


def _prctl(option: int, arg: int) -> int:
    global _libc
    if not sys.platform.startswith("linux"):
        return -1
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return int(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0))


class HardeningReport(NamedTuple):
    """What could be applied, for `--verbose` and tests."""

    core_dumps_off: bool
    not_dumpable: bool


def harden_process() -> HardeningReport:
    """Turn core dumps off and make this process non-dumpable."""
    core_off = False
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        core_off = True
    except (ImportError, ValueError, OSError):
        pass
    not_dumpable = _prctl(PR_SET_DUMPABLE, 0) == 0
    return HardeningReport(core_dumps_off=core_off, not_dumpable=not_dumpable)


def die_with_parent(parent_pid: int, signum: int) -> None:
    """In a freshly forked child: get ``signum`` when the parent dies.

    Runs between fork and exec. PDEATHSIG survives exec (it is cleared only
    for set-uid programs). If the parent died before the prctl took effect,
    we are already orphaned: exit instead of running unsupervised.
    """
    _prctl(PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent_pid:
        os._exit(125)
