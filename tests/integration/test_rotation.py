"""Rotation while a bot runs, restart policy and token lifecycle, against real OpenBao."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from broker.config import Profile
from broker.errors import ConfigError
from broker.rotation import RotationPolicy, policy_from
from broker.vault.settings import VaultSettings
from broker.watch import Watcher

from tests.conftest import OpenBao, credbroker_bin, start_audited_openbao
from tests.helpers.rotation import audit_events, rotate, wait_for, wait_for_more_checks, wait_until

pytestmark = pytest.mark.vault

# The bot writes "<pid> <secret>" to its log at start, reacts to HUP, and exits 0 on TERM.
BOT = r"""
import os, signal, sys, time
log = sys.argv[1]
def line(text):
    with open(log, "a") as f:
        f.write(text + "\n")
line(f"start {os.getpid()} {os.environ['BINANCE_API_SECRET']}")
signal.signal(signal.SIGHUP, lambda s, f: line(f"hup {os.getpid()}"))
signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))
end = time.time() + 600  # a bound for a bot the test forgot, never reached by a passing test
while time.time() < end:
    time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OpenBao, Path]]:
    """A server with a file audit device: each version check a broker makes is a line in its log.

    "No second restart" is only shown once the broker has checked again; those
    checks are counted there instead of guessed from the time that passed.
    """
    server = start_audited_openbao(tmp_path_factory.mktemp("openbao-rotation"))
    try:
        yield server, server.extra["audit_log"]
    finally:
        server.stop()


def record_time(record: dict[str, object]) -> datetime:
    return datetime.strptime(str(record["ts"]), "%Y-%m-%dT%H:%M:%S.%fZ")


def start_bot(server: OpenBao, tmp: Path, bot_name: str, *flags: str, env: dict[str, str] | None = None
              ) -> tuple[subprocess.Popen[str], Path, Path]:
    bot = tmp / "bot.py"
    bot.write_text(BOT)
    out = tmp / f"{bot_name}.log"
    audit = tmp / f"{bot_name}-audit.log"
    run_env = {**(env or server.env()), "CREDBROKER_AUDIT_LOG": str(audit), "HOME": str(tmp)}
    proc = subprocess.Popen(
        [credbroker_bin(), "run", "--vault-path", f"secret/credbroker/{bot_name}", "--env", "BINANCE_API_SECRET=api_secret",
         *flags, "--", sys.executable, str(bot), str(out)],
        env=run_env, stderr=subprocess.PIPE, text=True,
    )
    return proc, out, audit


def stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def test_restart_on_rotation_with_the_rotation_script(audited: tuple[OpenBao, Path], tmp_path: Path) -> None:
    server, vault_log = audited
    v1 = server.kv_put("credbroker/rot-restart", api_key="AK", api_secret="secret-v1")
    proc, out, audit = start_bot(server, tmp_path, "rot-restart", "--on-rotate", "restart",
                                 "--rotate-interval", "1s", "--grace", "3s")
    try:
        first = wait_for(out, r"start (\d+) secret-v1")
        v2 = rotate(server, "rot-restart", "secret-v2")
        assert v2 == v1 + 1
        second = wait_for(out, r"start (\d+) secret-v2")
        assert first.group(1) != second.group(1)
        wait_for_more_checks(vault_log, "rot-restart", 3)  # more checks: still one restart for this version
        assert out.read_text().count("start ") == 2
    finally:
        assert stop(proc) == 0
    events = audit_events(audit)
    # The restart came from the rotation, not from the bot ending on its own: the broker
    # stopped the first bot for it (a wall-clock bound would only measure the machine's load).
    exits = [e["data"] for e in events if e["event"] == "child_exited"]
    assert exits[0]["reason"] == "rotation" and exits[0]["pid"] == int(first.group(1))  # type: ignore[index]
    detected = [e for e in events if e["event"] == "rotation_detected"]
    assert len(detected) == 1
    assert detected[0]["data"]["old_version"] == v1 and detected[0]["data"]["new_version"] == v2
    injected = [e["data"]["version"] for e in events if e["event"] == "secret_injected"]
    assert injected == [v1, v2]
    assert "secret-v2" not in audit.read_text()


def test_signal_on_rotation(audited: tuple[OpenBao, Path], tmp_path: Path) -> None:
    server, vault_log = audited
    server.kv_put("credbroker/rot-signal", api_secret="s1")
    proc, out, audit = start_bot(server, tmp_path, "rot-signal", "--on-rotate", "signal:HUP",
                                 "--rotate-interval", "1s")
    try:
        pid = wait_for(out, r"start (\d+) s1").group(1)
        rotate(server, "rot-signal", "s2")
        wait_for(out, rf"hup {pid}")
        wait_for_more_checks(vault_log, "rot-signal", 3)  # more checks: still one signal for this version
        assert out.read_text().count("hup ") == 1 and out.read_text().count("start ") == 1
    finally:
        assert stop(proc) == 0
    assert [e["data"]["action"] for e in audit_events(audit) if e["event"] == "rotation_detected"] == ["signal"]


def test_ignore_on_rotation(audited: tuple[OpenBao, Path], tmp_path: Path) -> None:
    server, vault_log = audited
    server.kv_put("credbroker/rot-ignore", api_secret="s1")
    proc, out, audit = start_bot(server, tmp_path, "rot-ignore", "--on-rotate", "ignore", "--rotate-interval", "1s")
    try:
        wait_for(out, r"start \d+ s1")
        rotate(server, "rot-ignore", "s2")
        wait_for(audit, "rotation_detected")
        wait_for_more_checks(vault_log, "rot-ignore", 2)  # checked again after ignoring it: still no restart
        assert out.read_text().count("start ") == 1 and "hup" not in out.read_text()
    finally:
        assert stop(proc) == 0
    detected = [e for e in audit_events(audit) if e["event"] == "rotation_detected"]
    assert len(detected) == 1 and detected[0]["data"]["action"] == "ignore"


def test_vault_stopped_mid_run_leaves_the_bot_running(fresh_openbao: OpenBao, tmp_path: Path) -> None:
    fresh_openbao.kv_put("credbroker/rot-down", api_secret="s1")
    proc, out, audit = start_bot(fresh_openbao, tmp_path, "rot-down", "--on-rotate", "restart",
                                 "--rotate-interval", "1s")
    try:
        pid = int(wait_for(out, r"start (\d+) s1").group(1))
        fresh_openbao.stop()
        # Two failed checks (the second after a backoff): the bot was left alone through both.
        wait_until("two failed version checks", lambda: sum(
            e["event"] == "rotation_check_failed" for e in audit_events(audit)) >= 2)
        os.kill(pid, 0)  # still alive
        assert proc.poll() is None
        assert out.read_text().count("start ") == 1
    finally:
        assert stop(proc) == 0
    assert any(e["event"] == "rotation_check_failed" for e in audit_events(audit))


def test_token_that_expires_is_replaced_by_an_approle_login(openbao: OpenBao, tmp_path: Path) -> None:
    openbao.kv_put("credbroker/rot-token", api_secret="t1")
    openbao.cli("auth", "enable", "approle", check=False)
    openbao.cli("policy", "write", "rot-token", "-", input=(
        'path "secret/data/credbroker/rot-token" { capabilities = ["read"] }\n'
        'path "secret/metadata/credbroker/rot-token" { capabilities = ["read"] }\n'))
    openbao.cli("write", "auth/approle/role/rot-token", "token_policies=rot-token", "token_ttl=4s",
                "token_max_ttl=4s")
    role_id = openbao.cli("read", "-field=role_id", "auth/approle/role/rot-token/role-id").strip()
    secret_id = openbao.cli("write", "-f", "-field=secret_id", "auth/approle/role/rot-token/secret-id").strip()
    env = {k: v for k, v in openbao.env().items() if k != "VAULT_TOKEN"}
    env.update(VAULT_ROLE_ID=role_id, VAULT_SECRET_ID=secret_id)
    proc, out, audit = start_bot(openbao, tmp_path, "rot-token", "--on-rotate", "restart",
                                 "--rotate-interval", "1s", env=env)
    try:
        wait_for(out, r"start \d+ t1")
        # The broker logs in again at each check (its tokens live 4 s, under the renewal margin):
        # wait for one 6 s after the bot started, by the broker's own clock, when the first
        # token is past its max TTL.
        def relogged_late() -> bool:
            events = audit_events(audit)
            injected = [e for e in events if e["event"] == "secret_injected"]
            if not injected:
                return False
            started = record_time(injected[0])
            return any(e["event"] == "token_relogin" and (record_time(e) - started).total_seconds() >= 6
                       for e in events)

        wait_until("an AppRole login after the first token expired", relogged_late)
        openbao.kv_put("credbroker/rot-token", api_secret="t2")
        wait_for(out, r"start \d+ t2")
    finally:
        assert stop(proc) == 0
    events = [e["event"] for e in audit_events(audit)]
    assert "token_relogin" in events
    assert "rotation_detected" in events
    assert secret_id not in audit.read_text()


def test_crash_looping_bot_restarts_from_memory_with_backoff(openbao: OpenBao, tmp_path: Path) -> None:
    openbao.kv_put("credbroker/crashy", api_secret="c1")
    counter = tmp_path / "count"
    script = (f"import os, sys; p = {str(counter)!r}; n = int(open(p).read()) if os.path.exists(p) else 0\n"
              "open(p, 'w').write(str(n + 1))\n"
              "assert os.environ['S'] == 'c1'\n"
              "sys.exit(3 if n < 2 else 0)\n")
    audit = tmp_path / "audit.log"
    res = subprocess.run(
        [credbroker_bin(), "run", "--vault-path", "secret/credbroker/crashy", "--env", "S=api_secret",
         "--restart", "on-failure", "--", sys.executable, "-c", script],
        env={**openbao.env(), "CREDBROKER_AUDIT_LOG": str(audit)}, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert counter.read_text() == "3"
    events = audit_events(audit)
    assert [e["event"] for e in events].count("secret_fetched") == 1  # Vault read once
    delays = [e["data"]["delay_s"] for e in events if e["event"] == "child_restarting"]
    assert delays == [1.0, 2.0]
    assert "restarting in 1 s" in res.stderr


def test_policy_parsing_and_refusals() -> None:
    assert RotationPolicy.parse("signal:hup").signum == signal.SIGHUP
    assert RotationPolicy.parse("signal:SIGUSR1").signum == signal.SIGUSR1
    assert RotationPolicy.parse("restart", interval=5).interval == 5
    with pytest.raises(ConfigError, match="unknown signal"):
        RotationPolicy.parse("signal:NOPE")
    with pytest.raises(ConfigError, match="not a rotation policy"):
        RotationPolicy.parse("reboot")
    vault = Profile(name="p", source="vault", env={"S": "s"}, options={"path": "secret/p"})
    assert policy_from(vault, None, None, None) is None
    p = policy_from(vault, "restart", "30s", "5s")
    assert p is not None and (p.interval, p.grace) == (30, 5)
    with pytest.raises(ConfigError, match="pins version"):
        policy_from(vault._replace(options={"path": "secret/p", "version": 2}), "restart", None, None)
    with pytest.raises(ConfigError, match="watched in Vault"):
        policy_from(Profile(name="k", source="keyring", env={"S": "s"}), "restart", None, None)
    with pytest.raises(ConfigError, match="--rotate-interval: "):
        policy_from(vault, "restart", "0s", None)
    with pytest.raises(ConfigError, match=r"--rotate-interval: invalid duration '30x'.*30s, 5m"):
        policy_from(vault, "restart", "30x", None)
    # A mistake in the config's [rotation] table names the file and the key, never a flag not typed.
    filed = vault._replace(origin="/etc/cb.toml")
    for table, needle in [({"on_rotate": "reboot"}, "/etc/cb.toml: profiles.p.rotation.on_rotate: 'reboot'"),
                          ({"on_rotate": "signal:NOPE"}, "/etc/cb.toml: profiles.p.rotation.on_rotate"),
                          ({"on_rotate": "restart", "interval": "30x"}, "/etc/cb.toml: profiles.p.rotation.interval"),
                          ({"on_rotate": "restart", "grace": 0}, "/etc/cb.toml: profiles.p.rotation.grace")]:
        with pytest.raises(ConfigError) as err:
            policy_from(filed._replace(sections={"rotation": table}), None, None, None)
        assert needle in str(err.value) and "--on-rotate" not in str(err.value)
    configured = vault._replace(sections={"rotation": {"on_rotate": "signal:USR2", "interval": "2m"}})
    cp = policy_from(configured, None, None, None)
    assert cp is not None and cp.signum == signal.SIGUSR2 and cp.interval == 120


def test_watcher_backs_off_while_vault_is_down() -> None:
    now = [0.0]
    events: list[tuple[str, dict[str, object]]] = []
    profile = Profile(name="p", source="vault", env={"S": "s"}, options={"path": "secret/p"})
    w = Watcher(profile, VaultSettings.from_env({"VAULT_ADDR": "http://127.0.0.1:9", "VAULT_TOKEN": "t",
                                                 "CREDBROKER_VAULT_TIMEOUT": "1"}),
                lambda e, f: events.append((e, f)), version=1, interval=10, clock=lambda: now[0])
    assert w.poll() is None
    retry = [f["retry_in_s"] for e, f in events if e == "rotation_check_failed"]
    assert retry == [10]
    assert not w.due()
    now[0] = 10.5
    assert w.due()
    w.poll()
    assert [f["retry_in_s"] for e, f in events if e == "rotation_check_failed"] == [10, 20]


AGENT_BOT = r"""
import os, signal, sys, time
from broker import get_signer
out = sys.argv[1]
signer = get_signer()
def line(text):
    with open(out, "a") as f:
        f.write(text + "\n")
line(f"{os.getpid()} {signer.sign('a=1')}")
signal.signal(signal.SIGHUP, lambda s, f: line(f"{os.getpid()} {signer.sign('a=1')}"))
signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))
end = time.time() + 600  # a bound for a bot the test forgot, never reached by a passing test
while time.time() < end:
    time.sleep(0.05)
"""


def _hmac(secret: str) -> str:
    import hashlib
    import hmac

    return hmac.new(secret.encode(), b"a=1", hashlib.sha256).hexdigest()


def test_agent_mode_swaps_the_key_in_place_when_only_the_secret_rotates(openbao: OpenBao, tmp_path: Path) -> None:
    openbao.kv_put("credbroker/rot-agent", api_key="AK-same", api_secret="agent-secret-1")
    bot = tmp_path / "agent_bot.py"
    bot.write_text(AGENT_BOT)
    out = tmp_path / "sigs"
    audit = tmp_path / "audit.log"
    env = {**openbao.env(), "CREDBROKER_AUDIT_LOG": str(audit)}
    proc = subprocess.Popen(
        [credbroker_bin(), "run", "--agent", "--no-preflight", "--vault-path", "secret/credbroker/rot-agent",
         "--env", "BINANCE_API_KEY=api_key", "--env", "BINANCE_API_SECRET=api_secret",
         "--on-rotate", "signal:HUP", "--rotate-interval", "1s", "--", sys.executable, str(bot), str(out)],
        env=env, stderr=subprocess.PIPE, text=True)
    try:
        first = wait_for(out, rf"(\d+) {_hmac('agent-secret-1')}")
        openbao.kv_put("credbroker/rot-agent", api_key="AK-same", api_secret="agent-secret-2")
        second = wait_for(out, rf"(\d+) {_hmac('agent-secret-2')}")
        assert first.group(1) == second.group(1)  # same bot process: no restart
        # The API key changes too: the bot must restart to see it.
        openbao.kv_put("credbroker/rot-agent", api_key="AK-new", api_secret="agent-secret-3")
        third = wait_for(out, rf"(\d+) {_hmac('agent-secret-3')}")
        assert third.group(1) != first.group(1)
    finally:
        assert stop(proc) == 0
    actions = [e["data"]["action"] for e in audit_events(audit) if e["event"] == "rotation_detected"]
    assert actions == ["agent_key_swapped", "restart"]
    assert "agent-secret" not in audit.read_text()


# -- a Vault that stops answering never delays the supervisor ----------------------------------

USR1_BOT = r"""
import os, signal, sys, time
log = sys.argv[1]
def line(text):
    with open(log, "a") as f:
        f.write(text + "\n")
signal.signal(signal.SIGUSR1, lambda s, f: line("usr1"))
signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))
line(f"start {os.getpid()}")
end = time.time() + 120
while time.time() < end:
    time.sleep(0.05)
"""


class StallingProxy:
    """A loopback TCP proxy to OpenBao that, once ``stall`` is set, takes requests and never answers.

    Existing keep-alive connections stall too (their answers are held back),
    so whichever connection the broker's next check uses hangs. ``stalled``
    is set when a request arrived in stalled mode; ``closed`` when the broker
    gave up on such a connection.
    """

    def __init__(self, upstream_port: int, drip: bool = False) -> None:
        import socket
        import threading

        self.drip = drip  # answer a byte at a time, forever, instead of staying silent
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stall = threading.Event()
        self.stalled = threading.Event()
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: "socket.socket") -> None:  # noqa: F821
        import select
        import socket
        import threading

        upstream = socket.create_connection(self.upstream)
        stalled_here = False
        try:
            while True:
                ready, _, _ = select.select([client, upstream], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        if sock is client and stalled_here:
                            self.closed.set()
                        return
                    if self.stall.is_set():
                        if sock is client and not stalled_here:
                            stalled_here = True
                            self.stalled.set()
                            if self.drip:
                                threading.Thread(target=self._drip, args=(client,), daemon=True).start()
                        continue  # swallow: the request is never answered (or only dripped at)
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            if stalled_here:
                self.closed.set()
        finally:
            client.close()
            upstream.close()

    def _drip(self, client: "socket.socket") -> None:  # noqa: F821
        import time as _time

        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
        try:
            for i in range(100_000):
                client.send(head[i:i + 1] if i < len(head) else b" ")
                _time.sleep(0.5)
        except OSError:
            return

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("drip", [False, True], ids=["silent", "dripping"])
def test_signals_reach_the_bot_while_a_rotation_check_hangs(openbao: OpenBao, tmp_path: Path, drip: bool) -> None:
    openbao.kv_put("credbroker/rot-hang", api_secret="h1")
    proxy = StallingProxy(openbao.port, drip=drip)
    env = {**openbao.env(), "VAULT_ADDR": f"http://127.0.0.1:{proxy.port}", "CREDBROKER_VAULT_TIMEOUT": "120",
           "CREDBROKER_AUDIT_LOG": str(tmp_path / "audit.log"), "HOME": str(tmp_path)}
    bot = tmp_path / "bot.py"
    bot.write_text(USR1_BOT)
    out = tmp_path / "bot.log"
    proc = subprocess.Popen(
        [credbroker_bin(), "run", "--vault-path", "secret/credbroker/rot-hang", "--env", "BINANCE_API_SECRET=api_secret",
         "--on-rotate", "signal:HUP", "--rotate-interval", "0.2", "--", sys.executable, str(bot), str(out)],
        env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(out, r"start \d+")
        proxy.stall.set()
        assert proxy.stalled.wait(30), "the broker never checked Vault again"
        for n in range(1, 4):  # while the check is stuck, every signal still goes through
            proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 20
            while out.read_text().count("usr1") < n and time.monotonic() < deadline:
                time.sleep(0.01)
            assert out.read_text().count("usr1") == n, out.read_text()
        assert not proxy.closed.is_set(), "the hung check ended before the signals were forwarded"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proxy.close()


def test_a_failed_token_lookup_is_said_once_and_retried(openbao: OpenBao) -> None:
    """Real OpenBao: a token that may not look itself up keeps the watcher going, warned once, never silently."""
    import secrets as _secrets

    path = "rot-lookup-" + _secrets.token_hex(4)
    openbao.kv_put(path, api_secret="v1")
    policy = f'path "secret/metadata/{path}" {{ capabilities = ["read"] }}\n'
    openbao.cli("policy", "write", "no-lookup-" + path, "-", input=policy)
    token = openbao.client().auth.token.create(policies=["no-lookup-" + path], no_default_policy=True,
                                               ttl="1h")["auth"]["client_token"]
    events: list[tuple[str, dict[str, object]]] = []
    now = [0.0]
    profile = Profile(name="p", source="vault", env={"S": "api_secret"}, options={"path": f"secret/{path}"})
    w = Watcher(profile, VaultSettings.from_env({"VAULT_ADDR": openbao.addr, "VAULT_TOKEN": token}),
                lambda e, f: events.append((e, f)),
                version=1, interval=10, clock=lambda: now[0])
    assert w.poll() is None  # the version is still read
    now[0] = 11.0
    openbao.kv_put(path, api_secret="v2")
    assert w.poll() == 2
    failed = [f for e, f in events if e == "token_lookup_failed"]
    assert len(failed) == 1 and "permission denied" in str(failed[0]["reason"]).lower()
    assert not [e for e, _ in events if e == "rotation_check_failed"]
    w.close()


class _Client:
    """An hvac-shaped client (pure logic: only its identity matters)."""

    def __init__(self) -> None:
        self.adapter = self
        self.auth = self
        self.token = self

    def lookup_self(self) -> dict[str, object]:
        return {"data": {"ttl": 3600, "renewable": True}}

    def close(self) -> None:
        pass


def test_rotation_drops_its_client_by_error_type_not_by_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.errors import VaultAuthError, VaultPermissionDenied
    from broker.sources import vault as vault_source

    profile = Profile(name="p", source="vault", env={"S": "s"}, options={"path": "secret/p"})
    w = Watcher(profile, VaultSettings.from_env({"VAULT_ADDR": "http://127.0.0.1:9", "VAULT_TOKEN": "t"}),
                lambda e, f: None,
                version=1, interval=10, clock=lambda: 0.0)
    client = _Client()
    w._client = client
    monkeypatch.setattr(vault_source, "current_version", lambda *a, **k: (_ for _ in ()).throw(
        VaultPermissionDenied("permission denied: the token may not read secret/metadata/p", "grant it")))
    w.poll()
    assert w._client is client  # the message says "token", but a denial is not a bad token
    w._next_try = 0.0
    monkeypatch.setattr(vault_source, "current_version", lambda *a, **k: (_ for _ in ()).throw(
        VaultAuthError("Vault at x rejected the credentials", "run `vault login`")))
    w.poll()
    assert w._client is None  # a rejected token: log in afresh at the next check
