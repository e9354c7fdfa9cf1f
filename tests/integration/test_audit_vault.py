"""The audit log against the real services: the chain key from OpenBao and from the
Secret Service, the Vault file audit device cross-check, and secrets never in the log."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.audit import open_log
from broker.audit.keys import key_id
from broker.audit.verify import verify_files
from broker.cli import cli
from broker.config import Profile
from broker.errors import AuditError
from broker.sources import fetch

from tests.helpers.auditlog import KEY, KEY_HEX, records

pytestmark = pytest.mark.vault


def _config(tmp_path: Path, audit: str) -> Path:
    cfg = tmp_path / "credbroker.toml"
    cfg.write_text(f"[audit]\n{audit}\n")
    return cfg


def test_chain_keyed_with_a_key_from_openbao(openbao, tmp_path: Path, run_broker) -> None:  # type: ignore[no-untyped-def]
    name = "credbroker/audit-" + secrets.token_hex(4)
    openbao.kv_put(name, key=KEY_HEX)
    log_path = tmp_path / "audit.log"
    # anchor off for this in-process writer: its head would be anchored at interpreter exit, after the dev
    # server has stopped (a warning at the end of the test run); the anchors have their own tests.
    table = {"path": str(log_path), "key": f"vault:secret/{name}#key", "anchor": "off"}
    log = open_log(table, env=openbao.env())
    rec = log.record("secret_fetched", {"profile": "um", "version": 1})
    assert rec["alg"] == "hmac-sha256" and rec["kid"] == key_id(KEY)
    # The installed CLI fetches the same key from the server and verifies.
    cfg = _config(tmp_path, f'path = "{log_path}"\nkey = "vault:secret/{name}#key"')
    env = {**openbao.env(), "CREDBROKER_CONFIG": str(cfg)}
    res = run_broker(["audit", "verify"], env=env)
    assert res.returncode == 0 and "hmac-sha256" in res.stdout and key_id(KEY) in res.stdout
    # Edited by someone without the key: named as forged.
    log_path.write_bytes(log_path.read_bytes().replace(b'"version":1', b'"version":2'))
    res = run_broker(["audit", "verify"], env=env)
    assert res.returncode == 1 and "forged" in res.stdout and "audit.log:1" in res.stdout
    assert KEY_HEX not in res.stdout + res.stderr


def test_key_that_cannot_be_fetched_fails_closed_in_one_line(openbao, tmp_path: Path, run_broker) -> None:  # type: ignore[no-untyped-def]
    table = {"path": str(tmp_path / "audit.log"), "key": "vault:secret/credbroker/no-such-audit-key#key"}
    with pytest.raises(AuditError, match="cannot fetch the audit key"):
        open_log(table, env=openbao.env())
    assert not (tmp_path / "audit.log").exists()  # no unkeyed fallback
    cfg = _config(tmp_path, f'path = "{tmp_path / "audit.log"}"\nkey = "vault:secret/credbroker/no-such-audit-key#key"')
    res = run_broker(["audit", "verify"], env={**openbao.env(), "CREDBROKER_CONFIG": str(cfg)})
    assert res.returncode == 125 and res.stderr.count("\n") == 1 and "audit key" in res.stderr
    res = run_broker(["audit", "verify"], env={**openbao.env(token="wrong-token"), "CREDBROKER_CONFIG": str(cfg)})
    assert res.returncode == 125 and "Traceback" not in res.stderr and "wrong-token" not in res.stderr


@pytest.mark.keyring
def test_chain_keyed_with_a_key_from_the_secret_service(secret_service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import keyring

    service = "credbroker/audit-" + secrets.token_hex(4)
    keyring.set_password(service, "key", KEY_HEX)
    try:
        table = {"path": str(tmp_path / "audit.log"), "key": f"keyring:{service}:key"}
        log = open_log(table, env=os.environ)
        log.record("secret_fetched", {"profile": "spot"})
        result = verify_files(None, active=tmp_path / "audit.log", key=KEY)
        assert result.ok and result.key_id == key_id(KEY)
        res = CliRunner().invoke(cli, ["audit", "verify"], env={"CREDBROKER_CONFIG": str(
            _config(tmp_path, f'path = "{tmp_path / "audit.log"}"\nkey = "keyring:{service}:key"'))},
            catch_exceptions=False)
        assert res.exit_code == 0 and key_id(KEY) in res.output
    finally:
        keyring.delete_password(service, "key")


def test_fetched_secret_values_never_reach_the_log(openbao, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    value = "sk-" + secrets.token_hex(20)
    path = "credbroker/binance/leak-" + secrets.token_hex(3)
    openbao.kv_put(path, api_key="AKEY" + secrets.token_hex(8), api_secret=value)
    profile = Profile(name="leak", source="vault", env={"BINANCE_API_SECRET": "api_secret"},
                      options={"path": f"secret/{path}"})
    creds = fetch(profile, env=openbao.env())
    log = open_log({"path": str(tmp_path / "audit.log")})
    log.record("secret_fetched", {"profile": "leak", **creds.origin.to_dict(), "fields": list(creds)})
    with pytest.raises(AuditError):
        log.record("secret_fetched", {"profile": "leak", "value": creds["api_secret"]})
    with pytest.raises(AuditError):
        log.record("secret_fetched", {"creds": creds})
    creds.wipe()
    data = (tmp_path / "audit.log").read_bytes()
    assert value.encode() not in data and b"api_secret" in data


def test_the_runner_records_the_fetch_on_disk_before_the_child_starts(openbao, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = "credbroker/binance/run-" + secrets.token_hex(3)
    openbao.kv_put(path, api_secret="s" * 40)
    log_path = tmp_path / "audit.log"
    code = textwrap.dedent(f"""
        import sys
        from broker import runner
        from broker.audit import open_log
        from broker.config import Profile
        p = Profile(name="um", source="vault", env={{"BINANCE_API_SECRET": "api_secret"}},
                    options={{"path": "secret/{path}"}})
        log = open_log({{"path": {str(log_path)!r}}})
        # The child checks that the fetch record is already in the file when it starts.
        sys.exit(runner.run(runner.RunOptions.build(
            p, ["sh", "-c", 'grep -q secret_fetched "$0"', {str(log_path)!r}], record=log.record)))
    """)
    res = subprocess.run([sys.executable, "-c", code], env=openbao.env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    events = [r["event"] for r in records(log_path)]
    assert events == ["secret_fetched", "secret_injected", "child_exited"]
    assert verify_files(None, active=log_path).ok


def test_vault_audit_cross_check_finds_a_read_made_outside_the_broker(audited_openbao, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = audited_openbao
    vault_log = server.extra["audit_log"]
    server.kv_put("credbroker/binance/um", api_key="AK" + secrets.token_hex(8), api_secret="S" + secrets.token_hex(16))
    server.kv_put("credbroker/binance/other", api_secret="x" * 20)
    # The broker's own token (what a bot host would hold).
    broker_token = server.client().auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
    log_path = tmp_path / "audit.log"
    log = open_log({"path": str(log_path)})
    profile = Profile(name="um", source="vault", env={"BINANCE_API_SECRET": "api_secret"},
                      options={"path": "secret/credbroker/binance/um"})
    for _ in range(2):  # two broker reads, each with its record
        creds = fetch(profile, env=server.env(broker_token))
        log.record("secret_fetched", {"profile": "um", **creds.origin.to_dict(), "fields": list(profile.fields)})
        creds.wipe()
    # Someone reads the key directly with the CLI (the root token, not the broker's).
    out = server.cli("kv", "get", "-format=json", "secret/credbroker/binance/um")
    assert json.loads(out)["data"]["metadata"]["version"] == 1
    # A read of a path no bot uses is not the report's business.
    server.cli("kv", "get", "secret/credbroker/binance/other")

    # A broker record with no read behind it (written by hand, or the Vault log lost it). Matching is
    # by path, KV version and time, so it must differ from the CLI read in one of them to stand out.
    log.record("secret_fetched", {"profile": "um", "source": "vault", "path": "secret/credbroker/binance/um",
                                  "version": 7, "fields": ["api_secret"]})
    server.cli("kv", "get", "secret/credbroker/binance/other")  # the Vault log goes on past it

    env = {**server.env(broker_token), "CREDBROKER_AUDIT_LOG": str(log_path)}
    res = CliRunner().invoke(cli, ["audit", "report", "--json", "--vault-audit", str(vault_log)], env=env,
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    va = json.loads(res.output)["vault_audit"]
    assert va["vault_reads"] == 3 and va["matched"] == 2 and va["unmatched_total"] == 1
    [read] = va["unmatched"]
    assert read["path"] == "secret/credbroker/binance/um" and read["version"] == 1
    assert read["token"] == "another token"  # matched through sys/audit-hash of the broker's token
    assert va["token_check"] is True
    assert va["broker_reads_without_vault_entry"] == 1
    # The text report says it too.
    res = CliRunner().invoke(cli, ["audit", "report", "--vault-audit", str(vault_log)], env=env,
                             catch_exceptions=False)
    assert "1 with no broker record" in res.output and "another token" in res.output
    # Reads made with the broker's own token but not recorded (a leaked token?) say "your token".
    server.cli("kv", "get", "secret/credbroker/binance/um", token=broker_token)
    res = CliRunner().invoke(cli, ["audit", "report", "--json", "--vault-audit", str(vault_log)], env=env,
                             catch_exceptions=False)
    va = json.loads(res.output)["vault_audit"]
    assert va["unmatched_total"] == 2
    assert sorted(u["token"] for u in va["unmatched"]) == ["another token", "your token"]


def test_a_forged_broker_record_cannot_hide_an_outside_read(audited_openbao, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Broker fetches carry Vault's request_id, so matching is exact, not by time and version."""
    server = audited_openbao
    vault_log = server.extra["audit_log"]
    server.kv_put("credbroker/binance/forged", api_secret="S" + secrets.token_hex(16))
    log_path = tmp_path / "audit.log"
    log = open_log({"path": str(log_path)})
    profile = Profile(name="f", source="vault", env={"S": "api_secret"},
                      options={"path": "secret/credbroker/binance/forged"})
    creds = fetch(profile, env=server.env())
    assert creds.origin.request_id  # Vault's id of that read
    log.record("secret_fetched", {"profile": "f", **creds.origin.to_dict(), "fields": ["api_secret"]})
    creds.wipe()
    # An outside read, then a hand-written record forged to cover it: same path, version, time,
    # and a made-up request id.
    server.cli("kv", "get", "secret/credbroker/binance/forged")
    log.record("secret_fetched", {"profile": "f", "source": "vault", "path": "secret/credbroker/binance/forged",
                                  "version": 1, "fields": ["api_secret"],
                                  "request_id": "00000000-0000-0000-0000-000000000000"})
    server.kv_put("credbroker/binance/other-path", x="y")
    server.cli("kv", "get", "secret/credbroker/binance/other-path")  # the Vault log goes on past it
    env = {**server.env(), "CREDBROKER_AUDIT_LOG": str(log_path)}
    res = CliRunner().invoke(cli, ["audit", "report", "--json", "--vault-audit", str(vault_log)], env=env,
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    va = json.loads(res.output)["vault_audit"]
    assert va["matched"] == 1 and va["unmatched_total"] == 1
    assert va["broker_reads_without_vault_entry"] == 1  # the forged record itself stands out too
