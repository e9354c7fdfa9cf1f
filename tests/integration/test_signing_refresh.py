"""In-process rotation: a signer from get_signer() switches keys without a restart."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest

from broker.errors import VaultUnreachable
from broker.secret import Secret
from broker.signing.hmac_sha256 import HmacSigner
from broker.signing.refresh import RefreshingSigner


class FakeVault:
    """Stands in for the source: versions of (api_key, secret)."""

    def __init__(self) -> None:
        self.versions = {1: ("AK1", "secret-one")}
        self.builds = 0
        self.down = False

    @property
    def current(self) -> int:
        return max(self.versions)

    def latest(self) -> int:
        if self.down:
            raise VaultUnreachable("cannot reach Vault", "start it")
        return self.current

    def build(self) -> tuple[HmacSigner, int]:
        if self.down:
            raise VaultUnreachable("cannot reach Vault", "start it")
        self.builds += 1
        key, secret = self.versions[self.current]
        return HmacSigner(key, Secret(secret), record_failures=False), self.current


def expected(secret: str, payload: str) -> str:
    return hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()


def make(vault: FakeVault, events: list[tuple[str, dict[str, Any]]], interval: float | None = None,
         now: list[float] | None = None) -> RefreshingSigner:
    clock = (lambda: now[0]) if now is not None else None
    kwargs: dict[str, Any] = {"clock": clock} if clock else {}
    return RefreshingSigner(vault.build, latest=vault.latest, record=lambda e, f: events.append((e, f)),
                            profile="p", interval=interval, **kwargs)


def test_refresh_switches_keys_only_when_the_version_changed() -> None:
    vault, events = FakeVault(), []
    signer = make(vault, events)
    assert signer.sign("a=1") == expected("secret-one", "a=1")
    assert signer.kind == "hmac" and signer.version == 1
    assert signer.refresh() is False and vault.builds == 1  # metadata only, no fetch
    vault.versions[2] = ("AK2", "secret-two")
    assert signer.refresh() is True
    assert signer.sign("a=1") == expected("secret-two", "a=1")
    assert str(signer.api_key) == "AK2" and "AK2" not in repr(signer)
    assert events == [("rotation_detected", {"profile": "p", "old_version": 1, "new_version": 2,
                                             "action": "refresh", "by": "get_signer"})]


def test_refreshes_by_itself_at_the_interval() -> None:
    vault, events, now = FakeVault(), [], [0.0]
    signer = make(vault, events, interval=30, now=now)
    vault.versions[2] = ("AK2", "secret-two")
    assert signer.sign("x") == expected("secret-one", "x")  # interval not yet passed
    now[0] = 31
    assert signer.sign("x") == expected("secret-two", "x")


def test_an_outage_keeps_the_old_key_and_retries() -> None:
    vault, events, now = FakeVault(), [], [0.0]
    signer = make(vault, events, interval=10, now=now)
    vault.down = True
    now[0] = 11
    assert signer.sign("x") == expected("secret-one", "x")
    assert events[-1][0] == "rotation_check_failed"
    with pytest.raises(VaultUnreachable):
        signer.refresh()  # an explicit refresh says what failed
    vault.down = False
    vault.versions[2] = ("AK2", "secret-two")
    now[0] = 22
    assert signer.sign("x") == expected("secret-two", "x")


def test_a_key_error_from_the_exchange_triggers_a_refresh() -> None:
    vault, events = FakeVault(), []
    signer = make(vault, events)
    vault.versions[2] = ("AK2", "secret-two")
    signer._record_failures = False  # this unit test keeps the audit log out of it
    failure = signer.report(401, {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."},
                            "/fapi/v1/order")
    assert failure is not None
    assert signer.version == 2
    other = signer.report(400, {"code": -1013, "msg": "Filter failure: LOT_SIZE"}, "/fapi/v1/order")
    assert other is None and vault.builds == 2


@pytest.mark.vault
def test_get_signer_follows_rotation_against_real_openbao(openbao, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import json

    from broker import get_signer

    openbao.kv_put("credbroker/refresh", api_key="AK-1", api_secret="real-secret-1")
    cfg = tmp_path / "credbroker.toml"
    cfg.write_text('[profiles.refresh]\nsource = "vault"\npath = "secret/credbroker/refresh"\n'
                   'env = { K = "api_key", S = "api_secret" }\n'
                   '[profiles.refresh.signer]\nrefresh_interval = "1h"\n')
    audit = tmp_path / "audit.log"
    env = {**openbao.env(), "CREDBROKER_AUDIT_LOG": str(audit)}
    signer = get_signer(profile="refresh", config=str(cfg), env=env)
    assert signer.sign("q=1") == expected("real-secret-1", "q=1")
    assert signer.refresh() is False
    v2 = openbao.kv_put("credbroker/refresh", api_key="AK-2", api_secret="real-secret-2")
    assert signer.refresh() is True
    assert signer.sign("q=1") == expected("real-secret-2", "q=1")
    assert str(signer.api_key) == "AK-2"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    rotated = [r["data"] for r in records if r["event"] == "rotation_detected"]
    assert rotated == [{"profile": "refresh", "old_version": v2 - 1, "new_version": v2, "action": "refresh",
                        "by": "get_signer"}]
    assert [r["event"] for r in records].count("secret_fetched") == 2
    assert "real-secret" not in audit.read_text()


def test_signer_from_run_environment_cannot_refresh() -> None:
    from broker.errors import SigningError

    plain = HmacSigner("AK", Secret("s"), record_failures=False)
    with pytest.raises(SigningError, match="cannot fetch a rotated key"):
        plain.refresh()
