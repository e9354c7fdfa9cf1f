"""The resident fetch process (`credbroker daemon`) against the real OpenBao."""

from __future__ import annotations

import base64
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from broker import daemon, sources
from broker.config import Profile
from broker.errors import VaultAuthError, VaultNotFound

from tests.conftest import REPO, OpenBao, credbroker_bin
from tests.helpers.memscan import children, count_in_memory, need_root

pytestmark = pytest.mark.vault

SECRET = "daemon-secret-9b1f3e77"


class Daemon(NamedTuple):
    sock: Path
    env: dict[str, str]
    proc: subprocess.Popen[str]


@pytest.fixture
def daemon_process(tmp_path: Path, openbao: OpenBao) -> Iterator[Daemon]:
    sock_dir = tmp_path / "rt" / "credbroker"
    sock = sock_dir / "daemon.sock"
    # Started the way a user would from a shell that exported VAULT_TOKEN: it needs no token of its own.
    env = {**openbao.env(), "CREDBROKER_DAEMON_SOCKET": str(sock)}
    proc = subprocess.Popen([credbroker_bin(), "daemon"], env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "serving on" in line, line
    try:
        yield Daemon(sock, env, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not sock.exists()
        # A stop is said, not silent: an operator reading the journal knows runs now fetch in-process.
        assert "credbroker daemon: stopped" in proc.stderr.read()


@pytest.fixture
def running(daemon_process: Daemon) -> tuple[Path, dict[str, str]]:
    return daemon_process.sock, daemon_process.env


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
    res = subprocess.run([credbroker_bin(), "run", "-v", "--vault-path", "secret/credbroker/daemon-run", "--env",
                          "S=api_secret", "--", "sh", "-c", f'printf %s "$S" > {out}'],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert out.read_text() == SECRET
    assert "(fetched by credbroker daemon)" in res.stderr  # -v says who served the fetch
    alone = subprocess.run([credbroker_bin(), "run", "-v", "--vault-path", "secret/credbroker/daemon-run", "--env",
                            "S=api_secret", "--", "true"], env={**env, "CREDBROKER_DAEMON": "0"},
                           capture_output=True, text=True, timeout=60)
    assert alone.returncode == 0 and "(fetched in a throwaway child)" in alone.stderr


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


# -- concurrency: a stuck client never delays another ------------------------------------------


def test_an_idle_connection_does_not_delay_a_fetch(running: tuple[Path, dict[str, str]], openbao: OpenBao,
                                                   tmp_path: Path) -> None:
    sock, env = running
    openbao.kv_put("credbroker/daemon-idle", api_secret=SECRET)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(str(sock))  # connected, sends nothing
        creds = daemon.fetch(profile("secret/credbroker/daemon-idle"), env)
        assert creds is not None, "the daemon did not answer while another client was idle"
        assert creds["api_secret"].reveal_str() == SECRET
        out = tmp_path / "seen"
        res = subprocess.run([credbroker_bin(), "run", "--vault-path", "secret/credbroker/daemon-idle", "--env",
                              "S=api_secret", "--", "sh", "-c", f'printf %s "$S" > {out}'],
                             env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert out.read_text() == SECRET
        # The idle client got no answer: still connected and unanswered, or (on a slow machine, past its
        # REQUEST_DEADLINE) dropped. Either way nobody waited for it.
        idle.setblocking(False)
        try:
            got = idle.recv(1)
        except BlockingIOError:
            got = None
        assert got in (None, b"")


def test_half_a_frame_is_dropped_after_the_deadline(running: tuple[Path, dict[str, str]]) -> None:
    sock, _ = running
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.connect(str(sock))
        slow.sendall((1000).to_bytes(4, "big") + b'{"op":"fe')  # and then nothing
        slow.settimeout(daemon.REQUEST_DEADLINE + 60)  # generous: the daemon closes it at its deadline
        assert slow.recv(1) == b""  # closed without an answer


def test_more_clients_than_slots_fall_back_instead_of_waiting(running: tuple[Path, dict[str, str]],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    sock, env = running
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(daemon.MAX_CLIENTS)]
    try:
        for s in idle:
            s.connect(str(sock))
        # Every slot is taken by an idle client: the next one is closed at once (and would
        # fetch in-process), rather than queued behind them.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
            extra.connect(str(sock))
            extra.settimeout(daemon.REQUEST_DEADLINE / 2)
            assert extra.recv(1) == b""
    finally:
        for s in idle:
            s.close()


# -- memory: nothing left in the daemon after a request ----------------------------------------


def _wait_no_children(pid: int) -> None:
    deadline = time.monotonic() + 60
    while children(pid):
        assert time.monotonic() < deadline, "the daemon's per-request processes never ended"
        time.sleep(0.02)


def test_the_daemon_keeps_no_secret_and_no_token(daemon_process: Daemon, openbao: OpenBao) -> None:
    """Scanned from outside (/proc/PID/mem, as root) after each request: no secret, no base64 of it, no token."""
    need_root()
    sock, env, proc = daemon_process
    token = env["VAULT_TOKEN"].encode()
    seen: list[bytes] = []
    for i in range(11):
        value = "D" + secrets.token_hex(24)
        openbao.kv_put(f"credbroker/daemon-mem-{i}", api_secret=value, api_key="K" + secrets.token_hex(8))
        creds = daemon.fetch(Profile(name="d", source="vault", env={"S": "api_secret", "K": "api_key"},
                                     options={"path": f"secret/credbroker/daemon-mem-{i}"}), env)
        assert creds is not None and creds["api_secret"].reveal_str() == value
        creds.wipe()
        seen.append(value.encode())
        if i in (0, 10):
            _wait_no_children(proc.pid)
            needles = [token, *seen, *(base64.b64encode(v) for v in seen)]
            counts, read = count_in_memory(proc.pid, needles)
            assert read > 1_000_000  # the scan really covered the interpreter
            assert counts[token] == 0, "the daemon holds a Vault token"
            left = [n.decode() for n, c in counts.items() if c and n != token]
            assert not left, f"after fetch {i + 1} the daemon still holds {len(left)} secret(s)"


def test_a_fetch_through_the_daemon_leaves_no_copy_in_the_caller(running: tuple[Path, dict[str, str]],
                                                                  openbao: OpenBao) -> None:
    """The caller's side: the answer is read into one buffer that is wiped; no str/bytes copy is made."""
    need_root()
    _, env = running
    value = "C" + secrets.token_hex(24)
    openbao.kv_put("credbroker/daemon-caller", api_secret=value)
    code = ("import gc, sys\n"
            "from broker import daemon\n"
            "from broker.config import Profile\n"
            "p = Profile(name='d', source='vault', env={'S': 'api_secret'},"
            " options={'path': 'secret/credbroker/daemon-caller'})\n"
            "creds = daemon.fetch(p, dict(__import__('os').environ))\n"
            "assert creds is not None and len(creds['api_secret']) == 49\n"
            "creds.wipe(); del creds; gc.collect()\n"
            "print('done', flush=True); sys.stdin.read()\n")
    caller = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert caller.stdout is not None
        assert caller.stdout.readline().strip() == "done", caller.communicate()
        counts, read = count_in_memory(caller.pid, [value.encode()])
        assert read > 1_000_000
        assert counts[value.encode()] == 0, "the caller kept a copy of the fetched secret"
    finally:
        caller.communicate("")


# -- the same isolation without a daemon: `credbroker run` fetches in a throwaway child ------------------


def test_an_isolated_fetch_returns_the_fields_and_the_same_errors(openbao: OpenBao) -> None:
    env = {**openbao.env(), "CREDBROKER_DAEMON": "0"}
    version = openbao.kv_put("credbroker/isolated", api_secret=SECRET)
    creds = daemon.fetch_isolated(profile("secret/credbroker/isolated"), env)
    assert creds is not None and creds["api_secret"].reveal_str() == SECRET
    assert creds.origin.version == version and creds.origin.request_id
    with pytest.raises(VaultNotFound, match="nothing found"):
        daemon.fetch_isolated(profile("secret/credbroker/absent-isolated"), env)
    with pytest.raises(VaultAuthError, match="rejected the token"):
        sources.fetch(profile("secret/credbroker/isolated"), env={**env, "VAULT_TOKEN": "hvs.wrong"}, isolate=True)


def test_an_isolated_fetch_leaves_no_copy_in_the_caller(openbao: OpenBao) -> None:
    need_root()
    value = "I" + secrets.token_hex(24)
    openbao.kv_put("credbroker/isolated-mem", api_secret=value)
    code = ("import gc, os, sys\n"
            "from broker import sources\n"
            "from broker.config import Profile\n"
            "p = Profile(name='d', source='vault', env={'S': 'api_secret'},"
            " options={'path': 'secret/credbroker/isolated-mem'})\n"
            "creds = sources.fetch(p, env=dict(os.environ), isolate=True)\n"
            "assert len(creds['api_secret']) == 49\n"
            "creds.wipe(); del creds; gc.collect()\n"
            "print('done', flush=True); sys.stdin.read()\n")
    caller = subprocess.Popen([sys.executable, "-c", code], env={**openbao.env(), "CREDBROKER_DAEMON": "0"},
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        assert caller.stdout is not None
        assert caller.stdout.readline().strip() == "done", caller.communicate()
        counts, read = count_in_memory(caller.pid, [value.encode()])
        assert read > 1_000_000
        assert counts[value.encode()] == 0, "the caller kept a copy of the fetched secret"
    finally:
        caller.communicate("")


def test_the_daemon_reads_the_callers_vault_table(running: tuple[Path, dict[str, str]], openbao: OpenBao) -> None:
    """[vault] travels beside the caller's environment to the daemon, not as invented variables."""
    from broker.errors import VaultUnreachable
    from broker.vault.origins import SettingsEnv, VaultTable

    _, env = running
    openbao.kv_put("credbroker/daemon-table", api_secret=SECRET)
    environ = {k: v for k, v in env.items() if k not in ("VAULT_ADDR", "BAO_ADDR")}
    good = SettingsEnv(environ, VaultTable(values={"addr": openbao.addr}, file="/etc/cb.toml"))
    creds = daemon.fetch(profile("secret/credbroker/daemon-table"), good)
    assert creds is not None and creds["api_secret"].reveal_str() == SECRET
    bad = SettingsEnv(environ, VaultTable(values={"addr": "http://127.0.0.1:9", "timeout": "2"}, file="/etc/cb.toml"))
    with pytest.raises(VaultUnreachable, match=r"\[vault\] addr in /etc/cb.toml"):
        daemon.fetch(profile("secret/credbroker/daemon-table"), bad)
