"""./scripts/demo, as a newcomer runs it, and --keep's promise that one can go on from where it stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent

pytestmark = pytest.mark.vault


def test_demo_keep_leaves_a_server_to_go_on_with(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8", "TMPDIR": str(tmp_path),
        # The venv running these tests already holds credbroker[test]: no network, no reinstall.
        "CREDBROKER_VENV": sys.prefix, "CREDBROKER_NO_INSTALL": "1",
    }
    res = subprocess.run([str(REPO / "scripts" / "demo"), "--keep"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    pid = next((int(w.rstrip(";")) for line in out.splitlines() if "dev server is still running" in line
                for w in line.split() if w.rstrip(";").isdigit()), None)
    try:
        assert res.returncode == 0, out
        assert "demo bot: VAULT_TOKEN  not inherited (good)" in out
        assert "audit log intact" in out
        # Every line the demo itself prints says it is the demo's; pip said nothing.
        own = [line for line in res.stderr.splitlines() if line.strip()]
        assert all(line.startswith(("demo:", "credbroker:")) for line in own), own
        exports = [line for line in res.stdout.splitlines() if line.startswith("export ")]
        assert len(exports) == 3 and pid is not None
        assert "VAULT_TOKEN" in exports[1] and "$(cat " in exports[1]
        token_file = Path(exports[1].split("$(cat ", 1)[1].split(")", 1)[0])
        token = token_file.read_text()
        assert token and token not in out  # the token is in a 0600 file, never on the screen
        assert token_file.stat().st_mode & 0o077 == 0
        check = subprocess.run(
            ["bash", "-c", "\n".join([*exports, "exec credbroker check -p demo"])],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert check.returncode == 0, check.stderr
        assert "profile demo: ok" in check.stdout
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
