"""The Vault source against a real OpenBao server: happy paths and every failure."""

from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import sources
from broker.config import Profile
from broker.errors import (
    ConfigError,
    VaultAuthError,
    VaultBadResponse,
    VaultNotFound,
    VaultPermissionDenied,
    VaultSealed,
    VaultUnreachable,
)
from broker.sources.vault import current_version
from broker.vault.settings import VaultSettings

from tests.conftest import OpenBao

pytestmark = pytest.mark.vault

SECRET = "vault-secret-7f3a9c1e5b"


def profile(path: str, **options: object) -> Profile:
    return Profile(
        name="um-futures",
        source="vault",
        env={"BINANCE_API_KEY": "api_key", "BINANCE_API_SECRET": "api_secret"},
        options={"path": path, **options},
    )


def test_latest_and_pinned_versions(openbao: OpenBao) -> None:
    v1 = openbao.kv_put("credbroker/versions", api_key="AK1", api_secret=SECRET + "-1")
    v2 = openbao.kv_put("credbroker/versions", api_key="AK2", api_secret=SECRET + "-2")
    latest = sources.fetch(profile("secret/credbroker/versions"), env=openbao.env())
    assert latest["api_secret"].reveal_str() == SECRET + "-2"
    assert latest.origin.version == v2
    assert latest.origin.source == "vault" and latest.origin.path == "secret/credbroker/versions"
    pinned = sources.fetch(profile("secret/credbroker/versions", version=v1), env=openbao.env())
    assert pinned["api_secret"].reveal_str() == SECRET + "-1"
    assert pinned.origin.version == v1
    assert SECRET not in repr(pinned)
    assert current_version(profile("secret/credbroker/versions"), VaultSettings.from_env(openbao.env())) == v2


def test_explicit_mount(openbao: OpenBao) -> None:
    openbao.kv_put("credbroker/mounted", api_key="AK", api_secret=SECRET)
    creds = sources.fetch(profile("credbroker/mounted", mount="secret"), env=openbao.env())
    assert creds["api_key"].reveal_str() == "AK"


def test_bao_variables_are_accepted(openbao: OpenBao) -> None:
    openbao.kv_put("credbroker/bao", api_key="AK", api_secret=SECRET)
    env = {"BAO_ADDR": openbao.addr, "BAO_TOKEN": openbao.token, "HOME": "/nonexistent"}
    assert sources.fetch(profile("secret/credbroker/bao"), env=env)["api_secret"].reveal_str() == SECRET


def test_token_from_vault_token_file(openbao: OpenBao, tmp_path: Path) -> None:
    openbao.kv_put("credbroker/tokenfile", api_key="AK", api_secret=SECRET)
    home = tmp_path / "h"
    home.mkdir()
    (home / ".vault-token").write_text(openbao.token + "\n")
    env = {"VAULT_ADDR": openbao.addr, "HOME": str(home)}
    assert sources.fetch(profile("secret/credbroker/tokenfile"), env=env)["api_key"].reveal_str() == "AK"


def test_transit_encrypted_field_is_decrypted_in_memory(openbao: OpenBao) -> None:
    openbao.cli("write", "-f", "transit/keys/credbroker-um-futures")
    client = openbao.client()
    ct = client.secrets.transit.encrypt_data(
        name="credbroker-um-futures", plaintext=base64.b64encode(SECRET.encode()).decode()
    )["data"]["ciphertext"]
    assert ct.startswith("vault:v1:")
    openbao.kv_put("credbroker/transit", api_key="AK", api_secret=ct)
    creds = sources.fetch(
        profile("secret/credbroker/transit", transit_key="credbroker-um-futures"), env=openbao.env()
    )
    assert creds["api_secret"].reveal_str() == SECRET
    with pytest.raises(ConfigError, match="transit ciphertext.*no transit_key"):
        sources.fetch(profile("secret/credbroker/transit"), env=openbao.env())


def _approle(openbao: OpenBao, name: str, policy_path: str) -> tuple[str, str]:
    openbao.cli("auth", "enable", "approle", check=False)
    openbao.cli("policy", "write", name, "-", input=f'path "{policy_path}" {{ capabilities = ["read"] }}\n')
    openbao.cli("write", f"auth/approle/role/{name}", f"token_policies={name}", "secret_id_ttl=10m")
    role_id = openbao.cli("read", "-field=role_id", f"auth/approle/role/{name}/role-id").strip()
    secret_id = openbao.cli("write", "-f", "-field=secret_id", f"auth/approle/role/{name}/secret-id").strip()
    return role_id, secret_id


def test_approle_login_from_environment_and_files(openbao: OpenBao, tmp_path: Path) -> None:
    openbao.kv_put("credbroker/approle", api_key="AK", api_secret=SECRET)
    role_id, secret_id = _approle(openbao, "credbroker-approle-test", "secret/data/credbroker/approle")
    env = {"VAULT_ADDR": openbao.addr, "VAULT_ROLE_ID": role_id, "VAULT_SECRET_ID": secret_id}
    assert sources.fetch(profile("secret/credbroker/approle"), env=env)["api_secret"].reveal_str() == SECRET

    rid, sid = tmp_path / "role_id", tmp_path / "secret_id"
    rid.write_text(role_id)
    sid.write_text(secret_id)
    sid.chmod(0o644)
    files = {"VAULT_ADDR": openbao.addr, "CREDBROKER_ROLE_ID_FILE": str(rid), "CREDBROKER_SECRET_ID_FILE": str(sid)}
    with pytest.raises(VaultAuthError, match="accessible by other users"):
        sources.fetch(profile("secret/credbroker/approle"), env=files)
    sid.chmod(0o600)
    assert sources.fetch(profile("secret/credbroker/approle"), env=files)["api_key"].reveal_str() == "AK"

    bad = {**env, "VAULT_SECRET_ID": "00000000-0000-0000-0000-000000000000"}
    with pytest.raises(VaultAuthError, match="AppRole login") as info:
        sources.fetch(profile("secret/credbroker/approle"), env=bad)
    assert secret_id not in str(info.value)


def test_wrong_token(openbao: OpenBao) -> None:
    openbao.kv_put("credbroker/wrong", api_key="AK", api_secret=SECRET)
    with pytest.raises(VaultAuthError, match="rejected the token from VAULT_TOKEN") as info:
        sources.fetch(profile("secret/credbroker/wrong"), env=openbao.env(token="hvs.not-a-token"))
    assert "hvs.not-a-token" not in str(info.value)


def test_no_token_at_all(openbao: OpenBao) -> None:
    with pytest.raises(VaultAuthError, match="no Vault token"):
        sources.fetch(profile("secret/credbroker/x"), env={"VAULT_ADDR": openbao.addr, "HOME": "/nonexistent"})


def test_missing_path_version_and_field(openbao: OpenBao) -> None:
    with pytest.raises(VaultNotFound, match="nothing found at secret/data/credbroker/absent"):
        sources.fetch(profile("secret/credbroker/absent"), env=openbao.env())
    v = openbao.kv_put("credbroker/fields", api_key="AK")
    with pytest.raises(VaultNotFound, match=r"field 'api_secret' not found .*fields: api_key"):
        sources.fetch(profile("secret/credbroker/fields"), env=openbao.env())
    with pytest.raises(VaultNotFound, match="version 99"):
        sources.fetch(profile("secret/credbroker/fields", version=99), env=openbao.env())
    openbao.cli("kv", "delete", "-mount=secret", "credbroker/fields")
    with pytest.raises(VaultNotFound):
        sources.fetch(profile("secret/credbroker/fields", version=v), env=openbao.env())


def test_policy_that_denies_the_read(openbao: OpenBao) -> None:
    openbao.kv_put("credbroker/denied", api_key="AK", api_secret=SECRET)
    openbao.cli("policy", "write", "credbroker-other", "-",
                input='path "secret/data/credbroker/other" { capabilities = ["read"] }\n')
    token = openbao.cli("token", "create", "-policy=credbroker-other", "-field=token").strip()
    with pytest.raises(VaultPermissionDenied, match="permission denied.*secret/data/credbroker/denied"):
        sources.fetch(profile("secret/credbroker/denied"), env=openbao.env(token=token))


def test_sealed_server(fresh_openbao: OpenBao) -> None:
    fresh_openbao.kv_put("credbroker/sealed", api_key="AK", api_secret=SECRET)
    fresh_openbao.cli("operator", "seal")
    with pytest.raises(VaultSealed, match="sealed") as info:
        sources.fetch(profile("secret/credbroker/sealed"), env=fresh_openbao.env())
    assert "unseal" in str(info.value)


def test_stopped_server(fresh_openbao: OpenBao) -> None:
    env = fresh_openbao.env()
    fresh_openbao.stop()
    with pytest.raises(VaultUnreachable, match="cannot reach Vault") as info:
        sources.fetch(profile("secret/credbroker/x"), env=env)
    assert "VAULT_ADDR" in str(info.value)


def test_timeout_on_a_server_that_never_answers() -> None:
    import socket

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)  # accepts the connection, never answers
        env = {"VAULT_ADDR": f"http://127.0.0.1:{srv.getsockname()[1]}", "VAULT_TOKEN": "t",
               "CREDBROKER_VAULT_TIMEOUT": "0.5"}
        with pytest.raises(VaultUnreachable, match="did not answer within 0.5 s"):
            sources.fetch(profile("secret/credbroker/x"), env=env)


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []
    location = ""

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        type(self).seen.append(dict(self.headers))
        if type(self).location:
            self.send_response(307)
            self.send_header("Location", type(self).location + self.path)
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            body = b'{"data": {"data": {"api_key": "x", "api_secret": "y"}, "metadata": {"version": 1}}}'
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def redirect_pair() -> Iterator[tuple[str, type[_Recorder], type[_Recorder]]]:
    class Target(_Recorder):
        seen: list[dict[str, str]] = []
        location = ""

    class Redirector(_Recorder):
        seen: list[dict[str, str]] = []

    target = http.server.HTTPServer(("127.0.0.1", 0), Target)
    Redirector.location = f"http://127.0.0.1:{target.server_port}"
    redirector = http.server.HTTPServer(("127.0.0.1", 0), Redirector)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (target, redirector)]
    for t in threads:
        t.start()
    try:
        yield f"http://127.0.0.1:{redirector.server_port}", Redirector, Target
    finally:
        for s in (target, redirector):
            s.shutdown()
            s.server_close()


def test_token_never_follows_a_redirect_to_another_origin(redirect_pair) -> None:  # type: ignore[no-untyped-def]
    addr, redirector, target = redirect_pair
    env = {"VAULT_ADDR": addr, "VAULT_TOKEN": "hvs.must-not-travel"}
    # A redirect to an origin the user did not configure is refused outright (it used to be followed
    # without the token, but with an AppRole login's body): see tests/integration/test_vault_session.py.
    with pytest.raises(VaultBadResponse, match="not a configured address"):
        sources.fetch(profile("secret/credbroker/x"), env=env)
    assert redirector.seen[0]["X-Vault-Token"] == "hvs.must-not-travel"
    assert not target.seen, "the redirect was refused"
    assert all("X-Vault-Token" not in h for h in target.seen)


_JUNK = {
    "html": (200, b"<html>hello</html>", VaultBadResponse),
    "empty": (200, b"", VaultBadResponse),
    "wrong-shape": (200, b'{"data": "x"}', VaultBadResponse),
    "a-list": (200, b"[1, 2, 3]", VaultBadResponse),
    "deleted": (200, b'{"data": {"data": null, "metadata": {"version": 3}}}', VaultNotFound),
    "not-a-string": (200, b'{"data": {"data": {"api_key": "k", "api_secret": {"n": 1}}, "metadata": {}}}',
                     VaultBadResponse),
    "500": (500, b'{"errors": ["internal error"]}', VaultBadResponse),
    "502": (502, b"bad gateway", VaultBadResponse),
    "429": (429, b'{"errors": ["rate limited"]}', VaultUnreachable),
    "huge-error": (400, b'{"errors": ["' + b"x" * 5000 + b'"]}', VaultBadResponse),
}


@pytest.mark.parametrize("kind", sorted(_JUNK))
def test_junk_answers_are_one_line_errors(kind: str) -> None:
    status, body, expected = _JUNK[kind]

    class Junk(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Junk)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {"VAULT_ADDR": f"http://127.0.0.1:{server.server_port}", "VAULT_TOKEN": "t",
               "CREDBROKER_VAULT_TIMEOUT": "5"}
        with pytest.raises(expected) as info:
            sources.fetch(profile("secret/credbroker/x"), env=env)
        message = str(info.value)
        assert "\n" not in message and "fix:" in message
        assert len(message) < 600  # a huge error body is cut, not echoed whole
    finally:
        server.shutdown()
        server.server_close()
