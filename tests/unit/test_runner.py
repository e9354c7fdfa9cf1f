"""Runner logic that needs no server: environment, command resolution, status."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from broker import runner
from broker.config import Profile
from broker.errors import CommandNotExecutable, CommandNotFound, NestedRunError
from broker.secret import Credentials, Origin, Secret

PROFILE = Profile(
    name="um-futures",
    source="vault",
    env={"BINANCE_API_KEY": "api_key", "BINANCE_API_SECRET": "api_secret"},
    options={"path": "secret/x"},
)


def creds() -> Credentials:
    return Credentials(
        profile="um-futures",
        origin=Origin(source="vault", path="secret/x", version=2),
        fields={"api_key": Secret("AK-new"), "api_secret": Secret("SECRET-new")},
    )


def test_child_env_drops_broker_credentials_and_stale_copies() -> None:
    parent = {
        "PATH": "/usr/bin",
        "VAULT_ADDR": "http://127.0.0.1:8200",
        "VAULT_TOKEN": "hvs.broker-token",
        "BAO_TOKEN": "s.bao",
        "VAULT_ROLE_ID": "role",
        "VAULT_SECRET_ID": "sid",
        "CREDBROKER_SECRET_ID": "sid2",
        "CREDBROKER_AUDIT_KEY": "k",
        "BINANCE_API_SECRET": "STALE",
    }
    env = runner.child_environment(parent, PROFILE, creds())
    text = {k.decode(): v.decode() for k, v in env.items()}
    for gone in ("VAULT_TOKEN", "BAO_TOKEN", "VAULT_ROLE_ID", "VAULT_SECRET_ID", "CREDBROKER_SECRET_ID",
                 "CREDBROKER_AUDIT_KEY"):
        assert gone not in text
    assert text["BINANCE_API_SECRET"] == "SECRET-new"
    assert text["BINANCE_API_KEY"] == "AK-new"
    assert text["PATH"] == "/usr/bin" and text["VAULT_ADDR"] == "http://127.0.0.1:8200"
    assert text["CREDBROKER_RUN"] == str(os.getpid())
    assert text["CREDBROKER_PROFILE"] == "um-futures"
    assert json.loads(text["CREDBROKER_ENV_MAP"]) == dict(PROFILE.env)


def test_nul_byte_in_secret_is_refused() -> None:
    c = Credentials(profile="p", origin=Origin("vault", "x"), fields={"api_key": Secret(b"a\0b"),
                                                                       "api_secret": Secret("s")})
    with pytest.raises(runner.RunError, match="NUL byte") as info:
        runner.child_environment({}, PROFILE, c)
    assert "a\0b" not in str(info.value)


def test_nested_run_is_refused() -> None:
    with pytest.raises(NestedRunError, match="already inside"):
        runner.check_not_nested({"CREDBROKER_RUN": "123"})
    runner.check_not_nested({})


def test_resolve_command(tmp_path: Path) -> None:
    exe = tmp_path / "bot"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    plain = tmp_path / "plain"
    plain.write_text("x")
    plain.chmod(0o644)
    assert runner.resolve_command("bot", str(tmp_path)) == str(exe)
    assert runner.resolve_command(str(exe), None) == str(exe)
    with pytest.raises(CommandNotFound) as nf:
        runner.resolve_command("no-such-bot", str(tmp_path))
    assert nf.value.exit_code == 127
    with pytest.raises(CommandNotExecutable) as ne:
        runner.resolve_command("plain", str(tmp_path))
    assert ne.value.exit_code == 126
    with pytest.raises(CommandNotExecutable) as isdir:
        runner.resolve_command(str(tmp_path), None)  # a directory
    assert "is a directory" in str(isdir.value) and "chmod" not in str(isdir.value)
    assert isdir.value.exit_code == 126
    assert not plain.stat().st_mode & stat.S_IXUSR


def test_exit_status_like_a_shell() -> None:
    assert runner.exit_status(0) == 0
    assert runner.exit_status(3) == 3
    assert runner.exit_status(-15) == 143
    assert runner.exit_status(-9) == 137
