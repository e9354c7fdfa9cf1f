"""Rotation test helpers shared by the rotation and multi-profile run tests (not a test module): waiting for
a bot's log line, the broker's audit records, counting the version checks a server's file audit device saw,
and rotating a secret with scripts/rotate-key."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import REPO, OpenBao


def wait_for(path: Path, pattern: str, timeout: float = 60) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text() if path.exists() else "")
        if m:
            return m
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in {path.read_text() if path.exists() else '<missing>'!r}")


def audit_events(log: Path) -> list[dict[str, object]]:
    """The records of a broker's audit log; while it runs, a last line still being written is left out."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().split("\n")[:-1] if line.strip()]


def wait_until(what: str, condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened within {timeout:g} s: {what}"
        time.sleep(0.05)


def version_checks(vault_log: Path, bot_name: str) -> int:
    """How many reads of the secret's KV metadata (the watcher's version check) the server answered."""
    if not vault_log.exists():
        return 0
    count = 0
    for line in vault_log.read_bytes().split(b"\n")[:-1]:  # the last piece may be a line still being written
        entry = json.loads(line)
        request = entry.get("request") or {}
        if entry.get("type") == "response" and request.get("path") == f"secret/metadata/credbroker/{bot_name}":
            count += 1
    return count


def wait_for_more_checks(vault_log: Path, bot_name: str, more: int) -> None:
    """Return once the broker has checked the version ``more`` times after now."""
    start = version_checks(vault_log, bot_name)
    wait_until(f"{more} more version checks of {bot_name}", lambda: version_checks(vault_log, bot_name) >= start + more)


def rotate(server: OpenBao, bot_name: str, value: str) -> int:
    """Rotate with the admin script, the new value on stdin as documented."""
    env = server.env()
    env["PATH"] = f"{Path(server.binary).parent}{os.pathsep}{env['PATH']}"
    env["CREDBROKER_VAULT_CLI"] = server.binary
    res = subprocess.run([str(REPO / "scripts" / "rotate-key"), "--by", "test", bot_name],
                         input=value + "\n", env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip())
