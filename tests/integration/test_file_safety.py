"""Like ssh: a config, AppRole id file or audit key file that another user could change is refused."""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import OpenBao, credbroker_bin

pytestmark = pytest.mark.vault

CONFIG = """
[vault]
{vault}
[audit]
{audit}
[profiles.bot]
source = "vault"
path = "secret/credbroker/safety"
env = {{ S = "api_secret" }}
"""


@pytest.fixture
def home(openbao: OpenBao, tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    openbao.kv_put("credbroker/safety", api_secret="safety-secret")
    folder = tmp_path / "conf"
    folder.mkdir(mode=0o700)
    env = {**openbao.env(), "HOME": str(tmp_path), "CREDBROKER_AUDIT_LOG": str(tmp_path / "audit.log")}
    yield env, folder


def write(folder: Path, vault: str = "", audit: str = "") -> Path:
    cfg = folder / "credbroker.toml"
    cfg.write_text(CONFIG.format(vault=vault, audit=audit))
    cfg.chmod(0o600)
    return cfg


def run(env: dict[str, str], cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([credbroker_bin(), "--config", str(cfg), "run", "-p", "bot", "--", "true"], env=env,
                          capture_output=True, text=True, timeout=60)


def refused(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode == 125, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def other_uid() -> int:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


def test_a_safe_config_runs(home: tuple[dict[str, str], Path]) -> None:
    env, folder = home
    assert run(env, write(folder)).returncode == 0


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_a_config_others_can_write_is_refused(home: tuple[dict[str, str], Path], mode: int) -> None:
    env, folder = home
    cfg = write(folder)
    cfg.chmod(mode)
    refused(run(env, cfg), str(cfg), "writable by other users", f"chmod go-w {cfg}")


def test_a_config_in_a_folder_others_can_write_is_refused(home: tuple[dict[str, str], Path]) -> None:
    env, folder = home
    cfg = write(folder)
    folder.chmod(0o777)
    try:
        refused(run(env, cfg), f"its folder {folder}", f"chmod go-w {folder}")
    finally:
        folder.chmod(0o700)


def test_a_sticky_root_folder_like_tmp_is_accepted(home: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    """/tmp is writable by all, but its sticky bit keeps others from replacing our entries."""
    if os.geteuid() != 0:
        pytest.skip("needs a root-owned sticky folder made by the test (run as root, as CI does)")
    env, _ = home
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    mine = sticky / "mine"
    mine.mkdir(mode=0o700)
    assert run(env, write(mine)).returncode == 0


def test_a_config_owned_by_another_user_is_refused(home: tuple[dict[str, str], Path]) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root (CI runs as root)")
    env, folder = home
    cfg = write(folder)
    os.chown(cfg, other_uid(), -1)
    refused(run(env, cfg), str(cfg), "owned by another user", "chown")
    os.chown(cfg, 0, -1)
    os.chown(folder, other_uid(), -1)
    refused(run(env, cfg), f"its folder {folder}", "owned by another user")


@pytest.mark.parametrize("key", ["role_id_file", "secret_id_file"])
def test_approle_files_others_can_write_are_refused(home: tuple[dict[str, str], Path], key: str) -> None:
    env, folder = home
    ids = {"role_id_file": folder / "role-id", "secret_id_file": folder / "secret-id"}
    for path in ids.values():
        path.write_text("x\n")
        path.chmod(0o600)
    ids[key].chmod(0o622)
    vault = "\n".join(f'{k} = "{v}"' for k, v in ids.items())
    refused(run(env, write(folder, vault=vault)), str(ids[key]), "writable by other users", "chmod go-w")
    ids[key].chmod(0o600)
    sub = folder / "ids"
    sub.mkdir()
    sub.chmod(0o770)
    moved = sub / ids[key].name
    ids[key].rename(moved)
    ids[key] = moved
    vault = "\n".join(f'{k} = "{v}"' for k, v in ids.items())
    refused(run(env, write(folder, vault=vault)), f"its folder {sub}", f"chmod go-w {sub}")


def test_approle_file_named_in_the_environment_is_checked_too(home: tuple[dict[str, str], Path]) -> None:
    env, folder = home
    secret_id = folder / "secret-id"
    secret_id.write_text("x\n")
    secret_id.chmod(0o666)
    res = run({**env, "CREDBROKER_SECRET_ID_FILE": str(secret_id), "CREDBROKER_ROLE_ID": "r"}, write(folder))
    refused(res, str(secret_id), "writable by other users")


def test_audit_key_file_must_be_private(home: tuple[dict[str, str], Path]) -> None:
    env, folder = home
    key = folder / "audit.key"
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o600)
    cfg = write(folder, audit=f'key = "file:{key}"')
    assert run(env, cfg).returncode == 0
    key.chmod(0o620)
    refused(run(env, cfg), str(key), "writable by other users", "chmod go-w")
    key.chmod(0o640)
    refused(run(env, cfg), str(key), "accessible by other users", f"chmod 600 {key}")
    key.chmod(0o600)
    folder.chmod(0o777)
    try:
        refused(run(env, cfg), f"its folder {folder}", "chmod go-w")
    finally:
        folder.chmod(0o700)
    if os.geteuid() == 0:
        os.chown(key, other_uid(), -1)
        refused(run(env, cfg), str(key), "owned by another user")


@pytest.mark.parametrize("var", ["VAULT_CACERT", "VAULT_CLIENT_KEY"])
def test_tls_files_others_can_write_are_refused(home: tuple[dict[str, str], Path], var: str) -> None:
    """Whoever can change the CA (or the client key) can stand between the broker and Vault."""
    env, folder = home
    pem = folder / "file.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    pem.chmod(0o666)
    refused(run({**env, var: str(pem)}, write(folder)), str(pem), "writable by other users", f"chmod go-w {pem}")
