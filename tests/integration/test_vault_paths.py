"""Every Vault path a user gives is checked by one rule: no '..', '.', empty or %-encoded segments.

The rule is ``broker.vault.paths`` in Python and ``cb_check_path`` in scripts/lib-vault.sh; both run
over the same table here. Then each place a path comes in: ``--vault-path``, a profile's ``path`` /
``mount`` / ``transit_key`` / ``transit_mount``, the signer's ``transit_key``, ``--transit-key``,
``credbroker import --vault-path``, and the admin scripts' ``--path``/``--mount``/key names.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from broker.config import Profile, parse_dict
from broker.errors import ConfigError
from broker.signing.settings import SignerSettings
from broker.vault.paths import PathKind, check, problem

from tests.conftest import OpenBao, REPO, credbroker_bin

LIB = REPO / "scripts" / "lib-vault.sh"

# (kind, value, accepted)
CASES = [
    ("path", "secret/credbroker/bot", True),
    ("path", "secret/a.b/c-d_e", True),
    ("path", "secret/bot/../other/target", False),
    ("path", "secret/./bot", False),
    ("path", "..", False),
    ("path", ".", False),
    ("path", "secret//bot", False),
    ("path", "/secret/bot", False),
    ("path", "secret/bot/", False),
    ("path", "", False),
    ("path", "secret/%2e%2e/other", False),
    ("path", "secret/bot%2Fx", False),
    ("path", "secret\\..\\other", False),
    ("path", "secret/bot?x=1", False),
    ("path", "secret/bot#frag", False),
    ("path", "secret/b ot", False),
    ("path", "secret/b\tot", False),
    ("path", "secret/b\x01ot", False),
    ("path", "secret/...", True),  # three dots is a name, not a traversal
    ("mount", "secret", True),
    ("mount", "secret/", True),
    ("mount", "team/kv", True),
    ("mount", "secret//", False),
    ("mount", "/secret", False),
    ("mount", "..", False),
    ("mount", "kv/../secret", False),
    ("mount", "%73ecret", False),
    ("name", "binance-um", True),
    ("name", "key.v2", True),
    ("name", "a/b", False),
    ("name", "..", False),
    ("name", ".", False),
    ("name", "k%2e", False),
    ("name", "", False),
]


@pytest.mark.parametrize(("kind", "value", "ok"), CASES)
def test_python_rule(kind: str, value: str, ok: bool) -> None:
    assert (problem(value, PathKind(kind)) is None) is ok
    if not ok:
        with pytest.raises(ConfigError, match="^where: ") as info:
            check(value, PathKind(kind), "where")
        assert "\n" not in str(info.value) and "fix:" in str(info.value)


@pytest.mark.parametrize(("kind", "value", "ok"), CASES)
def test_the_scripts_apply_the_same_rule(kind: str, value: str, ok: bool) -> None:
    script = f'CB_PROG=t; . "{LIB}"; cb_check_path "$1" --x "$2"; printf "%s" "$CB_PATH"'
    res = subprocess.run(["bash", "-c", script, "bash", kind, value], capture_output=True, text=True, timeout=30)
    assert (res.returncode == 0) is ok, res.stderr
    if ok:
        assert res.stdout == check(value, PathKind(kind), "x")
    else:
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and "invalid --x" in res.stderr


def test_mount_loses_one_trailing_slash() -> None:
    assert check("secret/", PathKind.MOUNT, "w") == "secret"


# -- every way in ------------------------------------------------------------------------------------
def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([credbroker_bin(), *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("path", ["secret/bot/../other/target", "secret/%2e%2e/other", "secret//other",
                                  "/secret/other"])
def test_run_and_check_refuse_a_bad_vault_path(openbao: OpenBao, tmp_path: Path, path: str) -> None:
    openbao.kv_put("other/target", api_key="must-not-print")
    env = {**openbao.env(), "CREDBROKER_DAEMON": "0", "CREDBROKER_AUDIT_LOG": str(tmp_path / "audit.log")}
    res = _run(env, "run", "--vault-path", path, "--env", "A=api_key", "--", "sh", "-c", 'echo "$A"')
    assert res.returncode == 125, res.stdout + res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("credbroker: --vault-path: ")
    assert "must-not-print" not in res.stdout
    cfg = tmp_path / "cfg" / "credbroker.toml"
    cfg.parent.mkdir()
    cfg.write_text(f'[profiles.p]\nsource = "vault"\npath = "{path}"\nenv = {{ A = "api_key" }}\n')
    res = _run({**env, "CREDBROKER_CONFIG": str(cfg)}, "check", "-p", "p")
    assert res.returncode == 125 and f"{cfg}: profiles.p.path" in res.stderr and res.stderr.count("\n") == 1


def test_profile_mount_transit_key_and_mount(tmp_path: Path) -> None:
    base = {"source": "vault", "path": "secret/bot", "env": {"A": "api_key"}}
    for key, value in [("mount", "../secret"), ("transit_key", "../k"), ("transit_key", "a/b"),
                       ("transit_mount", "tr%61nsit")]:
        with pytest.raises(ConfigError, match=f"file.toml: profiles.p.{key}: .* is not a valid Vault"):
            parse_dict({"profiles": {"p": {**base, key: value}}}, origin="file.toml")
    with pytest.raises(ConfigError, match="^--transit-key: "):
        Profile.adhoc(env={"A": "api_key"}, vault_path="secret/bot", transit_key="../k")
    for key, value in [("transit_key", "k/../x"), ("transit_key", ".."), ("transit_mount", "a//b"),
                       ("token_role", "..")]:
        with pytest.raises(ConfigError, match=f"signer.{key}"):
            SignerSettings.from_mapping({"type": "transit", "transit_key": "k", key: value}, "signer")


def test_import_refuses_a_bad_vault_path(tmp_path: Path) -> None:
    creds = tmp_path / "creds.env"
    creds.write_text("BINANCE_API_KEY=k\n")
    creds.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAULT_")}
    res = _run(env, "import", str(creds), "--vault-path", "secret/a/../b")
    assert res.returncode == 125 and "--vault-path" in res.stderr and "'..'" in res.stderr
    assert creds.exists()


@pytest.mark.parametrize(("script", "args"), [
    ("rotate-key", ["--mount", "secret//", "bot"]),
    ("rotate-key", ["--mount", "../secret", "bot"]),
    ("rotate-key", ["--path", "/credbroker/x"]),
    ("rotate-key", ["--path", "credbroker/%2e%2e/x"]),
    ("unwrap-secret-id", ["--bot", "b", "--out", "/tmp/never-written", "--mount", "app/../role"]),
    ("transit-key", ["--mount", "transit/../kv", "k"]),
    ("transit-key", ["k/../x"]),
])
def test_scripts_refuse_bad_paths_before_any_vault_call(script: str, args: list[str], tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VAULT_ADDR": "http://127.0.0.1:9"}
    res = subprocess.run([str(REPO / "scripts" / script), *args], env=env, capture_output=True, text=True,
                         timeout=30, input="x\n")
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "invalid" in res.stderr
