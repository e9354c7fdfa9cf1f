"""broker.access: the one audited way to read a profile; `check` and `broker.fetch` go through it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import broker
from broker.cli import cli
from broker.errors import BrokerError

from tests.conftest import OpenBao

pytestmark = pytest.mark.vault


def _records(tmp_path: Path) -> list[dict[str, Any]]:
    log = tmp_path / "state" / "credbroker" / "audit.log"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _config(tmp_path: Path, server: OpenBao, kv_path: str, extra: str = "") -> Path:
    path = tmp_path / "credbroker.toml"
    path.write_text(f'[vault]\naddr = "{server.addr}"\n\n[profiles.p]\nsource = "vault"\npath = "secret/{kv_path}"\n'
                    f'env = {{ BINANCE_API_SECRET = "api_secret" }}\n{extra}')
    return path


def test_broker_fetch_honours_vault_from_the_profiles_file_and_is_recorded(
        openbao: OpenBao, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    openbao.kv_put("credbroker/access1", api_secret="s-access1")
    cfg = _config(tmp_path, openbao, "credbroker/access1")
    monkeypatch.setenv("VAULT_TOKEN", openbao.token)  # no VAULT_ADDR: [vault] addr must be used
    creds = broker.fetch(broker.load_config(str(cfg)).profile("p"))
    try:
        assert creds["api_secret"].reveal_str() == "s-access1"
    finally:
        creds.wipe()
    (fetched,) = [r for r in _records(tmp_path) if r["event"] == "secret_fetched"]
    assert fetched["data"]["by"] == "library" and fetched["data"]["request_id"]
    assert "s-access1" not in json.dumps(_records(tmp_path))


def test_check_records_its_read_with_vaults_request_id(openbao: OpenBao, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    openbao.kv_put("credbroker/access2", api_secret="s-access2")
    cfg = _config(tmp_path, openbao, "credbroker/access2")
    monkeypatch.setenv("VAULT_TOKEN", openbao.token)
    res = CliRunner().invoke(cli, ["--config", str(cfg), "check", "-p", "p"])
    assert res.exit_code == 0, res.output
    (fetched,) = [r for r in _records(tmp_path) if r["event"] == "secret_fetched"]
    assert fetched["data"]["by"] == "check" and fetched["data"]["path"] == "secret/credbroker/access2"
    assert isinstance(fetched["data"]["request_id"], str) and fetched["data"]["request_id"]


def test_a_failed_read_is_recorded_as_refused(openbao: OpenBao, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, openbao, "credbroker/access-missing")
    monkeypatch.setenv("VAULT_TOKEN", openbao.token)
    with pytest.raises(BrokerError):
        broker.fetch(broker.load_config(str(cfg)).profile("p"))
    (refused,) = [r for r in _records(tmp_path) if r["event"] == "refused"]
    assert refused["data"]["by"] == "library" and refused["data"]["profile"] == "p"
    assert not [r for r in _records(tmp_path) if r["event"] == "secret_fetched"]


def test_no_read_without_a_writable_audit_log(openbao: OpenBao, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    openbao.kv_put("credbroker/access3", api_secret="s-access3")
    cfg = _config(tmp_path, openbao, "credbroker/access3")
    monkeypatch.setenv("VAULT_TOKEN", openbao.token)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the log's folder should be")
    monkeypatch.setenv("CREDBROKER_AUDIT_LOG", str(blocked / "audit.log"))
    with pytest.raises(BrokerError) as err:
        broker.fetch(broker.load_config(str(cfg)).profile("p"))
    assert "audit" in str(err.value).lower() and os.path.isfile(blocked)


def test_check_text_shows_sizes_and_warns_of_a_trailing_newline(openbao: OpenBao, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    openbao.kv_put("credbroker/access-nl", api_secret="s-access-nl\n")
    cfg = _config(tmp_path, openbao, "credbroker/access-nl")
    monkeypatch.setenv("VAULT_TOKEN", openbao.token)
    res = CliRunner().invoke(cli, ["--config", str(cfg), "check", "-p", "p"])
    assert res.exit_code == 0, res.output  # a warning, not a failure
    assert "BINANCE_API_SECRET <- api_secret (12 bytes)" in res.output
    (warning,) = [line for line in res.output.splitlines() if "warning:" in line]
    assert "api_secret" in warning and "newline" in warning and "s-access-nl" not in res.output


def test_check_all_goes_on_past_a_failing_profile_and_fails_at_the_end(
        openbao: OpenBao, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    openbao.kv_put("credbroker/access-ok", api_secret="s-ok")
    cfg = _config(tmp_path, openbao, "credbroker/access-ok",
                  '\n[profiles.q]\nsource = "vault"\npath = "secret/credbroker/access-none"\n'
                  'env = { BINANCE_API_SECRET = "api_secret" }\n')
    monkeypatch.setenv("VAULT_TOKEN", openbao.token)
    res = CliRunner().invoke(cli, ["--config", str(cfg), "check", "--all", "--json"])
    assert res.exit_code == 125
    results = {r["profile"]: r for r in json.loads(res.stdout)}
    assert results["p"]["ok"] is True and results["q"]["ok"] is False and results["q"]["problems"]


def test_check_says_when_the_token_cannot_follow_rotation(openbao: OpenBao, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A token that may read the secret but not its metadata starts a bot whose every rotation check fails:
    check says so before that happens."""
    openbao.kv_put("credbroker/access-meta", api_secret="s-meta")
    client = openbao.client()
    client.sys.create_or_update_acl_policy(
        name="data-only", policy='path "secret/data/credbroker/access-meta" { capabilities = ["read"] }')
    token = client.auth.token.create(policies=["data-only"], ttl="10m")["auth"]["client_token"]
    cfg = _config(tmp_path, openbao, "credbroker/access-meta")
    monkeypatch.setenv("VAULT_TOKEN", token)
    res = CliRunner().invoke(cli, ["--config", str(cfg), "check", "-p", "p"])
    assert res.exit_code == 125
    assert "problem: rotation cannot be followed" in res.output and "metadata" in res.output


def test_check_many_is_the_librarys_check_of_several_profiles(openbao: OpenBao, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """What `credbroker check --all` / `-p A -p B` computes, callable without the CLI."""
    from broker.checks import check_many
    from broker.config import load
    from broker.errors import ConfigError, RunError

    openbao.kv_put("credbroker/access-many", api_secret="s-many")
    cfg = _config(tmp_path, openbao, "credbroker/access-many",
                  '\n[profiles.q]\nsource = "vault"\npath = "secret/credbroker/access-many-none"\n'
                  'env = { BINANCE_API_SECRET = "api_secret" }\n')
    monkeypatch.setenv("VAULT_TOKEN", openbao.token)
    config = load(str(cfg))
    every = {r["profile"]: r for r in check_many(config)}
    assert every["p"]["ok"] is True and every["p"]["fields"] == {"api_secret": {"bytes": 6}}
    assert every["q"]["ok"] is False and every["q"]["problems"] and "source" not in every["q"]
    with pytest.raises(BrokerError):  # one profile: its read's error is raised
        check_many(config, ["q"])
    reads = len([r for r in _records(tmp_path) if r["event"] == "secret_fetched"])
    with pytest.raises(RunError, match="both set BINANCE_API_SECRET"):  # as a run takes them: nothing read
        check_many(config, ["p", "q"])
    assert len([r for r in _records(tmp_path) if r["event"] == "secret_fetched"]) == reads
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="no profiles"):
        check_many(load(str(empty)))
