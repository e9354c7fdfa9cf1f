"""`credbroker import` and broker.migrate: strict parsing, store, verify, shred.

Parsing and shredding are pure logic (no server); storing and verifying run
against the real OpenBao and the real Secret Service.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from broker import migrate
from broker.cli import cli
from broker.config import Profile
from broker.errors import BrokerError, ConfigError
from broker.secret import Secret

from tests.conftest import OpenBao, SecretService

SECRET = "Zq8vN2kP0sRr4tYw7xB1cD3eF5gH6jK9mL2nP4qR6sT8uV0wX2yZ4aB6cD8eF0gH"
API_KEY = "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A"

CREDS_YML = f"""---
# Binance USD-M futures, production
api_key: {API_KEY}
api_secret: '{SECRET}'   # the HMAC secret
"""

DOT_ENV = f"""# bot settings
export BINANCE_API_KEY={API_KEY}
BINANCE_API_SECRET="{SECRET}"
"""


def _values(fields: dict[str, Secret]) -> dict[str, str]:
    return {k: v.reveal_str() for k, v in fields.items()}


# -- YAML subset -------------------------------------------------------------------------
def test_yaml_flat_map_with_quotes_and_comments() -> None:
    text = (
        "\ufeff---\n"
        "# comment\n"
        "plain: abc123 # trailing comment\n"
        "hash_inside: abc#def\n"
        "single: 'it''s: a # value'\n"
        'double: "q\\"uote\\\\back/slash"\n'
        "url: https://api.binance.com\n"
        "dotted.key-name_2: x\n"
        "num_quoted: '12345'\r\n"
        "\n"
        "   # indented comment\n"
    )
    assert _values(migrate.parse_yaml(text)) == {
        "plain": "abc123",
        "hash_inside": "abc#def",
        "single": "it's: a # value",
        "double": 'q"uote\\back/slash',
        "url": "https://api.binance.com",
        "dotted.key-name_2": "x",
        "num_quoted": "12345",
    }


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("a: x\nb:\n  c: SECRETVALUE\n", 2, "b has no value"),
        ("a: x\n  b: SECRETVALUE\n", 2, "indented line"),
        ("- SECRETVALUE\n", 1, "list"),
        ("{a: SECRETVALUE}\n", 1, "flow-style"),
        ("a: [SECRETVALUE]\n", 1, "YAML syntax"),
        ("a: &anchor SECRETVALUE\n", 1, "YAML syntax"),
        ("a: *alias\n", 1, "YAML syntax"),
        ("a: !!str SECRETVALUE\n", 1, "YAML syntax"),
        ("a: |\n  SECRETVALUE\n", 1, "YAML syntax"),
        ("a: >\n  SECRETVALUE\n", 1, "YAML syntax"),
        ("a: 'SECRETVALUE\n", 1, "does not end on this line"),
        ('a: "SECRETVALUE\\n"\n', 1, "escape sequence"),
        ("a: 'SECRETVALUE' extra\n", 1, "unexpected text"),
        ("a: SECRET: VALUE\n", 1, "contains ': '"),
        ("a: ~\n", 1, "is null"),
        ("a: null\n", 1, "is null"),
        ("a: yes\n", 1, "number or boolean"),
        ("a: 0x1F\n", 1, "number or boolean"),
        ("a: 0123\n", 1, "number or boolean"),
        ("a: 1e3\n", 1, "number or boolean"),
        ("a: 1.5\n", 1, "number or boolean"),
        ("a: SECRETVALUE\na: other\n", 2, "appears twice (first on line 1)"),
        ("a: x\n---\nb: SECRETVALUE\n", 2, "second YAML document"),
        ("'a': SECRETVALUE\n", 1, "expected `key: value`"),
        ("a:SECRETVALUE\n", 1, "expected `key: value`"),
        ("a: SECRET\x0bVALUE\n", 1, "control character"),
        ("a: ''\n", 1, "empty value"),
        ("\ta: SECRETVALUE\n", 1, "indented line"),
    ],
)
def test_yaml_refuses_everything_else_naming_the_line_never_the_value(text: str, line: int, needle: str) -> None:
    with pytest.raises(migrate.PlaintextFormatError) as info:
        migrate.parse_yaml(text, "creds.yml")
    msg = str(info.value)
    assert msg.startswith(f"creds.yml: line {line}: ")
    assert needle in msg
    assert "SECRET" not in msg and "VALUE" not in msg
    assert "\n" not in msg


def test_yaml_empty_file_is_an_error() -> None:
    with pytest.raises(migrate.PlaintextFormatError, match="holds no `key: value` line"):
        migrate.parse_yaml("# nothing\n\n---\n", "creds.yml")


# -- .env subset -------------------------------------------------------------------------
def test_dotenv_lines() -> None:
    text = (
        "# comment\n"
        "export A=plain\n"
        "B = spaced # comment\n"
        "C='single $NOT \"expanded\" \\n'\n"
        'D="double \\"q\\" \\$HOME it\'s"\n'
        "E=abc#def\n"
        "F='x' # c\n"
    )
    assert _values(migrate.parse_dotenv(text)) == {
        "A": "plain",
        "B": "spaced",
        "C": 'single $NOT "expanded" \\n',
        "D": "double \"q\" $HOME it's",
        "E": "abc#def",
        "F": "x",
    }


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("A=x\nSECRETVALUE\n", 2, "expected KEY=value"),
        ("A=\n", 1, "empty value"),
        ("A=SECRET VALUE\n", 1, "spaces, quotes or backslashes"),
        ("A=SECRET\\VALUE\n", 1, "spaces, quotes or backslashes"),
        ("A=SECRET$VALUE\n", 1, "variable expansion"),
        ('A="SECRET${VALUE}"\n', 1, "variable expansion"),
        ("A='SECRETVALUE\nmore'\n", 1, "does not end on this line"),
        ('A="SECRET\\tVALUE"\n', 1, "escape sequence"),
        ("A=SECRETVALUE\nA=x\n", 2, "appears twice"),
        ("1A=SECRETVALUE\n", 1, "expected KEY=value"),
    ],
)
def test_dotenv_refuses_what_shells_and_libraries_read_differently(text: str, line: int, needle: str) -> None:
    with pytest.raises(migrate.PlaintextFormatError) as info:
        migrate.parse_dotenv(text, ".env")
    msg = str(info.value)
    assert msg.startswith(f".env: line {line}: ") and needle in msg
    assert "SECRET" not in msg and "VALUE" not in msg


def test_read_plaintext_detects_format_and_limits(tmp_path: Path) -> None:
    (tmp_path / "creds.yml").write_text(CREDS_YML)
    (tmp_path / "prod.env").write_text(DOT_ENV)
    (tmp_path / "keys.txt").write_text("a: b\n")
    assert migrate.read_plaintext(tmp_path / "creds.yml").kind == "yaml"
    plain = migrate.read_plaintext(tmp_path / "prod.env")
    assert plain.kind == "env" and list(plain.fields) == ["BINANCE_API_KEY", "BINANCE_API_SECRET"]
    assert SECRET not in repr(plain)
    with pytest.raises(ConfigError, match="pass --format"):
        migrate.read_plaintext(tmp_path / "keys.txt")
    assert migrate.read_plaintext(tmp_path / "keys.txt", "yaml").kind == "yaml"
    (tmp_path / "bin.yml").write_bytes(b"a: ok\nb: \xff\xfe\n")
    with pytest.raises(migrate.PlaintextFormatError, match="line 2: not UTF-8"):
        migrate.read_plaintext(tmp_path / "bin.yml")
    with pytest.raises(ConfigError, match="cannot read"):
        migrate.read_plaintext(tmp_path / "missing.yml")
    big = tmp_path / "big.yml"
    big.write_bytes(b"a: " + b"x" * migrate.MAX_BYTES + b"\n")
    with pytest.raises(migrate.PlaintextFormatError, match="too big"):
        migrate.read_plaintext(big)


# -- choosing fields -------------------------------------------------------------------------
def test_select_fields_by_profile_mapping_and_explicit_map(tmp_path: Path) -> None:
    (tmp_path / "x.env").write_text(DOT_ENV + "SYMBOL=BTCUSDT\n")
    plain = migrate.read_plaintext(tmp_path / "x.env")
    prof = Profile(name="um", source="vault", env={"BINANCE_API_KEY": "api_key", "BINANCE_API_SECRET": "api_secret"},
                   options={"path": "secret/x"})
    sel = migrate.select_fields(plain, None, prof)
    assert _values(dict(sel.fields)) == {"api_key": API_KEY, "api_secret": SECRET}
    assert sel.left_out == ("SYMBOL",)
    sel = migrate.select_fields(plain, {"BINANCE_API_SECRET": "secret"})
    assert list(sel.fields) == ["secret"] and sel.left_out == ("BINANCE_API_KEY", "SYMBOL")
    # Without a mapping: the canonical fields the README's profiles map, not the .env's names.
    assert list(migrate.select_fields(plain).fields) == ["api_key", "api_secret", "symbol"]
    with pytest.raises(ConfigError, match="has no key NOPE"):
        migrate.select_fields(plain, {"NOPE": "x"})
    other = Profile(name="o", source="vault", env={"OTHER_SECRET": "other"}, options={"path": "secret/x"})
    with pytest.raises(ConfigError, match="no value for field other of profile o"):
        migrate.select_fields(plain, None, other)


def test_verify_compares_every_field_and_never_shows_values() -> None:
    stored = migrate.Stored("vault", "secret/credbroker/a", ("api_secret",), 1)
    fields = {"api_secret": Secret(SECRET)}
    migrate._compare(stored, {"api_secret": SECRET}, fields, True)
    for data, needle in (({"api_secret": SECRET[:-1] + "X"}, "fields api_secret differ"),
                         ({}, "fields api_secret differ"),
                         ({"api_secret": SECRET, "extra": "x"}, "unexpected fields extra")):
        with pytest.raises(migrate.ImportVerifyError) as info:
            migrate._compare(stored, data, fields, True)
        assert needle in str(info.value) and SECRET not in str(info.value)
    with pytest.raises(migrate.ImportVerifyError, match="another version"):
        migrate._compare(stored, {"api_secret": SECRET}, fields, False)


# -- shredding ---------------------------------------------------------------------------
def test_shred_overwrites_before_unlinking(tmp_path: Path) -> None:
    f = tmp_path / "creds.yml"
    f.write_text(CREDS_YML)
    other = tmp_path / "hardlink.yml"
    os.link(f, other)
    res = migrate.shred(f)
    assert not f.exists()
    assert res.bytes_overwritten == len(CREDS_YML.encode()) and res.other_links == 1
    # The other name still points at the same inode: its data is gone too.
    assert other.read_bytes() == b""


def test_shred_refuses_symlinks_and_non_files(tmp_path: Path) -> None:
    target = tmp_path / "real.yml"
    target.write_text("a: b\n")
    link = tmp_path / "link.yml"
    link.symlink_to(target)
    with pytest.raises(migrate.ShredError, match="symbolic link"):
        migrate.shred(link)
    assert target.read_text() == "a: b\n"
    with pytest.raises(migrate.ShredError, match="not a regular file"):
        migrate.shred(tmp_path)


# -- the command against real OpenBao --------------------------------------------------------
def _vault_env(server: OpenBao, token: str | None = None) -> dict[str, str]:
    return {"VAULT_ADDR": server.addr, "VAULT_TOKEN": token or server.token}


def _invoke(args: list[str], env: dict[str, str] | None = None, input: str | None = None) -> Any:
    return CliRunner().invoke(cli, args, env=env, input=input, catch_exceptions=True)


def _read(server: OpenBao, path: str, version: int | None = None) -> dict[str, Any]:
    resp = server.client().secrets.kv.v2.read_secret_version(path=path, version=version, mount_point="secret",
                                                             raise_on_deleted_version=True)
    return dict(resp["data"])


@pytest.mark.vault
def test_import_creds_yml_into_vault_and_keep(openbao: OpenBao, tmp_path: Path) -> None:
    f = tmp_path / "creds.yml"
    f.write_text(CREDS_YML)
    res = _invoke(["import", str(f), "--vault-path", "secret/credbroker/imp1", "--json"], _vault_env(openbao))
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["target"] == "vault" and out["location"] == "secret/credbroker/imp1" and out["version"] == 1
    assert out["verified"] is True and out["deleted"] is False and out["fields"] == ["api_key", "api_secret"]
    assert _read(openbao, "credbroker/imp1")["data"] == {"api_key": API_KEY, "api_secret": SECRET}
    assert f.read_text() == CREDS_YML  # not a terminal and no --delete: kept
    assert "pass --delete" in res.stderr
    assert SECRET not in res.output and API_KEY not in res.output


@pytest.mark.vault
@pytest.mark.parametrize("transit_key", [None, "bot-key"])
def test_a_value_that_looks_like_transit_ciphertext_is_imported_and_read_back_as_stored(
        openbao: OpenBao, tmp_path: Path, transit_key: str | None) -> None:
    # The read-back compares what was written; it must not try to decrypt it (with no transit_key that
    # failed with "no transit_key is set"; with one, the plaintext would never match the file).
    ciphertext = "vault:v1:8SDd3WHDOjf7mq69CyCqYjBXAiQQAVZRkFM13ok481zoCmHnSeDX9vyf7w=="
    profile = '[profiles.tk]\nsource = "vault"\npath = "secret/credbroker/imp-transit"\n' \
              'env = { BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }\n'
    if transit_key:
        profile += f'transit_key = "{transit_key}"\n'
    (tmp_path / "credbroker.toml").write_text(profile)
    f = tmp_path / "creds.yml"
    f.write_text(f"api_key: {API_KEY}\napi_secret: '{ciphertext}'\n")
    res = _invoke(["import", str(f), "--profile", "tk", "--force", "--json"], _vault_env(openbao))
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["verified"] is True
    assert _read(openbao, "credbroker/imp-transit")["data"] == {"api_key": API_KEY, "api_secret": ciphertext}


@pytest.mark.vault
def test_import_dotenv_by_profile_and_delete(openbao: OpenBao, tmp_path: Path) -> None:
    (tmp_path / "credbroker.toml").write_text(
        '[profiles.um]\nsource = "vault"\npath = "secret/credbroker/imp2"\n'
        'env = { BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }\n'
    )
    f = tmp_path / ".env"
    f.write_text(DOT_ENV)
    res = _invoke(["import", str(f), "--profile", "um", "--delete"], _vault_env(openbao))
    assert res.exit_code == 0, res.output
    assert _read(openbao, "credbroker/imp2")["data"] == {"api_key": API_KEY, "api_secret": SECRET}
    assert not f.exists()
    assert "BINANCE_API_KEY->api_key" in res.stdout and "deleted" in res.stdout
    assert "copy-on-write" in res.stderr and "SSD" in res.stderr and "backups" in res.stderr


@pytest.mark.vault
def test_import_refuses_to_overwrite_unless_forced(openbao: OpenBao, tmp_path: Path) -> None:
    openbao.kv_put("credbroker/imp3", api_secret="old", note="kept?")
    f = tmp_path / "creds.yml"
    f.write_text(CREDS_YML)
    res = _invoke(["import", str(f), "--vault-path", "secret/credbroker/imp3", "--delete"], _vault_env(openbao))
    assert isinstance(res.exception, ConfigError) and "already exists" in str(res.exception)
    assert f.exists() and _read(openbao, "credbroker/imp3")["data"] == {"api_secret": "old", "note": "kept?"}
    res = _invoke(["import", str(f), "--vault-path", "secret/credbroker/imp3", "--force", "--keep"],
                  _vault_env(openbao))
    assert res.exit_code == 0, res.output
    got = _read(openbao, "credbroker/imp3")
    assert got["data"] == {"api_key": API_KEY, "api_secret": SECRET} and got["metadata"]["version"] == 2
    assert f.exists()


@pytest.mark.vault
def test_import_asks_before_deleting_at_a_terminal(openbao: OpenBao, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import broker.cli.import_

    monkeypatch.setattr(broker.cli.import_, "_interactive", lambda: True)
    f = tmp_path / "a.yml"
    f.write_text(CREDS_YML)
    res = _invoke(["import", str(f), "--vault-path", "secret/credbroker/imp4"], _vault_env(openbao), input="n\n")
    assert res.exit_code == 0, res.output
    assert "copy-on-write" in res.stderr and "Overwrite and delete" in res.stderr and f.exists()
    g = tmp_path / "b.yml"
    g.write_text(CREDS_YML)
    res = _invoke(["import", str(g), "--vault-path", "secret/credbroker/imp5"], _vault_env(openbao), input="y\n")
    assert res.exit_code == 0, res.output
    assert not g.exists()


@pytest.mark.vault
def test_import_never_deletes_a_file_with_keys_left_behind(openbao: OpenBao, tmp_path: Path) -> None:
    f = tmp_path / "bot.env"
    f.write_text(DOT_ENV + "SYMBOL=BTCUSDT\n")
    res = _invoke(["import", str(f), "--vault-path", "secret/credbroker/imp6", "--field", "BINANCE_API_SECRET=api_secret",
                   "--yes"], _vault_env(openbao))
    assert isinstance(res.exception, ConfigError)
    assert "also holds BINANCE_API_KEY, SYMBOL" in str(res.exception)
    assert f.exists()
    assert _read(openbao, "credbroker/imp6")["data"] == {"api_secret": SECRET}


@pytest.mark.vault
def test_import_as_a_real_process_fails_closed_in_one_line(openbao: OpenBao, tmp_path: Path, run_broker: Any
                                                           ) -> None:
    f = tmp_path / "creds.yml"
    f.write_text(CREDS_YML)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    bot = openbao.client().auth.token.create(policies=["default"], ttl="10m")["auth"]["client_token"]
    cases = [
        (["--vault-path", "secret/credbroker/imp7"], {"VAULT_ADDR": "http://127.0.0.1:9", "VAULT_TOKEN": "x"},
         "cannot reach Vault"),
        (["--vault-path", "secret/credbroker/imp7"], _vault_env(openbao, bot), "permission denied"),
        ([], _vault_env(openbao), "give one of --profile, --vault-path, --keyring-service"),
    ]
    for extra, env, needle in cases:
        res = run_broker(["import", str(f), *extra, "--delete"], env={**base, **env})
        assert res.returncode == 125, res.stderr
        assert needle in res.stderr and res.stderr.count("\n") == 1 and res.stderr.startswith("credbroker: ")
        assert SECRET not in res.stderr + res.stdout and "Traceback" not in res.stderr
        assert f.read_text() == CREDS_YML
    bad = tmp_path / "bad.yml"
    bad.write_text(f"api_key: {API_KEY}\napi_secret:\n  value: {SECRET}\n")
    res = run_broker(["import", str(bad), "--vault-path", "secret/credbroker/imp8"], env={**base,
                                                                                           **_vault_env(openbao)})
    assert res.returncode == 125
    assert res.stderr.startswith(f"credbroker: {bad}: line 2: api_secret has no value")
    assert SECRET not in res.stderr and API_KEY not in res.stderr
    # The happy path as a process: stdout/stderr carry names, never values.
    res = run_broker(["import", str(f), "--vault-path", "secret/credbroker/imp9", "--delete"],
                     env={**base, **_vault_env(openbao)})
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stdout + res.stderr and not f.exists()


# -- the command against the real Secret Service ----------------------------------------------
@pytest.mark.keyring
def test_import_into_the_keyring_verify_and_force(secret_service: SecretService, tmp_path: Path) -> None:
    import keyring

    service = "credbroker/imp-" + os.urandom(4).hex()
    f = tmp_path / "prod.env"
    f.write_text(DOT_ENV)
    args = ["import", str(f), "--keyring-service", service, "--field", "BINANCE_API_KEY=api_key",
            "--field", "BINANCE_API_SECRET=api_secret"]
    res = _invoke([*args, "--keep"])
    assert res.exit_code == 0, res.output
    assert keyring.get_password(service, "api_key") == API_KEY
    assert keyring.get_password(service, "api_secret") == SECRET
    assert "into keyring " + service in res.stdout and SECRET not in res.output
    res = _invoke([*args, "--keep"])
    assert isinstance(res.exception, ConfigError) and "already holds api_key, api_secret" in str(res.exception)
    f.write_text(DOT_ENV.replace(SECRET, SECRET[::-1]))
    res = _invoke([*args, "--force", "--delete"])
    assert res.exit_code == 0, res.output
    assert keyring.get_password(service, "api_secret") == SECRET[::-1]
    assert not f.exists()


@pytest.mark.keyring
def test_import_creds_yml_into_a_keyring_profile(secret_service: SecretService, tmp_path: Path) -> None:
    import keyring

    (tmp_path / "credbroker.toml").write_text(
        '[profiles.spot]\nsource = "keyring"\nservice = "credbroker/imp-spot"\n'
        'env = { BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }\n'
    )
    f = tmp_path / "creds.yml"
    f.write_text(CREDS_YML)
    res = _invoke(["import", str(f), "--profile", "spot", "--yes", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out == {"file": str(f), "target": "keyring", "location": "credbroker/imp-spot",
                   "fields": ["api_key", "api_secret"], "version": None, "address": None, "verified": True,
                   "left_out": [], "deleted": True, "bytes_overwritten": len(CREDS_YML.encode()), "other_links": 0}
    assert keyring.get_password("credbroker/imp-spot", "api_secret") == SECRET
    # And the broker's own keyring source reads what import stored.
    from broker.sources import keyring as keyring_source

    prof = Profile(name="spot", source="keyring", env={"BINANCE_API_SECRET": "api_secret"},
                   options={"service": "credbroker/imp-spot"})
    creds = keyring_source.fetch(prof)
    assert creds["api_secret"] == SECRET.encode()
    creds.wipe()


def test_errors_are_broker_errors() -> None:
    for cls in (migrate.PlaintextFormatError, migrate.ImportVerifyError, migrate.ShredError):
        assert issubclass(cls, BrokerError)


# -- audit events ------------------------------------------------------------------------------
@pytest.mark.vault
def test_import_and_delete_are_audited_without_values(openbao: OpenBao, tmp_path: Path) -> None:
    f = tmp_path / "creds.yml"
    f.write_text(CREDS_YML)
    res = _invoke(["import", str(f), "--vault-path", "secret/credbroker/imp10", "--delete"], _vault_env(openbao))
    assert res.exit_code == 0, res.output
    log = Path(os.environ["XDG_STATE_HOME"]) / "credbroker" / "audit.log"
    text = log.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    events = {r["event"]: r["data"] for r in records}
    assert events["secret_imported"]["location"] == "secret/credbroker/imp10"
    assert events["secret_imported"]["version"] == 1
    assert events["secret_imported"]["fields"] == ["api_key", "api_secret"]
    assert events["plaintext_deleted"]["file"] == str(f.resolve())
    assert SECRET not in text and API_KEY not in text
    verify = CliRunner().invoke(cli, ["audit", "verify"])
    assert verify.exit_code == 0, verify.output


@pytest.mark.vault
def test_library_import_with_a_recorder(openbao: OpenBao, tmp_path: Path) -> None:
    f = tmp_path / "bot.env"
    f.write_text(DOT_ENV)
    events: list[tuple[str, dict[str, Any]]] = []
    result = migrate.import_plaintext(
        f, target="vault", mount="secret", location="credbroker/imp11", env=_vault_env(openbao),
        mapping={"BINANCE_API_SECRET": "api_secret"}, record=lambda e, d: events.append((e, dict(d))),
    )
    assert result.stored.version == 1 and result.left_out == ("BINANCE_API_KEY",)
    assert SECRET not in repr(result)
    # The read-back is the one audited read (access.read, by="import"): its record carries Vault's
    # request id and the version just written; then the import itself.
    assert [e for e, _ in events] == ["secret_fetched", "secret_imported"]
    fetched = events[0][1]
    assert fetched["by"] == "import" and fetched["source"] == "vault"
    assert fetched["path"] == "secret/credbroker/imp11" and fetched["version"] == 1
    assert isinstance(fetched["request_id"], str) and fetched["request_id"]
    assert fetched["profile"] == "imp11" and fetched["fields"] == ["api_secret"]
    assert "read_back_request_id" not in events[1][1]
    assert SECRET not in json.dumps(events)
    with pytest.raises(ConfigError, match="also holds BINANCE_API_KEY"):
        migrate.delete_plaintext(result)
    assert f.exists()
    with pytest.raises(ConfigError, match="unknown import target"):
        migrate.import_plaintext(f, target="s3", location="x")


@pytest.mark.vault
def test_a_read_back_vault_refuses_is_recorded_as_the_imports_refusal(openbao: OpenBao, tmp_path: Path) -> None:
    """A token that may write but not read: the write happens, the read-back is refused, and the one-schema
    ``refused`` record (by="import") says so; no secret_imported is written for an unverified copy."""
    name = "imp-wo-" + os.urandom(4).hex()
    policy = f'path "secret/data/credbroker/{name}" {{ capabilities = ["create", "update"] }}\n'
    openbao.cli("policy", "write", name, "-", input=policy)
    token = openbao.client().auth.token.create(policies=[name], ttl="10m")["auth"]["client_token"]
    f = tmp_path / "bot.env"
    f.write_text(DOT_ENV)
    events: list[tuple[str, dict[str, Any]]] = []
    with pytest.raises(BrokerError) as err:
        migrate.import_plaintext(f, target="vault", mount="secret", location=f"credbroker/{name}",
                                 env=_vault_env(openbao, token), record=lambda e, d: events.append((e, dict(d))))
    assert type(err.value).__name__ == "VaultPermissionDenied"
    assert [e for e, _ in events] == ["refused"]
    refused = events[0][1]
    assert refused["by"] == "import" and refused["error"] == "VaultPermissionDenied"
    assert refused["profile"] == name and refused["source"] == "vault"
    assert _read(openbao, f"credbroker/{name}")["data"]["api_secret"] == SECRET  # the write itself happened
    assert SECRET not in json.dumps(events) and f.exists()


@pytest.mark.vault
def test_a_read_back_that_differs_is_recorded_after_the_read_that_found_it(openbao: OpenBao, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy in Vault is not the file's (a store that changed a byte): the read is recorded with Vault's
    request id, then the refusal, naming the same read; no value appears anywhere."""
    real_store = migrate.store_vault

    def altering_store(settings: Any, mount: str, path: str, fields: Any, **kwargs: Any) -> Any:
        changed = {name: Secret(value.reveal_str()[::-1]) for name, value in fields.items()}
        return real_store(settings, mount, path, changed, **kwargs)

    monkeypatch.setattr(migrate, "store_vault", altering_store)
    f = tmp_path / "creds.yml"
    f.write_text(CREDS_YML)
    events: list[tuple[str, dict[str, Any]]] = []
    with pytest.raises(migrate.ImportVerifyError, match="fields api_key, api_secret differ") as err:
        migrate.import_plaintext(f, target="vault", mount="secret", location="credbroker/imp-differs",
                                 env=_vault_env(openbao), record=lambda e, d: events.append((e, dict(d))))
    assert [e for e, _ in events] == ["secret_fetched", "refused"]
    fetched, refused = events[0][1], events[1][1]
    assert fetched["by"] == refused["by"] == "import" and refused["error"] == "ImportVerifyError"
    assert refused["request_id"] == fetched["request_id"] and fetched["request_id"]
    assert refused["path"] == fetched["path"] == "secret/credbroker/imp-differs"
    assert SECRET not in json.dumps(events) and SECRET not in str(err.value) and SECRET[::-1] not in str(err.value)


@pytest.mark.keyring
def test_a_keyring_import_reads_back_through_the_audited_read(secret_service: SecretService, tmp_path: Path) -> None:
    service = "credbroker/imp-rb-" + os.urandom(4).hex()
    f = tmp_path / "creds.yml"
    f.write_text(CREDS_YML)
    events: list[tuple[str, dict[str, Any]]] = []
    migrate.import_plaintext(f, target="keyring", location=service, record=lambda e, d: events.append((e, dict(d))))
    assert [e for e, _ in events] == ["secret_fetched", "secret_imported"]
    fetched = events[0][1]
    assert fetched["by"] == "import" and fetched["source"] == "keyring" and fetched["path"] == service
    assert fetched["fields"] == ["api_key", "api_secret"]
    assert SECRET not in json.dumps(events)


@pytest.mark.vault
def test_the_weekly_cross_check_counts_the_imports_read_back_as_the_brokers(tmp_path: Path,
                                                                            audited_openbao: OpenBao) -> None:
    """Real OpenBao with a file audit device: a profile-less import's read-back (and an older log's
    ``read_back_request_id`` on ``secret_imported``) is matched to the broker, never "read outside"."""
    from broker.audit import open_log

    server = audited_openbao
    log_path = tmp_path / "audit.log"
    log = open_log({"path": str(log_path)})
    f = tmp_path / "creds.yml"
    f.write_text(CREDS_YML)
    migrate.import_plaintext(f, target="vault", mount="secret", location="credbroker/imp-week",
                             env=_vault_env(server), record=log.record)
    # What an older credbroker wrote: the read-back's request id on secret_imported itself.
    server.kv_put("credbroker/imp-old", api_secret="old-" + os.urandom(4).hex())
    old = server.client().secrets.kv.v2.read_secret_version(path="credbroker/imp-old", mount_point="secret",
                                                             raise_on_deleted_version=True)
    log.record("secret_imported", {"file": str(f), "target": "vault", "location": "secret/credbroker/imp-old",
                                   "version": 1, "address": server.addr, "fields": ["api_secret"],
                                   "profile": None, "forced": False, "read_back_request_id": old["request_id"],
                                   "read_back_path": "secret/credbroker/imp-old"})
    server.kv_put("credbroker/imp-other", x="y")
    server.cli("kv", "get", "secret/credbroker/imp-other")  # the Vault log goes on past them
    env = {**server.env(), "CREDBROKER_AUDIT_LOG": str(log_path)}
    res = CliRunner().invoke(cli, ["audit", "report", "--json", "--vault-audit", str(server.extra["audit_log"])],
                             env=env, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    va = json.loads(res.output)["vault_audit"]
    assert va["unmatched_total"] == 0, va["unmatched"]
    assert va["matched"] == 2 and va["broker_reads_without_vault_entry"] == 0


@pytest.mark.vault
def test_import_writes_the_secret_to_no_file_under_strace(openbao: OpenBao, tmp_path: Path) -> None:
    """Read from the file, sent to Vault over the socket; never written anywhere else."""
    import subprocess

    from tests.conftest import credbroker_bin
    from tests.helpers.vaultadmin import secret_writes, strace_prefix

    secret = "STRACE" + os.urandom(12).hex()
    f = tmp_path / "creds.yml"
    f.write_text(CREDS_YML.replace(SECRET, secret))
    log = tmp_path / "strace.log"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}, **_vault_env(openbao)}
    res = subprocess.run([*strace_prefix(log), credbroker_bin(), "import", str(f), "--vault-path",
                          "secret/credbroker/imp12", "--delete"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    to_files, in_transit = secret_writes(log, secret)
    assert to_files == []
    assert any(t.startswith(("TCP", "socket:")) for t in in_transit), in_transit
    assert not f.exists()


def test_import_command_is_loaded_only_when_used() -> None:
    import subprocess
    import sys

    code = ("import sys, broker, broker.cli; "
            "print(sorted(m for m in ('broker.migrate', 'broker.cli.import_', 'hvac', 'keyring') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("key", "field"), [
    ("BINANCE_API_KEY", "api_key"), ("BINANCE_API_SECRET", "api_secret"), ("BINANCE_SECRET_KEY", "api_secret"),
    ("apiKey", "api_key"), ("secretKey", "api_secret"), ("api-secret", "api_secret"), ("API_SECRET", "api_secret"),
    ("BINANCE_PRIVATE_KEY", "private_key"), ("PRIVATE_KEY_PASSPHRASE", "private_key_passphrase"),
    ("api_key", "api_key"), ("SYMBOL", "symbol"), ("BINANCE_TESTNET", "binance_testnet"),
])
def test_canonical_field_names(key: str, field: str) -> None:
    assert migrate.canonical_field(key) == field


def test_two_keys_for_one_canonical_field_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "x.env"
    f.write_text("BINANCE_API_SECRET=a\nAPI_SECRET=b\n")
    plain = migrate.read_plaintext(f)
    with pytest.raises(ConfigError, match="would both be stored as api_secret"):
        migrate.select_fields(plain)


@pytest.mark.vault
def test_dotenv_import_stores_canonical_fields_and_the_printed_profile_runs(openbao: OpenBao, tmp_path: Path,
                                                                            run_broker: Any) -> None:
    """A .env's names become the README's fields (api_key, api_secret), and the printed block, pasted into
    credbroker.toml, runs a bot that reads the same variables the .env gave it."""
    f = tmp_path / ".env"
    f.write_text(DOT_ENV)
    res = _invoke(["import", str(f), "--vault-path", "secret/credbroker/imp-canon", "--keep", "--json"],
                  _vault_env(openbao))
    assert res.exit_code == 0, res.output
    assert _read(openbao, "credbroker/imp-canon")["data"] == {"api_key": API_KEY, "api_secret": SECRET}
    snippet = json.loads(res.stdout)["profile_snippet"]
    assert "[profiles.imp-canon]" in res.stderr  # also said to the person, with --json on stderr
    assert 'env = { BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }' in snippet
    (tmp_path / "credbroker.toml").write_text(snippet)
    ran = run_broker(["run", "-p", "imp-canon", "--", "python3", "-c",
                      "import os; print(os.environ['BINANCE_API_SECRET'] == os.environ['EXPECT'])"],
                     env={**openbao.env(), "EXPECT": SECRET}, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "True"
