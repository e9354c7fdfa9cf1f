"""Vault settings are resolved once per library entry, and a failure to resolve them is the read's recorded
refusal (pure logic: nothing answers at the address; tests/integration/test_settings_once.py counts the
same against real OpenBao, for broker.fetch, a run with rotation and get_signer)."""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

import broker
from broker.config import Profile
from broker.errors import ConfigError, VaultUnreachable
from broker.vault.settings import VaultSettings

PROFILE = Profile(name="p", source="vault", env={"S": "api_secret"}, options={"path": "secret/p"})


@pytest.fixture
def resolutions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Mapping[str, str]]]:
    calls: list[Mapping[str, str]] = []
    real = VaultSettings.from_env.__func__  # type: ignore[attr-defined]

    def counting(cls: type[VaultSettings], env: Mapping[str, str]) -> VaultSettings:
        calls.append(env)
        result: VaultSettings = real(cls, env)
        return result

    monkeypatch.setattr(VaultSettings, "from_env", classmethod(counting))
    yield calls


def _closed() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_failed_fetch_resolved_the_settings_once(resolutions: list[Mapping[str, str]]) -> None:
    records: list[tuple[str, dict[str, Any]]] = []
    env = {"VAULT_ADDR": _closed(), "VAULT_TOKEN": "t", "CREDBROKER_DAEMON": "0", "CREDBROKER_VAULT_TIMEOUT": "2"}
    with pytest.raises(VaultUnreachable):
        broker.fetch(PROFILE, env=env, record=lambda e, f: records.append((e, dict(f))))
    assert len(resolutions) == 1
    assert [e for e, _ in records] == ["refused"] and records[0][1]["error"] == "VaultUnreachable"


def test_settings_that_do_not_resolve_are_the_reads_recorded_refusal(resolutions: list[Mapping[str, str]]) -> None:
    records: list[tuple[str, dict[str, Any]]] = []
    with pytest.raises(ConfigError, match="VAULT_ADDR"):
        broker.fetch(PROFILE, env={"VAULT_ADDR": "not-an-address", "CREDBROKER_DAEMON": "0"},
                     record=lambda e, f: records.append((e, dict(f))))
    assert len(resolutions) == 1
    assert [e for e, _ in records] == ["refused"] and records[0][1]["by"] == "library"


def test_a_keyring_profile_never_resolves_vault_settings(resolutions: list[Mapping[str, str]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken VAULT_ADDR is no business of a keyring read."""
    from broker.sources import keyring as keyring_source
    from broker.secret import Credentials, Origin, Secret

    monkeypatch.setattr(keyring_source, "fetch", lambda profile, settings=None: Credentials(
        profile=profile.name, origin=Origin(source="keyring", path="credbroker/k"), fields={"s": Secret("x")}))
    records: list[tuple[str, dict[str, Any]]] = []
    creds = broker.fetch(Profile(name="k", source="keyring", env={"S": "s"}), env={"VAULT_ADDR": "not-an-address"},
                         record=lambda e, f: records.append((e, dict(f))))
    creds.wipe()
    assert resolutions == [] and [e for e, _ in records] == ["secret_fetched"]
