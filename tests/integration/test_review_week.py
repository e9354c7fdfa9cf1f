"""A week of every command against a server with a file audit device: the weekly review's Vault
cross-check finds no read of credbroker's own unmatched, and exactly the one read made outside it."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import OpenBao

pytestmark = pytest.mark.vault


@pytest.fixture
def audited(tmp_path: Path) -> Iterator[OpenBao]:
    from tests.conftest import start_audited_openbao

    server = start_audited_openbao(tmp_path)
    try:
        server.cli("secrets", "enable", "transit")
        yield server
    finally:
        server.stop()


def test_every_command_is_matched_and_one_outside_read_stands_out(audited: OpenBao, tmp_path: Path,
                                                                 run_broker: Any) -> None:
    server = audited
    server.cli("write", "-f", "transit/keys/credbroker-dec")
    plain = "dec-" + secrets.token_hex(8)
    import base64

    ct = json.loads(server.cli("write", "-format=json", "transit/encrypt/credbroker-dec",
                               f"plaintext={base64.b64encode(plain.encode()).decode()}"))["data"]["ciphertext"]
    server.kv_put("credbroker/wk-run", api_key="AK1", api_secret="s-" + secrets.token_hex(8))
    server.kv_put("credbroker/wk-dec", api_key="AK2", api_secret=ct)
    server.kv_put("credbroker/wk-half", api_key="AK3")  # no api_secret: runs refuse after Vault answered
    cfg = tmp_path / "credbroker.toml"
    cfg.write_text(
        "".join(f'[profiles.{name}]\nsource = "vault"\npath = "secret/credbroker/{name}"\n'
                'env = { BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }\n'
                + ('transit_key = "credbroker-dec"\n' if name == "wk-dec" else "") + "\n"
                for name in ("wk-run", "wk-dec", "wk-half", "wk-imp")))
    env = {**server.env(), "CREDBROKER_CONFIG": str(cfg), "CREDBROKER_AUDIT_LOG": str(tmp_path / "audit.log")}

    def broker(*args: str, code: int = 0) -> None:
        res = run_broker(list(args), env=env, cwd=tmp_path)
        assert res.returncode == code, (args, res.stdout, res.stderr)

    broker("run", "-p", "wk-run", "--", "true")
    broker("run", "-p", "wk-dec", "--", "true")
    broker("run", "-p", "wk-half", "--", "true", code=125)  # read, then refused: api_secret missing
    broker("check", "-p", "wk-run")
    broker("check", "-p", "wk-half", code=125)
    dotenv = tmp_path / "wk.env"
    dotenv.write_text("BINANCE_API_KEY=AK4\nBINANCE_API_SECRET=s4\n")
    broker("import", str(dotenv), "--profile", "wk-imp", "--keep")
    lib = subprocess.run([sys.executable, "-c",
                          "from broker import get_signer; s = get_signer(profile='wk-run'); print(s.kind)"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert lib.returncode == 0, lib.stderr
    lib = subprocess.run([sys.executable, "-c",
                          "import broker; c = broker.fetch(broker.load_config().profile('wk-dec')); c.wipe()"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert lib.returncode == 0, lib.stderr
    # A bot that follows rotation: the admin rotates, the broker fetches the new version and restarts it.
    import time

    marker = tmp_path / "rotated-bot-started"
    bot = subprocess.Popen([*_broker_cmd(), "run", "-p", "wk-run", "--on-rotate", "restart", "--rotate-interval",
                            "1s", "--grace", "2s", "--", "sh", "-c", f'echo x >> {marker}; exec sleep 300'],
                           env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: marker.exists(), "the rotating bot to start", bot)
        server.kv_put("credbroker/wk-run", api_key="AK1", api_secret="s2-" + secrets.token_hex(8))
        _wait(lambda: marker.exists() and marker.read_text().count("x") >= 2, "the restart after rotation", bot)
    finally:
        bot.terminate()
        bot.wait(timeout=60)
    # The signing agent: the bot signs through the broker and never holds the secret.
    broker("run", "-p", "wk-run", "--agent", "--no-preflight", "--", sys.executable, "-c",
           "from broker import get_signer; print(get_signer().sign_query({'symbol': 'BTCUSDT'})[:10])")
    # Someone reads a bot's key directly, outside credbroker.
    server.cli("kv", "get", "secret/credbroker/wk-run")

    res = run_broker(["audit", "report", "--json", "--vault-audit", str(server.extra["audit_log"])], env=env,
                     cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    va = json.loads(res.stdout)["vault_audit"]
    assert va["unmatched_total"] == 1, va["unmatched"]
    [outside] = va["unmatched"]
    assert outside["path"] == "secret/credbroker/wk-run"
    # every read above: 3 runs (one refused after the read), 2 checks (one refused), import's read-back,
    # get_signer, broker.fetch, the rotating bot's first fetch and its fetch of the new version, the agent run
    assert va["matched"] == 11


def _broker_cmd() -> list[str]:
    from tests.conftest import credbroker_bin

    return [credbroker_bin()]


def _wait(check: Any, what: str, proc: subprocess.Popen[str]) -> None:
    import time

    deadline = time.monotonic() + 90
    while not check():
        assert proc.poll() is None, (what, proc.communicate())
        assert time.monotonic() < deadline, f"waited 90 s for {what}"
        time.sleep(0.05)
