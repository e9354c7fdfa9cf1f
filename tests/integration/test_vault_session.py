"""The Vault session's rules against loopback servers that misbehave on purpose.

- redirects: nothing (header or body) reaches an origin the user did not configure;
- deadlines: a server that drips one byte every 1.5 s cannot hold ``credbroker run``;
- server text: an error that echoes the token or the AppRole ids is printed and recorded scrubbed.

The real-OpenBao side of the same session is in tests/integration/test_vault_tls.py and test_source_vault.py.
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from broker import sources
from broker.config import Profile
from broker.errors import VaultBadResponse, VaultUnreachable
from broker.vault.session import server_text

from tests.conftest import REPO, credbroker_bin

KV_BODY = b'{"request_id": "r-1", "data": {"data": {"api_key": "x", "api_secret": "y"}, "metadata": {"version": 1}}}'
LOGIN_BODY = b'{"auth": {"client_token": "hvs.issued-by-login", "lease_duration": 60, "renewable": true}}'


def profile() -> Profile:
    return Profile(name="p", source="vault", env={"A": "api_key", "B": "api_secret"},
                   options={"path": "secret/credbroker/x"})


class Handler(http.server.BaseHTTPRequestHandler):
    """Records every request; answers as ``mode`` says (set on a subclass per server)."""

    records: ClassVar[list[dict[str, Any]]]
    location: ClassVar[str] = ""  # redirect everything there (+ the path) when set
    status: ClassVar[int] = 307
    stop: ClassVar[threading.Event]

    def _body(self) -> bytes:
        size = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(size) if size else b""

    def _record(self) -> bytes:
        body = self._body()
        type(self).records.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                   "body": body.decode("utf-8", "replace")})
        return body

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def answer(self, body: bytes) -> None:
        if type(self).location and not self.path.startswith("/moved"):
            self.send_response(type(self).status)
            self.send_header("Location", type(self).location + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.command == "POST":
            self._send(200, LOGIN_BODY)
        else:
            self._send(200, KV_BODY)

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        self.answer(self._record())

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        self.answer(self._record())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Any]:
    """serve(HandlerSubclass) -> (base url, the class): loopback servers stopped at teardown."""
    servers: list[http.server.ThreadingHTTPServer] = []
    stop = threading.Event()

    def start(base: type[Handler], **attrs: Any) -> tuple[str, type[Handler]]:
        cls = type("H", (base,), {"records": [], "stop": stop, **attrs})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), cls)
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_port}", cls

    yield start
    stop.set()
    for s in servers:
        s.shutdown()
        s.server_close()


def broker_env(addr: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(PYTHONPATH=str(REPO), VAULT_ADDR=addr, CREDBROKER_DAEMON="0",
               CREDBROKER_AUDIT_LOG=str(tmp_path / "audit.log"))
    env.update(extra)
    return env


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    # Generous: the point is that it ends at all, not how fast.
    return subprocess.run([credbroker_bin(), *args], env=env, capture_output=True, text=True, timeout=90)


RUN = ["run", "--vault-path", "secret/credbroker/x", "--env", "A=api_key", "--", "true"]


# -- redirects -------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_token_never_reaches_a_redirect_target(serve: Any, status: int, tmp_path: Path) -> None:
    target, seen_by_target = serve(Handler)
    origin, seen_by_origin = serve(Handler, location=target, status=status)
    token = "hvs.must-not-travel-" + secrets.token_hex(4)
    with pytest.raises(VaultBadResponse, match="not a configured address") as info:
        sources.fetch(profile(), env={"VAULT_ADDR": origin, "VAULT_TOKEN": token, "CREDBROKER_DAEMON": "0"})
    assert target.replace("http://", "") in str(info.value) and "[vault] addrs" in str(info.value)
    assert seen_by_origin.records and seen_by_origin.records[0]["headers"]["X-Vault-Token"] == token
    assert seen_by_target.records == []  # nothing at all was sent there
    res = run(broker_env(origin, tmp_path, VAULT_TOKEN=token), *RUN)
    assert res.returncode == 125 and res.stderr.count("\n") == 1, res.stderr
    assert seen_by_target.records == []


@pytest.mark.parametrize("status", [307, 308])
def test_approle_secret_id_never_follows_a_redirect_in_the_body(serve: Any, status: int, tmp_path: Path) -> None:
    target, seen_by_target = serve(Handler)
    origin, seen_by_origin = serve(Handler, location=target, status=status)
    role_id, secret_id = "role-" + secrets.token_hex(8), "sid-" + secrets.token_hex(8)
    env = broker_env(origin, tmp_path, VAULT_ROLE_ID=role_id, VAULT_SECRET_ID=secret_id)
    res = run(env, *RUN)
    assert res.returncode == 125 and res.stderr.count("\n") == 1, res.stderr
    assert "log in at auth/approle/login" in res.stderr and "not a configured address" in res.stderr
    assert secret_id in seen_by_origin.records[0]["body"]  # the configured address got the login...
    assert seen_by_target.records == []  # ...and the other origin got nothing: no header, no body
    assert secret_id not in res.stderr and role_id not in res.stderr


def test_a_redirect_inside_the_configured_cluster_is_followed(serve: Any, tmp_path: Path) -> None:
    standby_target, active = serve(Handler)
    standby, _ = serve(Handler, location=standby_target, status=307)
    # Same origin: always followed.
    same, same_rec = serve(Handler)
    same_rec.location = same + "/moved"
    creds = sources.fetch(profile(), env={"VAULT_ADDR": same, "VAULT_TOKEN": "t", "CREDBROKER_DAEMON": "0"})
    assert creds["api_key"].reveal_str() == "x"
    # Another origin: followed only when listed, from the environment or from [vault] addrs.
    creds = sources.fetch(profile(), env={"VAULT_ADDR": standby, "VAULT_TOKEN": "t", "CREDBROKER_DAEMON": "0",
                                          "CREDBROKER_VAULT_ADDRS": standby_target})
    assert creds["api_key"].reveal_str() == "x" and active.records
    cfg = tmp_path / "cfg" / "credbroker.toml"
    cfg.parent.mkdir()
    cfg.write_text(f'[vault]\naddr = "{standby}"\naddrs = ["{standby_target}"]\n')
    env = broker_env(standby, tmp_path, VAULT_TOKEN="t", CREDBROKER_CONFIG=str(cfg))
    del env["VAULT_ADDR"]
    res = run(env, *RUN)
    assert res.returncode == 0, res.stderr
    bad = tmp_path / "cfg" / "bad.toml"
    bad.write_text('[vault]\naddrs = "not-a-list"\n')
    res = run({**env, "CREDBROKER_CONFIG": str(bad)}, *RUN)
    assert res.returncode == 125 and "vault.addrs" in res.stderr


# -- total deadline --------------------------------------------------------------------------------
class Dripper(Handler):
    """Answers one byte every 1.5 s, forever: every socket read succeeds, the answer never ends."""

    phase: ClassVar[str] = "headers"

    def drip(self) -> None:
        try:
            if type(self).phase == "body":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.wfile.flush()
            else:
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                self.wfile.flush()
            while not type(self).stop.wait(1.5):
                self.wfile.write(b" " if type(self).phase == "body" else b"X")
                self.wfile.flush()
        except OSError:
            pass  # the client hung up: what we wanted

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        self._record()
        self.drip()

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        self._record()
        self.drip()


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_a_dripping_vault_cannot_hold_run(serve: Any, tmp_path: Path, phase: str) -> None:
    addr, seen = serve(Dripper, phase=phase)
    res = run(broker_env(addr, tmp_path, VAULT_TOKEN="t", CREDBROKER_VAULT_TIMEOUT="2"), *RUN)
    assert res.returncode == 125, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "within 2 s (the total deadline of one request)" in lines[0]
    assert "CREDBROKER_VAULT_TIMEOUT" in lines[0]
    assert seen.records


def test_the_deadline_names_the_config_file_when_it_came_from_there(serve: Any, tmp_path: Path) -> None:
    addr, _ = serve(Dripper)
    cfg = tmp_path / "cfg" / "credbroker.toml"
    cfg.parent.mkdir()
    cfg.write_text("[vault]\ntimeout = 2\n")
    res = run(broker_env(addr, tmp_path, VAULT_ROLE_ID="r", VAULT_SECRET_ID="s", CREDBROKER_CONFIG=str(cfg)), *RUN)
    assert res.returncode == 125 and res.stderr.count("\n") == 1, res.stderr
    assert "total deadline" in res.stderr and f"[vault] timeout in {cfg}" in res.stderr


def test_the_deadline_also_bounds_the_library(serve: Any) -> None:
    addr, _ = serve(Dripper)
    with pytest.raises(VaultUnreachable, match="total deadline"):
        sources.fetch(profile(), env={"VAULT_ADDR": addr, "VAULT_TOKEN": "t", "CREDBROKER_VAULT_TIMEOUT": "1",
                                      "CREDBROKER_DAEMON": "0"})


# -- server text -----------------------------------------------------------------------------------
class Echo(Handler):
    """A proxy gone wrong: its error repeats the request's token and body back."""

    def answer(self, body: bytes) -> None:
        token = self.headers.get("X-Vault-Token") or ""
        said = f"bad request from {token} (prefix {token[:12]}) body={body.decode('utf-8', 'replace')}"
        self._send(type(self).status, json.dumps({"errors": [said, "x" * 3000]}).encode())


@pytest.mark.parametrize("status", [400, 401, 500, 502])
def test_server_text_is_scrubbed_before_it_is_printed_or_recorded(serve: Any, tmp_path: Path, status: int) -> None:
    addr, seen = serve(Echo, status=status)
    token = "hvs.echoed-" + secrets.token_hex(10)
    for debug in ([], ["--debug"]):
        res = run(broker_env(addr, tmp_path, VAULT_TOKEN=token), *debug, *RUN)
        assert res.returncode == 125
        assert token not in res.stderr and token[:12] not in res.stderr, res.stderr
        if not debug:
            assert res.stderr.count("\n") == 1 and len(res.stderr) < 800, res.stderr
    assert seen.records and seen.records[0]["headers"]["X-Vault-Token"] == token
    log = (tmp_path / "audit.log").read_text()
    assert "refused" in log and token not in log and token[:12] not in log
    if status in (400, 500):  # these print the server's words: scrubbed, not dropped
        assert "[redacted]" in log


def test_approle_ids_echoed_by_the_server_are_scrubbed(serve: Any, tmp_path: Path) -> None:
    addr, _ = serve(Echo, status=400)
    role_id, secret_id = "role-" + secrets.token_hex(8), "sid-" + secrets.token_hex(8)
    res = run(broker_env(addr, tmp_path, VAULT_ROLE_ID=role_id, VAULT_SECRET_ID=secret_id), *RUN)
    assert res.returncode == 125 and "AppRole login" in res.stderr and "[redacted]" in res.stderr
    log = (tmp_path / "audit.log").read_text()
    for value in (role_id, secret_id):
        assert value not in res.stderr and value not in log


def test_server_text_function() -> None:
    token = "hvs.ABCDEFGHIJKLMNOP"
    text = f"line one\nhas {token} and\x00 {token[:10]} and {token[-9:]}" + "y" * 1000
    out = server_text(text, [token, None, b"", "tiny"])
    assert "\n" not in out and "\x00" not in out and len(out) <= 203
    assert token not in out and token[:10] not in out and token[-9:] not in out
    assert out.startswith("line one has [redacted] and [redacted] and [redacted]")
    assert server_text("say tiny", ["tiny"]) == "say [redacted]"
    # A huge answer made of the token (cut anywhere) shows no piece of it, and costs a bounded scan.
    for extra in range(len(token)):
        out = server_text(token * 10000 + token[:extra], [token])
        assert not any(token[i:i + 4] in out for i in range(len(token) - 3)), out
    assert server_text("plain", []) == "plain"


def test_nothing_listens_after_the_deadline(serve: Any) -> None:
    """The deadline closes the connection: the dripping server sees the client hang up."""
    addr, seen = serve(Dripper)
    port = int(addr.rsplit(":", 1)[1])
    with pytest.raises(VaultUnreachable):
        sources.fetch(profile(), env={"VAULT_ADDR": addr, "VAULT_TOKEN": "t", "CREDBROKER_VAULT_TIMEOUT": "1",
                                      "CREDBROKER_DAEMON": "0"})
    # A fresh connection still works: the server is fine, only the stuck request was cut.
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        pass
    assert len(seen.records) == 1


def test_errors_name_where_the_address_came_from(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        addr = f"http://127.0.0.1:{s.getsockname()[1]}"
    cfg = tmp_path / "cfg" / "credbroker.toml"
    cfg.parent.mkdir()
    cfg.write_text(f'[vault]\naddr = "{addr}"\n')
    env = broker_env(addr, tmp_path, VAULT_TOKEN="t", CREDBROKER_CONFIG=str(cfg))
    res = run(env, *RUN)  # VAULT_ADDR set: it wins over the file, and the error names it
    assert res.returncode == 125 and "fix VAULT_ADDR" in res.stderr, res.stderr
    del env["VAULT_ADDR"]
    res = run(env, *RUN)
    assert res.returncode == 125 and f"fix [vault] addr in {cfg}" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1


def test_token_check_answers_by_the_failure_type(openbao: Any) -> None:
    """Real OpenBao: a valid token is valid, a revoked one is not; a bug of ours is raised, never "valid"."""
    from broker.vault.token import token_check

    token = openbao.client().auth.token.create(policies=["default"], ttl="10m")["auth"]["client_token"]
    client = openbao.client(token=token)
    assert token_check(client)() is True
    openbao.client().auth.token.revoke(token)
    assert token_check(client)() is False

    class Broken:
        """A client whose lookup hits a bug (a TypeError), not Vault."""

        class auth:  # noqa: N801 - hvac's attribute names
            class token:  # noqa: N801
                @staticmethod
                def lookup_self() -> None:
                    raise TypeError("a bug, not an answer from Vault")

    with pytest.raises(TypeError):
        token_check(Broken())()


@pytest.mark.parametrize("bad", ["http://[::1", "http://127.0.0.1:99999", "http://127.0.0.1:port"])
@pytest.mark.parametrize("var", ["VAULT_ADDR", "CREDBROKER_VAULT_ADDRS"])
def test_an_unreadable_url_is_one_line_naming_its_variable(tmp_path: Path, var: str, bad: str) -> None:
    """urlsplit raises ValueError for an unclosed IPv6 bracket, and .port for a port that is no port:
    these were internal errors (found with odd values in every variable credbroker reads)."""
    env = broker_env("http://127.0.0.1:1", tmp_path, VAULT_TOKEN="t", **{var: bad})
    res = run(env, *RUN)
    assert res.returncode == 125 and res.stderr.count("\n") == 1, res.stderr
    assert "internal error" not in res.stderr and repr(bad) in res.stderr and f"fix {var}" in res.stderr
