"""When the rotation watcher renews its Vault token: at half the token's lifetime (so an outage or an
election shorter than that never lets it expire), with the last two check intervals as before; an AppRole
login only in those last two intervals. Pure logic: the token calls are replaced, the clock is the test's."""

from __future__ import annotations

from typing import Any

import pytest

import broker.vault.token as token_calls
from broker.config import Profile
from broker.errors import VaultUnreachable
from broker.vault.settings import VaultSettings
from broker.watch import Watcher


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def vault(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    state: dict[str, Any] = {"ttl": 3600.0, "renewals": 0, "grant": 3600.0, "down": False, "logins": 0}

    def lookup_self(client: Any, settings: Any, **kw: Any) -> dict[str, Any]:
        return {"data": {"ttl": state["ttl"], "renewable": True}}

    def renew_self(client: Any, settings: Any, **kw: Any) -> dict[str, Any]:
        if state["down"]:
            raise VaultUnreachable("cannot reach Vault at http://127.0.0.1:9 (connection refused)", "start it")
        state["renewals"] += 1
        return {"auth": {"lease_duration": state["grant"]}}

    def relogin(settings: Any) -> object:
        state["logins"] += 1
        return object()

    monkeypatch.setattr(token_calls, "lookup_self", lookup_self)
    monkeypatch.setattr(token_calls, "renew_self", renew_self)
    monkeypatch.setattr(token_calls, "relogin", relogin)
    return state


def _watcher(clock: Clock, records: list[tuple[str, dict[str, Any]]], env: dict[str, str]) -> Watcher:
    profile = Profile(name="p", source="vault", env={"S": "api_secret"}, options={"path": "secret/p"})
    settings = VaultSettings.from_env({"VAULT_ADDR": "http://127.0.0.1:9", **env})
    w = Watcher(profile, settings, lambda e, f: records.append((e, dict(f))), 1, interval=30.0, clock=clock)
    w._client = object()
    w._learn_token(w._client)
    return w


def test_a_token_is_renewed_once_half_its_lifetime_is_used(vault: dict[str, Any]) -> None:
    clock, records = Clock(), []
    w = _watcher(clock, records, {"VAULT_TOKEN": "t"})
    clock.now += 1700  # 1900 s left of 3600: more than half
    w._keep_token_alive()
    assert vault["renewals"] == 0
    clock.now += 200  # 1700 s left: less than half (the old rule waited for 60 s left)
    w._keep_token_alive()
    assert vault["renewals"] == 1 and [e for e, _ in records] == ["token_renewed"]
    clock.now += 100  # renewed to a full hour: nothing to do
    w._keep_token_alive()
    assert vault["renewals"] == 1


def test_an_outage_at_half_life_is_retried_at_each_check_and_the_token_survives(vault: dict[str, Any]) -> None:
    clock, records = Clock(), []
    w = _watcher(clock, records, {"VAULT_TOKEN": "t"})
    vault["down"] = True
    clock.now += 1800  # half the hour used
    for _ in range(40):  # then 20 minutes of outage: each check tries, none raises, nothing recorded
        clock.now += 30
        w._keep_token_alive()
    assert vault["renewals"] == 0 and records == []
    vault["down"] = False
    clock.now += 30
    w._keep_token_alive()
    assert vault["renewals"] == 1 and [e for e, _ in records] == ["token_renewed"]


def test_at_the_max_ttl_only_the_last_two_intervals_are_tried(vault: dict[str, Any]) -> None:
    clock, records = Clock(), []
    w = _watcher(clock, records, {"VAULT_TOKEN": "t"})
    vault["grant"] = 1000.0  # the max TTL is near: Vault "renews" without extending
    clock.now += 1900  # 1700 s left
    w._keep_token_alive()
    assert vault["renewals"] == 1 and records == []
    clock.now += 1000  # 700 s left: no more attempts until the last two intervals
    w._keep_token_alive()
    assert vault["renewals"] == 1
    clock.now += 650  # 50 s left
    w._keep_token_alive()
    assert vault["renewals"] == 2


def test_an_approle_login_waits_for_the_last_two_intervals(vault: dict[str, Any]) -> None:
    clock, records = Clock(), []
    w = _watcher(clock, records, {"VAULT_ROLE_ID": "role", "VAULT_SECRET_ID": "sid",
                                  "CREDBROKER_VAULT_AUTH": "approle"})
    vault["grant"] = 10.0  # renewals do not extend it (max TTL)
    clock.now += 1900
    w._keep_token_alive()
    assert vault["logins"] == 0  # a secret_id may count its uses: no early login
    clock.now += 1650  # 50 s left
    w._keep_token_alive()
    assert vault["logins"] == 1 and [e for e, _ in records] == ["token_relogin"]
