"""The resident fetch process (`credbroker daemon`) against the real OpenBao."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import daemon, sources
from broker.config import Profile
from broker.errors import VaultAuthError, VaultNotFound

from .conftest import OpenBao, credbroker_bin

pytestmark = pytest.mark.vault

SECRET = "daemon-secret-9b1f3e77"


@pytest.fixture
def running(tmp_path: Path, openbao: OpenBao) -> Iterator[tuple[Path, dict[str, str]]]:
    sock_dir = tmp_path / "rt" / "credbroker"
    sock = sock_dir / "daemon.sock"
    env = {**openbao.env(), "CREDBROKER_DAEMON_SOCKET": str(sock)}
    proc = subprocess.Popen([credbroker_bin(), "daemon"], env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "serving on" in line, line
    try:
        yield sock, env
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not sock.exists()


def profile(path: str) -> Profile:
    return Profile(name="d", source="vault", env={"S": "api_secret"}, options={"path": path})


def test_fetch_goes_through_the_daemon(running: tuple[Path, dict[str, str]], openbao: OpenBao) -> None:
    sock, env = running
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    assert oct(sock.parent.stat().st_mode & 0o777) == "0o700"
    version = openbao.kv_put("credbroker/daemon", api_secret=SECRET)
    creds = daemon.fetch(profile("secret/credbroker/daemon"), env)
    assert creds is not None, "the daemon did not answer"
    assert creds["api_secret"].reveal_str() == SECRET
    assert creds.origin.version == version and creds.origin.source == "vault"
    # and the library uses it on its own
    assert sources.fetch(profile("secret/credbroker/daemon"), env=env)["api_secret"].reveal_str() == SECRET


def test_errors_come_back_as_the_same_classes(running: tuple[Path, dict[str, str]]) -> None:
    _, env = running
    with pytest.raises(VaultNotFound, match="nothing found"):
        daemon.fetch(profile("secret/credbroker/absent-daemon"), env)
    with pytest.raises(VaultAuthError, match="rejected the token"):
        daemon.fetch(profile("secret/credbroker/daemon"), {**env, "VAULT_TOKEN": "hvs.wrong"})


def test_run_through_the_daemon(running: tuple[Path, dict[str, str]], openbao: OpenBao, tmp_path: Path) -> None:
    _, env = running
    openbao.kv_put("credbroker/daemon-run", api_secret=SECRET)
    out = tmp_path / "seen"
    res = subprocess.run([credbroker_bin(), "run", "--vault-path", "secret/credbroker/daemon-run", "--env",
                          "S=api_secret", "--", "sh", "-c", f'printf %s "$S" > {out}'],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert out.read_text() == SECRET


def test_no_daemon_or_an_unsafe_folder_means_in_process(tmp_path: Path, openbao: OpenBao) -> None:
    env = {**openbao.env(), "CREDBROKER_DAEMON_SOCKET": str(tmp_path / "none" / "daemon.sock")}
    assert daemon.fetch(profile("secret/x"), env) is None
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    (open_dir / "daemon.sock").write_text("")
    assert daemon.fetch(profile("secret/x"), {**env, "CREDBROKER_DAEMON_SOCKET": str(open_dir / "daemon.sock")}) \
        is None
    assert daemon.fetch(profile("secret/x"), {**env, "CREDBROKER_DAEMON": "0"}) is None


def test_daemon_refuses_a_folder_other_users_can_enter(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    res = subprocess.run([credbroker_bin(), "daemon", "--socket", str(shared / "daemon.sock")],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert res.returncode == 125
    assert "not a folder private to this user" in res.stderr


def test_a_daemon_running_other_code_is_not_used(running: tuple[Path, dict[str, str]], openbao: OpenBao,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """After an upgrade the version string may not change; the code id does, and the daemon steps aside."""
    _, env = running
    openbao.kv_put("credbroker/daemon-stale", api_secret=SECRET)
    assert daemon.fetch(profile("secret/credbroker/daemon-stale"), env) is not None
    monkeypatch.setattr(daemon, "code_id", lambda: "0123456789abcdef")
    assert daemon.fetch(profile("secret/credbroker/daemon-stale"), env) is None
    # ...and the library then fetches in-process, with the same result.
    assert sources.fetch(profile("secret/credbroker/daemon-stale"), env=env)["api_secret"].reveal_str() == SECRET
