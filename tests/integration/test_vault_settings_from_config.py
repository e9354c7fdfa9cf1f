"""`[vault]` settings resolved once, beside the environment (never as invented variables), against real OpenBao."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

import broker
from broker.config import with_config_defaults
from broker.errors import VaultUnreachable
from broker.vault.origins import SettingsEnv
from broker.vault.settings import VaultSettings
from tests.conftest import OpenBao

PROFILE = '[profiles.p]\nsource = "vault"\npath = "secret/{path}"\nenv = {{ API_SECRET = "api_secret" }}\n'


def _config(tmp_path: Path, vault: str, path: str = "cfg-p") -> Path:
    cfg = tmp_path / "cfg" / "credbroker.toml"
    cfg.parent.mkdir(exist_ok=True)
    cfg.write_text(vault + PROFILE.format(path=path))
    return cfg


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_library_fetch_honours_vault_addr_from_the_config(openbao: OpenBao, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`broker.fetch(broker.load_config().profile("p"))` with `[vault] addr` and no VAULT_ADDR reads from it."""
    openbao.kv_put("cfg-p", api_secret="from-the-config-addr")
    cfg = _config(tmp_path, f'[vault]\naddr = "{openbao.addr}"\n')
    monkeypatch.setenv("CREDBROKER_CONFIG", str(cfg))
    monkeypatch.setenv("VAULT_TOKEN", openbao.token)
    monkeypatch.setenv("CREDBROKER_DAEMON", "0")
    creds = broker.fetch(broker.load_config().profile("p"))
    try:
        assert creds["api_secret"].reveal_str() == "from-the-config-addr"
    finally:
        creds.wipe()


def test_an_error_names_the_config_key_not_a_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, f'[vault]\naddr = "{_closed_port()}"\ntimeout = 2\n')
    monkeypatch.setenv("CREDBROKER_CONFIG", str(cfg))
    monkeypatch.setenv("VAULT_TOKEN", "t")
    monkeypatch.setenv("CREDBROKER_DAEMON", "0")
    with pytest.raises(VaultUnreachable) as err:
        broker.fetch(broker.load_config().profile("p"))
    assert f"[vault] addr in {cfg}" in str(err.value) and "VAULT_ADDR" not in str(err.value)


def test_no_vault_setting_travels_as_an_environment_variable(tmp_path: Path) -> None:
    cfg = _config(tmp_path, '[vault]\naddr = "http://127.0.0.1:9"\nnamespace = "team"\ntimeout = 3\n'
                            'addrs = ["http://127.0.0.1:10"]\nauth = "token"\n')
    config = broker.load_config(str(cfg))
    stale = json.dumps({"VAULT_ADDR": "/elsewhere.toml"})  # written by an older credbroker: not trusted
    env = with_config_defaults({"HOME": str(tmp_path), "CREDBROKER_VAULT_FROM_CONFIG": stale}, config)
    assert isinstance(env, SettingsEnv)
    assert dict(env) == {"HOME": str(tmp_path)}  # nothing invented, the stale marker dropped
    settings = VaultSettings.from_env(env)
    assert (settings.addr, settings.namespace, settings.timeout, settings.addrs) == (
        "http://127.0.0.1:9", "team", 3.0, ("http://127.0.0.1:10",))
    for key in ("addr", "namespace", "timeout", "addrs", "auth"):
        assert settings.origin(key) == f"[vault] {key} in {cfg}"
    # The environment first, as the Vault CLI reads it; each value knows where it came from.
    both = with_config_defaults({"VAULT_ADDR": "http://127.0.0.1:11", "BAO_NAMESPACE": "b"}, config)
    s2 = VaultSettings.from_env(both)
    assert (s2.addr, s2.origin("addr"), s2.namespace, s2.origin("namespace")) == (
        "http://127.0.0.1:11", "VAULT_ADDR", "b", "BAO_NAMESPACE")
    assert s2.origin("timeout") == f"[vault] timeout in {cfg}"
    # Dropping a variable (rotation drops a used-up token) keeps the table.
    assert VaultSettings.from_env(both.without("VAULT_ADDR")).addr == "http://127.0.0.1:9"


def test_approle_files_from_the_config_are_read_and_checked(openbao: OpenBao, tmp_path: Path) -> None:
    """role_id_file / secret_id_file in [vault]: used for the login, and refused when others may read them."""
    openbao.cli("auth", "enable", "approle", check=False)
    openbao.cli("policy", "write", "cfg-approle", "-",
                input='path "secret/data/cfg-p" { capabilities = ["read"] }\n')
    openbao.cli("write", "auth/approle/role/cfg-role", "token_policies=cfg-approle")
    role_id = json.loads(openbao.cli("read", "-format=json", "auth/approle/role/cfg-role/role-id"))["data"]["role_id"]
    secret_id = json.loads(openbao.cli("write", "-format=json", "-f",
                                       "auth/approle/role/cfg-role/secret-id"))["data"]["secret_id"]
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "role_id").write_text(role_id)
    (private / "secret_id").write_text(secret_id)
    (private / "secret_id").chmod(0o600)
    openbao.kv_put("cfg-p", api_secret="via-approle-files")
    cfg = _config(tmp_path, f'[vault]\naddr = "{openbao.addr}"\nrole_id_file = "{private}/role_id"\n'
                            f'secret_id_file = "{private}/secret_id"\n')
    config = broker.load_config(str(cfg))
    creds = broker.fetch(config.profile("p"), config=config, env={"HOME": str(tmp_path)}, use_daemon=False)
    try:
        assert creds["api_secret"].reveal_str() == "via-approle-files"
    finally:
        creds.wipe()
    (private / "secret_id").chmod(0o644)
    with pytest.raises(broker.BrokerError, match="secret_id"):
        broker.fetch(config.profile("p"), config=config, env={"HOME": str(tmp_path)}, use_daemon=False)
