"""The first hour's messages against the real OpenBao: each says what fits, in one line."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import OpenBao, credbroker_bin

pytestmark = pytest.mark.vault


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([credbroker_bin(), *args], env=env, capture_output=True, text=True, timeout=120)


def test_an_unset_vault_addr_names_the_default_it_tried(openbao: OpenBao, tmp_path: Path) -> None:
    env = openbao.env()
    del env["VAULT_ADDR"]
    env["HOME"] = str(tmp_path)
    res = _run(["run", "--vault-path", "secret/credbroker/x", "-e", "A=a", "--", "true"], env)
    assert res.returncode == 125 and res.stderr.count("\n") == 1
    assert "VAULT_ADDR: it is unset, so the default https://127.0.0.1:8200 was tried" in res.stderr


def test_a_pinned_version_past_the_latest_says_which_is_the_latest(openbao: OpenBao, tmp_path: Path) -> None:
    openbao.kv_put("credbroker/pinned", api_secret="p1")
    latest = openbao.kv_put("credbroker/pinned", api_secret="p2")
    res = _run(["run", "--vault-path", "secret/credbroker/pinned", "--vault-version", str(latest + 5), "-e",
                "S=api_secret", "--", "true"], openbao.env())
    assert res.returncode == 125 and res.stderr.count("\n") == 1
    assert f"version {latest + 5} of secret/credbroker/pinned does not exist: the latest is {latest}" in res.stderr


def test_run_warns_of_a_stored_value_ending_in_a_newline(openbao: OpenBao, tmp_path: Path) -> None:
    openbao.kv_put("credbroker/newline", api_secret="nl-secret-value\n")
    res = _run(["run", "--vault-path", "secret/credbroker/newline", "-e", "S=api_secret", "--", "true"],
               openbao.env())
    assert res.returncode == 0
    (warning,) = [line for line in res.stderr.splitlines() if "WARNING" in line]
    assert "api_secret" in warning and "newline" in warning and "nl-secret-value" not in res.stderr


def test_ctrl_c_while_fetching_exits_130(openbao: OpenBao, tmp_path: Path) -> None:
    """A Vault that accepts and never answers: Ctrl-C during the fetch ends the run like any command (130)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        env = {**openbao.env(), "VAULT_ADDR": f"http://127.0.0.1:{silent.getsockname()[1]}",
               "CREDBROKER_VAULT_TIMEOUT": "120", "CREDBROKER_DAEMON": "0"}
        marker = tmp_path / "started"
        proc = subprocess.Popen([credbroker_bin(), "run", "--vault-path", "secret/credbroker/x", "-e", "A=a", "--",
                                 "touch", str(marker)], env=env, stderr=subprocess.PIPE, text=True)
        try:
            silent.settimeout(60)
            conn, _ = silent.accept()  # the fetch is under way (in the broker's throwaway child)
            with conn:
                proc.send_signal(signal.SIGINT)
                assert proc.wait(timeout=60) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
        assert not marker.exists()
        assert proc.stderr is not None and "interrupted" in proc.stderr.read()


def test_a_rotation_restart_that_had_to_kill_the_bot_says_so(openbao: OpenBao, tmp_path: Path) -> None:
    openbao.kv_put("credbroker/stubborn", api_secret="v1-secret")
    out = tmp_path / "seen"
    proc = subprocess.Popen(
        [credbroker_bin(), "run", "--vault-path", "secret/credbroker/stubborn", "-e", "S=api_secret",
         "--on-rotate", "restart", "--rotate-interval", "1s", "--grace", "1s", "--", "sh", "-c",
         f'trap "" TERM; echo "$S" >> {out}; while :; do sleep 1; done'],
        env=openbao.env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not out.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        openbao.kv_put("credbroker/stubborn", api_secret="v2-secret")
        while "v2-secret" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.stderr is not None
    assert "killed it (SIGKILL) before restarting it on the new key" in proc.stderr.read()
