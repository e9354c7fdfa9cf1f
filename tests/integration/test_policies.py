"""vault-policies/*.hcl against a real OpenBao: every allow and every deny case.

Each case is a real request made with a token that holds only the policy under
test (plus Vault's built-in ``default``): an allowed case must succeed, a
denied case must get HTTP 403. The per-bot policy is the template rendered the
way scripts/setup-vault renders it (``__BOT__`` -> the bot's name).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.signing.transit import policy_hcl, policy_name

from tests.conftest import OpenBao
from tests.helpers.vaultadmin import POLICIES, anchor_policy_hcl, bot_policy_hcl, start_openbao_with_config

pytestmark = pytest.mark.vault

KV = "secret"
SIGN_POLICY = "credbroker-sign-transit-credbroker-alpha"
ANCHOR_POLICY = "credbroker-audit-anchor-host-a"
ANCHOR_A = "credbroker-audit/host-a/0123456789abcdef-0123456789ab"
ANCHOR_B = "credbroker-audit/host-b/0123456789abcdef-0123456789ab"
B64 = base64.b64encode(b"GET /api/v3/account?timestamp=1").decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    tmp = tmp_path_factory.mktemp("openbao-policies")
    hcl = f'audit "file" "credbroker-file" {{\n  options {{\n    file_path = "{tmp / "audit.log"}"\n  }}\n}}\n'
    srv = start_openbao_with_config(tmp, hcl)
    try:
        root = srv.client()
        root.sys.enable_secrets_engine("transit", path="transit")
        root.sys.create_or_update_policy("credbroker-admin", (POLICIES / "credbroker-admin.hcl").read_text())
        root.sys.create_or_update_policy("credbroker-auditor", (POLICIES / "credbroker-auditor.hcl").read_text())
        for bot in ("alpha", "beta", "enc"):
            root.sys.create_or_update_policy(f"credbroker-bot-{bot}", bot_policy_hcl(bot))
        root.sys.create_or_update_policy(ANCHOR_POLICY, anchor_policy_hcl("host-a"))
        # The signer policy broker.signing.transit gives a bot's child token.
        root.sys.create_or_update_policy(SIGN_POLICY, policy_hcl("transit", "credbroker-alpha"))
        for name, kind in (("credbroker-alpha", "ed25519"), ("credbroker-beta", "ed25519"),
                           ("credbroker-enc", "aes256-gcm96"), ("other-key", "aes256-gcm96")):
            root.secrets.transit.create_key(name=name, key_type=kind)
        for path in ("credbroker/alpha", "credbroker/alpha2", "credbroker/alpha/sub", "credbroker/beta",
                     "credbroker/enc", "other/thing"):
            srv.kv_put(path, api_key="AK-" + path, api_secret="S-" + path)
        srv.kv_put("credbroker/alpha", api_key="AK-alpha", api_secret="S-alpha-v2")  # version 2
        for path in (ANCHOR_A, ANCHOR_B):
            for seq in ("1", "2"):
                srv.kv_put(path, seq=seq, hash="0" * 64)
        yield srv
    finally:
        srv.stop()


def _token(server: OpenBao, policy: str) -> Any:
    token = server.client().auth.token.create(policies=policy.split("+"), ttl="30m")["auth"]["client_token"]
    return server.client(token=token)


def _ciphertext(server: OpenBao, key: str) -> str:
    resp = server.client().secrets.transit.encrypt_data(name=key, plaintext=B64)
    return str(resp["data"]["ciphertext"])


Case = Callable[[Any, OpenBao], object]


def _read(path: str, version: int | None = None) -> Case:
    return lambda c, s: c.secrets.kv.v2.read_secret_version(path=path, version=version, mount_point=KV,
                                                             raise_on_deleted_version=True)


def _put(path: str) -> Case:
    return lambda c, s: c.secrets.kv.v2.create_or_update_secret(path=path, secret={"api_secret": "x"},
                                                                 mount_point=KV)


def _patch(path: str) -> Case:
    return lambda c, s: c.secrets.kv.v2.patch(path=path, secret={"api_secret": "p"}, mount_point=KV)


def _http_patch(path: str) -> Case:
    """A real HTTP PATCH (what `vault kv patch` sends); hvac's patch() is read + write."""
    return lambda c, s: c.adapter.request(
        "patch", f"/v1/{KV}/data/{path}", json={"data": {"api_secret": "hp"}},
        headers={"Content-Type": "application/merge-patch+json"})


def _meta(path: str) -> Case:
    return lambda c, s: c.secrets.kv.v2.read_secret_metadata(path=path, mount_point=KV)


def _meta_write(path: str) -> Case:
    return lambda c, s: c.secrets.kv.v2.update_metadata(path=path, custom_metadata={"rotated_by": "t"},
                                                         mount_point=KV)


def _list(path: str) -> Case:
    return lambda c, s: c.secrets.kv.v2.list_secrets(path=path, mount_point=KV)


def _sign(key: str) -> Case:
    return lambda c, s: c.secrets.transit.sign_data(name=key, hash_input=B64)


def _decrypt(key: str) -> Case:
    return lambda c, s: c.secrets.transit.decrypt_data(name=key, ciphertext=_ciphertext(s, key))


def _encrypt(key: str) -> Case:
    return lambda c, s: c.secrets.transit.encrypt_data(name=key, plaintext=B64)


def _raw(method: str, url: str, **json: Any) -> Case:
    def call(c: Any, s: OpenBao) -> object:
        return getattr(c.adapter, method)(url, json=json or None)

    return call


# (case name, request): the same table drives the allow and the deny checks.
BOT_ALLOWED: dict[str, Case] = {
    "read own secret": _read("credbroker/alpha"),
    "read own secret, pinned version": _read("credbroker/alpha", 1),
    "read own metadata (current_version)": _meta("credbroker/alpha"),
    "sign with own transit key": _sign("credbroker-alpha"),
    "read own transit key (public key)": lambda c, s: c.secrets.transit.read_key(name="credbroker-alpha"),
    "look up own token": lambda c, s: c.auth.token.lookup_self(),
    "renew own token": lambda c, s: c.auth.token.renew_self(),
}
BOT_DENIED: dict[str, Case] = {
    "write own secret": _put("credbroker/alpha"),
    "patch own secret": _patch("credbroker/alpha"),
    "HTTP PATCH own secret": _http_patch("credbroker/alpha"),
    "delete own secret": lambda c, s: c.secrets.kv.v2.delete_latest_version_of_secret(path="credbroker/alpha",
                                                                                       mount_point=KV),
    "destroy own versions": lambda c, s: c.secrets.kv.v2.destroy_secret_versions(path="credbroker/alpha",
                                                                                 versions=[1], mount_point=KV),
    "write own metadata": _meta_write("credbroker/alpha"),
    "read another bot's secret": _read("credbroker/beta"),
    "read a bot whose name extends its own": _read("credbroker/alpha2"),
    "read below its own path": _read("credbroker/alpha/sub"),
    "read another bot's metadata": _meta("credbroker/beta"),
    "read outside credbroker": _read("other/thing"),
    "list the bots": _list("credbroker"),
    "list its own path": _list("credbroker/alpha"),
    "sign with another bot's key": _sign("credbroker-beta"),
    "decrypt with another bot's key": _decrypt("credbroker-enc"),
    "encrypt with own key": _encrypt("credbroker-alpha"),
    "rotate own transit key": lambda c, s: c.secrets.transit.rotate_key(name="credbroker-alpha"),
    "export own transit key": lambda c, s: c.secrets.transit.export_key(name="credbroker-alpha",
                                                                        key_type="signing-key"),
    "list transit keys": lambda c, s: c.secrets.transit.list_keys(),
    "read policies": lambda c, s: c.sys.read_acl_policy("credbroker-bot-alpha"),
    "create a token": lambda c, s: c.auth.token.create(policies=["credbroker-bot-alpha"]),
    "audit-hash": _raw("post", "/v1/sys/audit-hash/credbroker-file", input="x"),
    "list mounts": lambda c, s: c.sys.list_mounted_secrets_engines(),
    "write an audit anchor": _put(ANCHOR_A),
    "read an audit anchor": _read(ANCHOR_A),
}
# A bot whose key lives as transit ciphertext: decrypt with its own key only.
ENC_ALLOWED: dict[str, Case] = {"decrypt with own key": _decrypt("credbroker-enc")}
ENC_DENIED: dict[str, Case] = {"decrypt with a non-credbroker key": _decrypt("other-key")}

ADMIN_ALLOWED: dict[str, Case] = {
    "create a bot's secret": _put("credbroker/admin-new"),
    "write a new version": _put("credbroker/beta"),
    "patch a version": _patch("credbroker/beta"),
    "HTTP PATCH a version": _http_patch("credbroker/beta"),
    "read back a value": _read("credbroker/beta"),
    "read metadata": _meta("credbroker/beta"),
    "record who/when (custom metadata)": _meta_write("credbroker/beta"),
    "list the bots": _list("credbroker"),
    "soft-delete a version": lambda c, s: c.secrets.kv.v2.delete_secret_versions(path="credbroker/alpha2",
                                                                                 versions=[1], mount_point=KV),
    "undelete a version": lambda c, s: c.secrets.kv.v2.undelete_secret_versions(path="credbroker/alpha2",
                                                                                versions=[1], mount_point=KV),
    "destroy a leaked version": lambda c, s: c.secrets.kv.v2.destroy_secret_versions(
        path="credbroker/alpha2", versions=[1], mount_point=KV),
    "create a transit key": lambda c, s: c.secrets.transit.create_key(name="credbroker-admin-new",
                                                                      key_type="ed25519"),
    "read a transit key": lambda c, s: c.secrets.transit.read_key(name="credbroker-beta"),
    "rotate a transit key": lambda c, s: c.secrets.transit.rotate_key(name="credbroker-beta"),
    "configure a transit key": lambda c, s: c.secrets.transit.update_key_configuration(
        name="credbroker-beta", min_decryption_version=1),
    "list transit keys": lambda c, s: c.secrets.transit.list_keys(),
    "encrypt for a bot": _encrypt("credbroker-enc"),
}
ADMIN_DENIED: dict[str, Case] = {
    "read outside credbroker": _read("other/thing"),
    "write outside credbroker": _put("other/admin"),
    "list the whole KV mount": _list(""),
    "decrypt a bot's ciphertext": _decrypt("credbroker-enc"),
    "sign as a bot": _sign("credbroker-alpha"),
    "delete a transit key": lambda c, s: c.secrets.transit.delete_key(name="credbroker-beta"),
    "create a key outside credbroker-*": lambda c, s: c.secrets.transit.create_key(name="admin-other"),
    "export a transit key": lambda c, s: c.secrets.transit.export_key(name="credbroker-beta",
                                                                      key_type="signing-key"),
    "back up a transit key": lambda c, s: c.secrets.transit.backup_key(name="credbroker-beta"),
    "write a policy": lambda c, s: c.sys.create_or_update_policy("credbroker-bot-alpha", 'path "*" {}'),
    "create an AppRole": _raw("post", "/v1/auth/approle/role/credbroker-evil", token_policies="root"),
    "enable an audit device": _raw("put", "/v1/sys/audit/evil", type="file"),
    "list audit devices": lambda c, s: c.sys.list_enabled_audit_devices(),
    "mount an engine": lambda c, s: c.sys.enable_secrets_engine("kv", path="evil"),
    "create a token": lambda c, s: c.auth.token.create(policies=["credbroker-admin"]),
}

AUDITOR_ALLOWED: dict[str, Case] = {
    "read metadata (who/when)": _meta("credbroker/alpha"),
    "list the bots": _list("credbroker"),
    "audit-hash a value": _raw("post", "/v1/sys/audit-hash/credbroker-file", input="accessor"),
    "list audit devices": lambda c, s: c.sys.list_enabled_audit_devices(),
    "read a transit key's description": lambda c, s: c.secrets.transit.read_key(name="credbroker-alpha"),
    "list transit keys": lambda c, s: c.secrets.transit.list_keys(),
    "read any host's audit anchor": _read(ANCHOR_B),
    "read an anchor's versions": _meta(ANCHOR_A),
    "list the hosts' anchors": _list("credbroker-audit"),
}
AUDITOR_DENIED: dict[str, Case] = {
    "write an audit anchor": _put(ANCHOR_A),
    "read a secret value": _read("credbroker/alpha"),
    "read an old secret value": _read("credbroker/alpha", 1),
    "write a secret": _put("credbroker/alpha"),
    "HTTP PATCH a secret": _http_patch("credbroker/alpha"),
    "write metadata": _meta_write("credbroker/alpha"),
    "delete metadata": lambda c, s: c.secrets.kv.v2.delete_metadata_and_all_versions(path="credbroker/alpha",
                                                                                     mount_point=KV),
    "read metadata outside credbroker": _meta("other/thing"),
    "decrypt": _decrypt("credbroker-enc"),
    "sign": _sign("credbroker-alpha"),
    "encrypt": _encrypt("credbroker-enc"),
    "rotate a transit key": lambda c, s: c.secrets.transit.rotate_key(name="credbroker-alpha"),
    "disable the audit device": _raw("delete", "/v1/sys/audit/credbroker-file"),
    "write a policy": lambda c, s: c.sys.create_or_update_policy("x", 'path "*" {}'),
    "read policies": lambda c, s: c.sys.read_acl_policy("credbroker-admin"),
}

def _child(policies: list[str], **extra: Any) -> Case:
    return lambda c, s: c.auth.token.create(policies=policies, ttl="10m", **extra)


def _as_child(request_fn: Case) -> Case:
    """Run ``request_fn`` with the signing child token the bot's token creates."""
    def call(c: Any, s: OpenBao) -> object:
        child = c.auth.token.create(policies=[SIGN_POLICY], ttl="10m")["auth"]["client_token"]
        return request_fn(s.client(token=child), s)

    return call


# A bot enrolled with `setup-vault --transit-key`: its AppRole token holds its
# bot policy and the signer policy, and hands the bot process a child token
# that may only sign (broker.signing.transit.child_token).
SIGNER_ALLOWED: dict[str, Case] = {
    "create the signing child token": _child([SIGN_POLICY]),
    "create it with the string form of policies": _raw("post", "/v1/auth/token/create", policies=SIGN_POLICY),
    "child signs with the bot's key": _as_child(_sign("credbroker-alpha")),
    "child reads the key's public half": _as_child(lambda c, s: c.secrets.transit.read_key(name="credbroker-alpha")),
}
SIGNER_DENIED: dict[str, Case] = {
    "create a child with its own bot policy": _child(["credbroker-bot-alpha"]),
    "create a child with both policies": _child([SIGN_POLICY, "credbroker-bot-alpha"]),
    "create a child without naming policies": lambda c, s: c.auth.token.create(ttl="10m"),
    "create an orphan token": _child([SIGN_POLICY], no_parent=True),
    "create a periodic token": _child([SIGN_POLICY], period="24h"),
    "create a token with a chosen id": _child([SIGN_POLICY], id="chosen-token-id"),
    "create a token through a token role": lambda c, s: c.auth.token.create(policies=[SIGN_POLICY],
                                                                            role_name="any"),
    "child reads the bot's secret": _as_child(_read("credbroker/alpha")),
    "child creates tokens": _as_child(_child([SIGN_POLICY])),
    "child signs with another key": _as_child(_sign("credbroker-beta")),
    "child writes an audit anchor": _as_child(_put(ANCHOR_A)),
}

# The broker on host-a (setup-vault --anchor-host host-a): append-only anchors of its own host.
ANCHOR_ALLOWED: dict[str, Case] = {
    "write a new anchor version": _put(ANCHOR_A),
    "start a new chain's anchor": _put("credbroker-audit/host-a/fedcba9876543210-ba9876543210"),
    "read an anchor version": _read(ANCHOR_A, 1),
    "read the versions (metadata)": _meta(ANCHOR_A),
}
ANCHOR_DENIED: dict[str, Case] = {
    "delete the latest anchor": lambda c, s: c.secrets.kv.v2.delete_latest_version_of_secret(
        path=ANCHOR_A, mount_point=KV),
    "soft-delete anchor versions": lambda c, s: c.secrets.kv.v2.delete_secret_versions(
        path=ANCHOR_A, versions=[1], mount_point=KV),
    "destroy anchor versions": lambda c, s: c.secrets.kv.v2.destroy_secret_versions(
        path=ANCHOR_A, versions=[1], mount_point=KV),
    "lower max_versions": lambda c, s: c.secrets.kv.v2.update_metadata(path=ANCHOR_A, max_versions=1,
                                                                        mount_point=KV),
    "delete the metadata and every version": lambda c, s: c.secrets.kv.v2.delete_metadata_and_all_versions(
        path=ANCHOR_A, mount_point=KV),
    "write another host's anchor": _put(ANCHOR_B),
    "read another host's anchor": _read(ANCHOR_B),
    "write the host folder itself": _put("credbroker-audit/host-a"),
    "list the anchors": _list("credbroker-audit/host-a"),
    "read a bot's secret": _read("credbroker/alpha"),
    "patch an anchor (HTTP PATCH)": _http_patch(ANCHOR_A),
}

MATRIX = [
    ("credbroker-bot-alpha", BOT_ALLOWED, BOT_DENIED),
    ("credbroker-bot-enc", ENC_ALLOWED, ENC_DENIED),
    (f"credbroker-bot-alpha+{SIGN_POLICY}", SIGNER_ALLOWED, SIGNER_DENIED),
    ("credbroker-admin", ADMIN_ALLOWED, ADMIN_DENIED),
    ("credbroker-auditor", AUDITOR_ALLOWED, AUDITOR_DENIED),
    (ANCHOR_POLICY, ANCHOR_ALLOWED, ANCHOR_DENIED),
]
ALLOW_CASES = [pytest.param(p, name, fn, id=f"{p}: may {name}") for p, allowed, _ in MATRIX
               for name, fn in allowed.items()]
DENY_CASES = [pytest.param(p, name, fn, id=f"{p}: may not {name}") for p, _, denied in MATRIX
              for name, fn in denied.items()]


@pytest.mark.parametrize(("policy", "name", "request_fn"), ALLOW_CASES)
def test_allowed(server: OpenBao, policy: str, name: str, request_fn: Case) -> None:
    resp = request_fn(_token(server, policy), server)
    assert resp is not None


@pytest.mark.parametrize(("policy", "name", "request_fn"), DENY_CASES)
def test_denied(server: OpenBao, policy: str, name: str, request_fn: Case) -> None:
    import hvac.exceptions

    with pytest.raises(hvac.exceptions.Forbidden):
        request_fn(_token(server, policy), server)


def test_bot_reads_exactly_its_own_value(server: OpenBao) -> None:
    got = _read("credbroker/alpha")(_token(server, "credbroker-bot-alpha"), server)
    assert isinstance(got, dict)
    assert got["data"]["data"] == {"api_key": "AK-alpha", "api_secret": "S-alpha-v2"}
    assert got["data"]["metadata"]["version"] == 2


def test_auditor_sees_the_rotation_record_but_no_value(server: OpenBao) -> None:
    server.client().secrets.kv.v2.update_metadata(path="credbroker/enc", mount_point=KV,
                                                  custom_metadata={"rotated_by": "alice"})
    meta = _meta("credbroker/enc")(_token(server, "credbroker-auditor"), server)
    assert isinstance(meta, dict)
    assert meta["data"]["custom_metadata"] == {"rotated_by": "alice"}
    assert "S-credbroker/enc" not in repr(meta)


def test_bot_policy_template_only_takes_safe_names() -> None:
    # setup-vault validates names with this same rule before rendering.
    import re

    lib = (Path(__file__).resolve().parent.parent.parent / "scripts" / "lib-vault.sh").read_text()
    rule = re.search(r"CB_BOT_RE='([^']+)'", lib)
    assert rule is not None
    pattern = re.compile(rule.group(1))
    for good in ("alpha", "um-futures", "bot_2"):
        assert pattern.match(good)
    for bad in ("a/b", "*", "a+", "../x", "", "a b", 'a"b', "-x"):
        assert not pattern.match(bad)
    text = (POLICIES / "credbroker-bot.hcl").read_text()
    paths = re.findall(r'^path "([^"]+)"', text, re.M)
    # Exact paths only (no glob, no "+" segment wildcard) and never "list".
    assert paths and all("*" not in p and "+" not in p for p in paths)
    assert sum("__BOT__" in p for p in paths) == 5
    rules = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert '"list"' not in rules


def test_signer_policy_name_matches_the_signing_module() -> None:
    # The bot template allows exactly the policy broker.signing.transit asks for.
    assert policy_name("transit", "credbroker-alpha") == SIGN_POLICY
    assert SIGN_POLICY.replace("alpha", "__BOT__") in (POLICIES / "credbroker-bot.hcl").read_text()
