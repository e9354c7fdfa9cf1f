"""End to end: a rotation in the real OpenBao that the exchange never heard of.

A bot under `credbroker run --on-rotate restart` signs with the secret it was
given and calls a Binance-style server on loopback (tests/helpers/signing_verifier.py,
which checks signatures the way Binance documents). An admin rotates the
secret in Vault but not at the exchange: the restarted bot gets -1022 and
reports it with ``report_response`` as the README shows, without naming a
profile. The weekly review's first finding says the new secret may not be
registered at the exchange, and rests on the rotation record and the failure.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import OpenBao, credbroker_bin
from tests.helpers.signing_verifier import BinanceVerifier

pytestmark = pytest.mark.vault

# A bot with its own HMAC code (no get_signer): it reads the injected variables,
# and on a key error reports it the way the README tells any other client to.
BOT = r"""
import hashlib, hmac, json, os, sys, time, urllib.error, urllib.request
from broker.signing import report_response

base, state = sys.argv[1], sys.argv[2]
key, secret = os.environ["BINANCE_API_KEY"], os.environ["BINANCE_API_SECRET"]
query = f"timestamp={int(time.time() * 1000)}"
sig = hmac.new(secret.encode(), query.encode(), hashlib.sha256).hexdigest()
req = urllib.request.Request(f"{base}/fapi/v2/balance?{query}&signature={sig}", headers={"X-MBX-APIKEY": key})
try:
    with urllib.request.urlopen(req, timeout=10) as resp:
        status, body = resp.status, resp.read()
except urllib.error.HTTPError as exc:
    status, body = exc.code, exc.read()
if status == 200:
    open(os.path.join(state, f"ok-{os.getpid()}"), "w").close()
    while True:  # trade until the broker restarts us (SIGTERM ends the process)
        time.sleep(0.05)
answer = json.loads(body)
report_response(status, {"code": answer.get("code"), "msg": answer.get("msg")}, f"{base}/fapi/v2/balance")
open(os.path.join(state, "reported"), "w").close()
sys.exit(1)
"""


@pytest.fixture
def exchange() -> Iterator[BinanceVerifier]:
    v = BinanceVerifier().start()
    try:
        yield v
    finally:
        v.stop()


def wait_for(path: Path, proc: subprocess.Popen[str], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            said = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"credbroker ended ({proc.returncode}) before {what}: {said}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.05)


def test_a_rotation_not_registered_at_the_exchange_is_the_first_finding(
        openbao: OpenBao, tmp_path: Path, exchange: BinanceVerifier, run_broker: object) -> None:
    api_key = "K" + secrets.token_hex(31)
    old, new = "S" + secrets.token_hex(31), "N" + secrets.token_hex(31)
    kv = f"credbroker/binance/um-futures-{secrets.token_hex(3)}"
    v1 = openbao.kv_put(kv, api_key=api_key, api_secret=old)
    (tmp_path / "credbroker.toml").write_text(f"""
[profiles.um-futures]
source = "vault"
path = "secret/{kv}"
env = {{ BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }}
""")
    exchange.add_hmac(api_key, old)  # the exchange knows the old secret only
    bot = tmp_path / "bot.py"
    bot.write_text(BOT)
    state = tmp_path / "state-dir"
    state.mkdir()
    env = openbao.env()
    proc = subprocess.Popen([credbroker_bin(), "run", "-p", "um-futures", "--on-rotate", "restart",
                             "--rotate-interval", "1s", "--grace", "3s", "--", sys.executable, str(bot),
                             exchange.url, str(state)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(state, proc, "bot start")
        deadline = time.monotonic() + 60
        while not any(p.name.startswith("ok-") for p in state.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, "the first bot never got an answer"
            time.sleep(0.05)
        # The admin rotates in Vault; nobody registers the new secret at the exchange.
        v2 = openbao.kv_put(kv, api_key=api_key, api_secret=new)
        assert v2 == v1 + 1
        wait_for(state / "reported", proc, "the -1022 report")
        assert proc.wait(timeout=60) == 1  # the bot's own status
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    assert [s.code for s in exchange.seen] == [None, -1022]

    res = run_broker(["audit", "report", "--json"], env=env)  # type: ignore[operator]
    assert res.returncode == 0, res.stderr
    review = json.loads(res.stdout)
    first = review["findings"][0]
    assert first["kind"] == "failures_after_rotation" and first["profile"] == "um-futures"
    assert "new secret may not be registered at the exchange" in first["advice"]
    events = {r["seq"]: r for r in map(json.loads, run_broker(  # type: ignore[operator]
        ["audit", "show", "--json"], env=env).stdout.splitlines())}
    assert [events[s]["event"] for s in first["seqs"]] == ["rotation_detected", "signature_failure"]
    failure = events[first["seqs"][1]]["data"]
    # Stamped by the broker: the bot named no profile, host or pid.
    assert failure["profile"] == "um-futures" and failure["host"] and isinstance(failure["relayed_from"], int)
    (row,) = review["signature_failures"]["by_code"]
    assert row["code"] == "-1022" and row["profiles"] == ["um-futures"]
    assert "not registered at the exchange" in row["causes"][0]["cause"]
    text = run_broker(["audit", "report"], env=env).stdout  # type: ignore[operator]
    assert "1. [failures_after_rotation] um-futures:" in text and "(none)" not in text
    log = "".join(p.read_text() for p in (tmp_path / "state").rglob("audit.log*"))
    assert "signature_failure" in log and old not in log and new not in log
