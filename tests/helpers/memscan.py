"""Read another process's memory from outside, as root: what a secret scan of a live process sees."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tests.conftest import service_missing

_SKIP = ("[vvar]", "[vsyscall]", "[vvar_vclock]")


def need_root() -> None:
    """Skip unless root (a failure in CI, which runs as root): reading a non-dumpable
    process's /proc/PID/mem needs CAP_SYS_PTRACE."""
    if os.geteuid() != 0:
        service_missing("scanning another process's memory needs root")


def count_in_memory(pid: int, needles: Iterable[bytes]) -> tuple[dict[bytes, int], int]:
    """How often each needle occurs in the readable mappings of ``pid``; (counts, bytes read)."""
    counts = {n: 0 for n in needles}
    total = 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in _SKIP):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
            total += len(chunk)
            for needle in counts:
                counts[needle] += chunk.count(needle)
    return counts, total


def children(pid: int) -> list[int]:
    """The live children of ``pid`` (from /proc/PID/task/*/children)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return out
