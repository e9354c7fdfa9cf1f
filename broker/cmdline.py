"""The bot's command line: the kernel's size limits, and how it is recorded in the audit log.

Linux refuses an ``execve`` whose arguments and environment together exceed
a quarter of the stack limit (at most 6 MiB, at least 128 KiB), or any one
string of 128 KiB or more (``MAX_ARG_STRLEN``). ``check_exec_size`` applies
the same rules before anything is fetched or started, so a command line the
kernel would refuse is a one-line error (exit 125), never a half-started run.

An audit record is at most 64 KiB, and a command line may be megabytes. So a
command line whose JSON does not fit in ``INLINE_BUDGET`` is recorded in full
over several records: ``secret_injected`` carries the arguments that fit, a
marker naming what follows and the SHA-256 of the whole argv; then
``command_args`` records (``pid``, ``part``, ``parts``, ``json``) carry the
JSON text of the complete argv in order. Joining their ``json`` fields and
parsing the result gives the argv back, exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .events import Event
from .errors import RunError

MAX_ARG_STRLEN = 32 * 4096  # per string, including its NUL (the kernel's 32 pages)
_MIN_ARG_MAX = 128 * 1024
_MAX_ARG_MAX = 6 * 1024 * 1024  # _STK_LIM / 4 * 3
#: The command's JSON kept inline in one record (the rest of the record is small).
INLINE_BUDGET = 16 * 1024
#: Characters of argv JSON per ``command_args`` record: re-escaped inside a record at most 2x.
CHUNK = 24 * 1024
COMMAND_ARGS = Event.COMMAND_ARGS


def exec_limit() -> int:
    """Bytes of argument and environment strings (plus pointers) ``execve`` accepts here."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_STACK)[0]
    except (ImportError, OSError, ValueError):
        soft = 8 * 1024 * 1024
    limit = _MAX_ARG_MAX if soft == getattr(resource, "RLIM_INFINITY", -1) or soft < 0 else min(soft // 4,
                                                                                                 _MAX_ARG_MAX)
    return max(limit, _MIN_ARG_MAX)


def check_exec_size(argv: Sequence[str], env: Mapping[Any, Any] | Iterable[tuple[Any, Any]]) -> None:
    """RunError (125, one line) when ``execve(argv, env)`` would fail with E2BIG."""
    items = env.items() if isinstance(env, Mapping) else env
    total = 0
    for i, arg in enumerate(argv):
        size = len(os.fsencode(arg)) + 1
        if size > MAX_ARG_STRLEN:
            raise RunError(f"argument {i} of the command is {size - 1} bytes; the kernel allows less than "
                           f"{MAX_ARG_STRLEN} bytes per argument, so the command was not started",
                           "pass large data through a file or stdin instead of the command line")
        total += size
    count = len(argv)
    for key, value in items:
        total += len(os.fsencode(key)) + len(os.fsencode(value)) + 2
        count += 1
    total += (count + 1) * 8  # the pointer arrays
    limit = exec_limit()
    if total > limit:
        raise RunError(f"the command line and environment are {total} bytes; the kernel allows {limit} "
                       "(a quarter of the stack limit), so the command was not started",
                       "pass large data through a file or stdin, or raise `ulimit -s`")


def audit_fields(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the ``command`` field, the ``json`` chunks of following ``command_args`` records; empty if none)."""
    text = json.dumps(list(argv), ensure_ascii=True, separators=(",", ":"))
    if len(text) <= INLINE_BUDGET:
        return list(argv), []
    chunks = [text[i:i + CHUNK] for i in range(0, len(text), CHUNK)]
    shown: list[str] = []
    used = 0
    for arg in argv:
        size = len(json.dumps(arg, ensure_ascii=True)) + 1
        if used + size > INLINE_BUDGET // 2:
            break
        shown.append(arg)
        used += size
    digest = hashlib.sha256(b"\0".join(os.fsencode(a) for a in argv)).hexdigest()
    shown.append(f"[credbroker: {len(argv) - len(shown)} more argument(s), {len(text)} bytes of argv JSON in "
                 f"{len(chunks)} {COMMAND_ARGS} record(s); argv sha256 {digest}]")
    return shown, chunks
