"""Vault settings are resolved once per command or library entry and passed down as a typed value; the
long-running watcher re-reads the token file only at its one named moment (a rejected token). Against
real OpenBao: the reads succeed, so the count is of a whole, working path."""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import broker
from broker.config import Profile
from broker.rotation import RotationPolicy
from broker.run.options import RunOptions
from broker.run.pipeline import Run
from broker.vault.settings import VaultSettings
from broker.watch import Watcher
from tests.conftest import OpenBao

pytestmark = pytest.mark.vault


@pytest.fixture
def resolutions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Mapping[str, str]]]:
    """Every call of ``VaultSettings.from_env`` in this process (what it was resolved from)."""
    calls: list[Mapping[str, str]] = []
    real = VaultSettings.from_env.__func__  # type: ignore[attr-defined]

    def counting(cls: type[VaultSettings], env: Mapping[str, str]) -> VaultSettings:
        calls.append(env)
        result: VaultSettings = real(cls, env)
        return result

    monkeypatch.setattr(VaultSettings, "from_env", classmethod(counting))
    yield calls


def _profile(openbao: OpenBao, name: str) -> Profile:
    openbao.kv_put(f"credbroker/{name}", api_key="AK", api_secret="S-" + secrets.token_hex(8))
    return Profile(name=name, source="vault", env={"BINANCE_API_KEY": "api_key", "BINANCE_API_SECRET": "api_secret"},
                   options={"path": f"secret/credbroker/{name}"})


def test_broker_fetch_resolves_the_settings_exactly_once(openbao: OpenBao, tmp_path: Path,
                                                         resolutions: list[Mapping[str, str]]) -> None:
    profile = _profile(openbao, "once-fetch")
    records: list[tuple[str, dict[str, Any]]] = []
    env = {**openbao.env(), "CREDBROKER_DAEMON": "0"}
    creds = broker.fetch(profile, env=env, record=lambda e, f: records.append((e, dict(f))))
    try:
        assert creds["api_key"].reveal_str() == "AK"
    finally:
        creds.wipe()
    assert len(resolutions) == 1
    assert [e for e, _ in records] == ["secret_fetched"]


def test_a_run_with_rotation_resolves_the_settings_exactly_once(openbao: OpenBao, tmp_path: Path,
                                                                resolutions: list[Mapping[str, str]]) -> None:
    """The run resolves its settings once, for the rotation watcher (and a refusal's context, the scoped
    signing token, the proxy); the fetch itself runs in a throwaway child that resolves its own from the
    environment and [vault] it is given, in its own process, so this count does not see it."""
    profile = _profile(openbao, "once-run")
    records: list[tuple[str, dict[str, Any]]] = []
    env = {**openbao.env(), "CREDBROKER_DAEMON": "0"}
    options = RunOptions.build(profile, ["true"], environ=env, record=lambda e, f: records.append((e, dict(f))),
                               rotation=RotationPolicy("restart", None, 60.0, 1.0))
    run = Run(options)
    assert run.execute() == 0
    assert [e for e, _ in records][:1] == ["secret_fetched"] and "child_exited" in [e for e, _ in records]
    assert run.watchers[0] is not None and run.watchers[0].settings is run.vault  # handed down, not re-read
    assert len(resolutions) == 1


def test_get_signer_resolves_the_settings_exactly_once(openbao: OpenBao, tmp_path: Path,
                                                       resolutions: list[Mapping[str, str]],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.config import Config

    profile = _profile(openbao, "once-signer")
    for key, value in {**openbao.env(), "CREDBROKER_DAEMON": "0",
                       "CREDBROKER_AUDIT_LOG": str(tmp_path / "audit.log")}.items():
        monkeypatch.setenv(key, value)
    signer = broker.get_signer(profile=profile, config=Config(path=None, profiles={}))
    assert signer.kind == "hmac"
    assert len(resolutions) == 1


def test_the_watcher_rereads_the_token_file_only_after_vault_rejected_the_token(openbao: OpenBao,
                                                                                 tmp_path: Path) -> None:
    """A `vault login` during a run writes a new ~/.vault-token: the watcher keeps the token it was given
    while that one works, and picks the new one up (the named re-resolve) once Vault rejects the old."""
    profile = _profile(openbao, "once-watch")
    home = tmp_path / "login-home"
    home.mkdir()
    first = openbao.client().auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
    (home / ".vault-token").write_text(first)
    settings = VaultSettings.from_env({"VAULT_ADDR": openbao.addr, "HOME": str(home)})
    assert settings.token_source == "~/.vault-token"
    events: list[tuple[str, dict[str, Any]]] = []
    now = [0.0]
    w = Watcher(profile, settings, lambda e, f: events.append((e, dict(f))), version=1, interval=10,
                clock=lambda: now[0])
    try:
        assert w.poll() is None  # version 1, read with the first token
        second = openbao.client().auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
        (home / ".vault-token").write_text(second)  # `vault login` during the run
        openbao.kv_put("credbroker/once-watch", api_key="AK", api_secret="S2")
        now[0] = 11.0
        assert w.poll() == 2  # the first token still works: kept, the file not read again
        assert w.settings is settings and w.settings.token is not None and w.settings.token.reveal_str() == first
        openbao.client().auth.token.revoke(first)
        w.acted(2)
        openbao.kv_put("credbroker/once-watch", api_key="AK", api_secret="S3")
        now[0] = 22.0
        assert w.poll() is None  # rejected: recorded, client dropped
        assert [f["error"] for e, f in events if e == "rotation_check_failed"] == ["VaultAuthError"]
        now[0] = 100.0
        assert w.poll() == 3  # re-resolved: the token `vault login` wrote
        assert w.settings.token is not None and w.settings.token.reveal_str() == second
        assert w.settings.token_source == "~/.vault-token"
    finally:
        w.close()


def test_reresolved_without_inputs_is_the_same_value() -> None:
    built = VaultSettings(addr="http://127.0.0.1:9")
    assert built.reresolved() is built and built.reresolved(drop_token=True) is built
    resolved = VaultSettings.from_env({"VAULT_ADDR": "http://127.0.0.1:9", "VAULT_TOKEN": "t-1"})
    assert resolved.inputs is not None and "t-1" not in repr(resolved)
    dropped = resolved.reresolved(drop_token=True)
    assert dropped.token is None and dropped.inputs is not None and "VAULT_TOKEN" not in dropped.inputs


def test_the_anchorer_rereads_the_token_file_only_after_vault_rejected_the_token(openbao: OpenBao,
                                                                                  tmp_path: Path) -> None:
    """The audit log's anchorer resolves its settings at the first anchor and keeps them; when Vault
    rejects the token it re-resolves once (a `vault login` since then wrote a new ~/.vault-token)."""
    from broker.audit.anchor import AnchorPlace, Anchorer, read_all
    from broker.audit.chain import ANCHOR_LABEL, labelled_mac

    key = b"k" * 32
    home = tmp_path / "anchor-home"
    home.mkdir()
    first = openbao.client().auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
    (home / ".vault-token").write_text(first)
    failures: list[dict[str, Any]] = []
    place = AnchorPlace("secret", "credbroker-audit/once/" + secrets.token_hex(4))
    anchorer = Anchorer({"VAULT_ADDR": openbao.addr, "HOME": str(home)}, place, 0, labelled_mac(key, ANCHOR_LABEL),
                        "kid", "/var/log/a.log", failures.append)
    try:
        anchorer.committed(1, "a" * 64)
        assert anchorer.anchor_now()
        second = openbao.client().auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
        (home / ".vault-token").write_text(second)  # `vault login` since the first anchor
        openbao.client().auth.token.revoke(first)
        anchorer.committed(2, "b" * 64)
        assert anchorer.anchor_now() and failures == []  # rejected, re-resolved, written with the new token
        anchors = read_all(VaultSettings.from_env(openbao.env()), place, key)
        assert [(a.seq, a.mac_ok) for a in anchors] == [(2, True), (1, True)]
    finally:
        anchorer.stop()


def test_a_fleet_report_with_anchors_and_the_vault_cross_check_resolves_the_settings_once(
        audited_openbao: OpenBao, tmp_path: Path, resolutions: list[Mapping[str, str]]) -> None:
    """``audit report --host-logs --vault-audit`` over keyed logs with ``[audit] anchor`` on: the Vault
    cross-check and every host's anchors are read with one resolution (they were two)."""
    import json

    from click.testing import CliRunner

    from broker.cli import cli
    from tests.helpers.auditlog import KEYED_LOG_KEY, keyed_log

    root = tmp_path / "fleet"
    for host in ("bot-a", "bot-b"):
        log = keyed_log(root / host / "audit.log", anchor="off")  # the hosts' own writers do not anchor here
        log.record("secret_fetched", {"profile": "p"})
        log.close()
    config = tmp_path / "credbroker.toml"
    config.write_text(f'[audit]\nanchor = "secret/credbroker-audit-{secrets.token_hex(3)}"\n')
    config.chmod(0o600)
    env = {**audited_openbao.env(), "CREDBROKER_AUDIT_KEY": KEYED_LOG_KEY.hex()}
    res = CliRunner().invoke(cli, ["--config", str(config), "audit", "report", "--json", "--host-logs", str(root),
                                   "--vault-audit", str(audited_openbao.extra["audit_log"])], env=env)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    # Both reads of Vault happened: each host's anchors were read (none written: 0 compared, no error) ...
    assert [(h["host"], h["anchors_checked"], h["anchors_error"]) for h in out["hosts"]] == [
        ("bot-a", 0, None), ("bot-b", 0, None)]
    assert "vault_audit" in out  # ... and the cross-check ran
    assert len(resolutions) == 1
