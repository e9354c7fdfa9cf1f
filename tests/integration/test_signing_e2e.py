"""End to end: a bot under `credbroker run` signs requests to a Binance-style server.

The server checks signatures the way Binance documents (tests/helpers/signing_verifier.py)
and answers -1022 when one is wrong; that failure then shows in
`credbroker audit report`, and neither the secret nor any signature is in the log.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, OpenBao
from tests.helpers.signing_verifier import BinanceVerifier

pytestmark = pytest.mark.vault
BOT = REPO / "examples" / "signed_requests_bot.py"
CONNECTOR_BOT = REPO / "examples" / "binance_connector_bot.py"


@pytest.fixture
def verifier() -> Any:
    v = BinanceVerifier().start()
    try:
        yield v
    finally:
        v.stop()


def setup_profile(server: OpenBao, tmp: Path, *, name: str = "um-futures", signer: str = "") -> tuple[str, str]:
    api_key = "K" + secrets.token_hex(31)
    secret = "S" + secrets.token_hex(31)
    kv = f"credbroker/binance/{name}-{secrets.token_hex(3)}"
    server.kv_put(kv, api_key=api_key, api_secret=secret)
    (tmp / "credbroker.toml").write_text(f"""
[profiles.{name}]
source = "vault"
path = "secret/{kv}"
env = {{ BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }}
{signer}
""")
    return api_key, secret


def broker_env(server: OpenBao, **extra: str) -> dict[str, str]:
    env = server.env()
    env.update(extra)
    return env


def audit_report(run_broker: Any, env: dict[str, str]) -> str:
    res = run_broker(["audit", "report", "--json"], env=env)
    assert res.returncode == 0, res.stderr
    return str(res.stdout)


def audit_text() -> str:
    from broker.audit import open_log

    path = Path(open_log(None).path)
    return "".join(p.read_text() for p in sorted(path.parent.glob(path.name + "*")))


def test_bot_under_run_signs_and_bad_signature_shows_in_audit_report(
        openbao: OpenBao, tmp_path: Path, verifier: BinanceVerifier, run_broker: Any) -> None:
    api_key, secret = setup_profile(openbao, tmp_path)
    env = broker_env(openbao)

    # 1. The exchange knows the same secret: every signed request is accepted.
    verifier.add_hmac(api_key, secret)
    ok = run_broker(["run", "--profile", "um-futures", "--", sys.executable, str(BOT),
                     "--base-url", verifier.url], env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert [s.status for s in verifier.seen] == [200, 200, 200]
    assert {s.path for s in verifier.seen} == {"/fapi/v2/balance", "/fapi/v1/order/test", "/fapi/v1/openOrders"}
    assert api_key not in ok.stdout + ok.stderr and secret not in ok.stdout + ok.stderr

    # 2. The key was re-generated on the exchange: Vault's secret no longer matches -> -1022.
    verifier.seen.clear()
    verifier.add_hmac(api_key, "other-" + secrets.token_hex(20))
    bad = run_broker(["run", "--profile", "um-futures", "--", sys.executable, str(BOT),
                      "--base-url", verifier.url], env=env)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert {s.code for s in verifier.seen} == {-1022}
    assert "key trouble recorded in the audit log: -1022" in bad.stderr

    report = json.loads(audit_report(run_broker, env))
    failures = report["signature_failures"]
    assert failures["total"] == 3
    (group,) = failures["by_code"]
    assert group["code"] == "-1022" and group["reason"] == "invalid signature" and group["count"] == 3
    assert any(e.endswith("/fapi/v2/balance") for e in group["endpoints"])
    text = run_broker(["audit", "report"], env=env)  # what the operator reads every week
    assert text.returncode == 0, text.stderr
    assert "SIGNATURE FAILURES: 3" in text.stdout and "-1022" in text.stdout
    # Nothing secret anywhere in the log: not the secret, not the key, not a signature, not a query.
    log = audit_text()
    assert "signature_failure" in log
    for needle in (secret, api_key, "signature=", "timestamp="):
        assert needle not in log, needle
    sent = [s.total_params for s in verifier.seen]
    assert all(p not in log for p in sent)


def test_binance_connector_bot_under_run(openbao: OpenBao, tmp_path: Path, verifier: BinanceVerifier,
                                         run_broker: Any) -> None:
    """A real client library signs with the injected keys; our verifier accepts it; a bad key is reported."""
    try:
        import binance.spot  # noqa: F401 - binance-connector, a test-only dependency
    except ImportError:
        from tests.conftest import service_missing

        service_missing("binance-connector not installed (pip install binance-connector)")
    api_key, secret = setup_profile(openbao, tmp_path, name="spot")
    env = broker_env(openbao, BINANCE_BASE_URL=verifier.url)
    verifier.add_hmac(api_key, secret)
    ok = run_broker(["run", "--profile", "spot", "--", sys.executable, str(CONNECTOR_BOT)], env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert [(s.path, s.status) for s in verifier.seen] == [("/api/v3/account", 200)]
    verifier.add_hmac(api_key, "other-" + secrets.token_hex(20))
    bad = run_broker(["run", "--profile", "spot", "--", sys.executable, str(CONNECTOR_BOT)], env=env)
    assert bad.returncode == 1 and "recorded as signature_failure" in bad.stderr, bad.stderr
    records = [json.loads(line) for line in audit_text().splitlines() if '"signature_failure"' in line]
    assert records and secret not in audit_text()


def test_get_signer_writes_no_secret_anywhere(openbao: OpenBao, tmp_path: Path) -> None:
    """strace over get_signer(profile=...): the secret is in no argv, no write, no file but the audit log."""
    import shutil
    import subprocess

    strace = shutil.which("strace")
    if strace is None:
        from tests.conftest import service_missing

        service_missing("strace not installed (apt-get install strace)")
    assert strace is not None
    api_key, secret = setup_profile(openbao, tmp_path, name="traced")
    code = ("from broker import get_signer\n"
            "s = get_signer(profile='traced')\n"
            "print(repr(s), len(s.sign('symbol=BTCUSDT&timestamp=1')))\n"
            "try:\n"
            "    s.sign(object())\n"
            "except Exception as e:\n"
            "    print('error:', e)\n")
    trace = tmp_path / "trace.txt"
    res = subprocess.run([strace, "-f", "-qq", "-e", "trace=write,pwrite64,openat,execve", "-s", "4096",
                          "-o", str(trace), sys.executable, "-c", code],
                         env=broker_env(openbao), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "HmacSigner(kind='hmac', profile='traced'" in res.stdout and "error: cannot sign" in res.stdout
    text = trace.read_text(errors="replace")
    assert secret not in text, "the HMAC secret was written or passed somewhere"
    assert secret not in res.stdout + res.stderr and api_key not in res.stdout + res.stderr
    written = {line.split('"')[1] for line in text.splitlines()
               if "openat(" in line and ("O_WRONLY" in line or "O_RDWR" in line) and '"' in line}
    written = {p for p in written if not p.startswith(("/dev/", "/proc/"))}
    assert all("audit" in p or p.endswith(".lock") for p in written), written
    assert "secret_fetched" in text  # the trace did see the audit record being written


def test_transit_bot_under_run_key_never_leaves_vault(openbao: OpenBao, tmp_path: Path, verifier: BinanceVerifier,
                                                      run_broker: Any) -> None:
    """A transit profile: the child gets a token that can only sign, never the broker's token or a key."""
    import subprocess

    name = "e2e-" + secrets.token_hex(4)
    env = broker_env(openbao)
    made = subprocess.run([sys.executable, str(REPO / "scripts" / "transit-key"), name], env=env,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    api_key = "T" + secrets.token_hex(31)
    kv = f"credbroker/binance/{name}"
    openbao.kv_put(kv, api_key=api_key)
    (tmp_path / "credbroker.toml").write_text(f"""
[profiles.um-transit]
source = "vault"
path = "secret/{kv}"
env = {{ BINANCE_API_KEY = "api_key" }}

[profiles.um-transit.signer]
type = "transit"
transit_key = "{name}"
token_ttl = "5m"
""")
    verifier.add_public_key(api_key, made.stdout)
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys, runpy\n"
        "assert 'VAULT_TOKEN' not in os.environ and 'BAO_TOKEN' not in os.environ\n"
        "print('token-in-child:', bool(os.environ.get('CREDBROKER_SIGNER_TOKEN')))\n"
        f"sys.argv = ['bot', '--base-url', {verifier.url!r}]\n"
        f"runpy.run_path({str(BOT)!r}, run_name='__main__')\n")
    res = run_broker(["run", "--profile", "um-transit", "--", sys.executable, str(probe)], env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "token-in-child: True" in res.stdout and "TransitSigner(kind='transit'" in res.stdout
    assert [s.status for s in verifier.seen] == [200, 200, 200]
    assert openbao.token not in res.stdout + res.stderr


def test_a_mistyped_transit_key_fails_closed_before_the_bot_starts(openbao: OpenBao, tmp_path: Path,
                                                                   run_broker: Any) -> None:
    """check reports it and run refuses (125, one line naming the setting), instead of a bot dying in
    get_signer() with a KV remedy."""
    import subprocess

    name = "typo-" + secrets.token_hex(4)
    env = broker_env(openbao)
    made = subprocess.run([sys.executable, str(REPO / "scripts" / "transit-key"), name], env=env,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    kv = f"credbroker/{name}"
    openbao.kv_put(kv, api_key="K" * 64)
    (tmp_path / "credbroker.toml").write_text(f"""
[profiles.um-transit]
source = "vault"
path = "secret/{kv}"
env = {{ BINANCE_API_KEY = "api_key" }}

[profiles.um-transit.signer]
type = "transit"
transit_key = "{name}x"
""")
    marker = tmp_path / "bot-started"
    res = run_broker(["run", "--profile", "um-transit", "--", "touch", str(marker)], env=env, cwd=tmp_path)
    assert res.returncode == 125 and not marker.exists()
    assert res.stderr.count("\n") == 1 and f"transit key transit/keys/{name}x does not exist" in res.stderr
    assert "profiles.um-transit.signer.transit_key" in res.stderr and "kv get" not in res.stderr
    checked = run_broker(["check", "-p", "um-transit"], env=env, cwd=tmp_path)
    assert checked.returncode == 125 and "does not exist" in checked.stdout
