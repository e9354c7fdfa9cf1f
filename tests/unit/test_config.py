"""Profiles: discovery order, validation, one-off profiles from flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import config
from broker.errors import ConfigError

GOOD = """
[vault]
addr = "http://127.0.0.1:8200"

[profiles.um-futures]
source = "vault"
path = "secret/credbroker/binance/um-futures"
env = { BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }

[profiles.spot]
source = "keyring"
env = { BINANCE_API_SECRET = "api_secret" }
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_parse_good_file(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path / "c.toml", GOOD))
    p = cfg.profile("um-futures")
    assert p.source == "vault"
    assert p.options["path"] == "secret/credbroker/binance/um-futures"
    assert p.fields == ("api_key", "api_secret")
    assert cfg.profile("spot").source == "keyring"
    assert cfg.vault["addr"] == "http://127.0.0.1:8200"


def test_discovery_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = """[profiles.{n}]\nsource = "keyring"\nenv = {{ A = "a" }}\n"""
    user = write(config.default_config_path(), one.format(n="from-user"))
    assert config.load().path == user
    local = write(Path("credbroker.toml"), one.format(n="from-local"))
    assert config.load().path == local
    envfile = write(tmp_path / "env.toml", one.format(n="from-env"))
    monkeypatch.setenv("CREDBROKER_CONFIG", str(envfile))
    assert config.load().path == envfile
    flag = write(tmp_path / "flag.toml", one.format(n="from-flag"))
    assert "from-flag" in config.load(flag).profiles


def test_no_file_is_an_empty_config() -> None:
    cfg = config.load()
    assert cfg.path is None and not cfg.profiles
    with pytest.raises(ConfigError, match="profile 'x' not found"):
        cfg.profile("x")


def test_named_file_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.toml")
    monkeypatch.setenv("CREDBROKER_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="CREDBROKER_CONFIG"):
        config.load()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[profiles.a\n", "invalid TOML"),
        ("colour = 1\n", "unknown top-level key 'colour'"),
        ('[profiles.a]\nenv = { A = "a" }\n', "profiles.a.source: missing"),
        ('[profiles.a]\nsource = "s3"\nenv = { A = "a" }\n', "unknown source 's3'"),
        ('[profiles.a]\nsource = "vault"\nenv = { A = "a" }\n', "profiles.a.path: missing"),
        ('[profiles.a]\nsource = "vault"\npath = "nomount"\nenv = { A = "a" }\n', "has no mount"),
        ('[profiles.a]\nsource = "vault"\npath = "secret/x"\n', "profiles.a.env: missing or empty"),
        ('[profiles.a]\nsource = "vault"\npath = "secret/x"\nenv = { A = 3 }\n', "profiles.a.env.A: expected a field"),
        ('[profiles.a]\nsource = "vault"\npath = "secret/x"\nenv = { "1A" = "a" }\n', "not a valid environment"),
        ('[profiles.a]\nsource = "vault"\npath = "secret/x"\nenv = { VAULT_TOKEN = "a" }\n', "reserved"),
        ('[profiles.a]\nsource = "vault"\npath = "secret/x"\nversion = 0\nenv = { A = "a" }\n', "number >= 1"),
        ('[profiles.a]\nsource = "vault"\npath = "secret/x"\npathh = 1\nenv = { A = "a" }\n', "profiles.a.pathh"),
        ('[profiles.a]\nsource = "keyring"\nservice = 5\nenv = { A = "a" }\n', "profiles.a.service"),
        ('[vault]\naddress = "x"\n', "vault.address: unknown key"),
        ('profiles = 3\n', "profiles: expected a table"),
        ('[profiles."a b"]\nsource = "keyring"\nenv = { A = "a" }\n', "invalid profile name"),
        # A line break at the end of a name: "$" in a pattern matches before it, so it once passed.
        ('[profiles."a\\n"]\nsource = "keyring"\nenv = { A = "a" }\n', "invalid profile name"),
        ('[profiles.a]\nsource = "vault"\npath = "secret/x"\nenv = { "A\\n" = "a" }\n', "not a valid environment"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe[profiles]")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(path)


def test_adhoc_profile_from_flags() -> None:
    env = config.parse_env_mapping(["BINANCE_API_SECRET=api_secret", "BINANCE_API_KEY"])
    assert env == {"BINANCE_API_SECRET": "api_secret", "BINANCE_API_KEY": "binance_api_key"}
    p = config.Profile.adhoc(env=env, vault_path="secret/credbroker/binance/um-futures", vault_version=2)
    assert (p.name, p.source, p.options["version"]) == ("um-futures", "vault", 2)
    with pytest.raises(ConfigError, match="no profile and no source"):
        config.Profile.adhoc(env=env)
    with pytest.raises(ConfigError, match="two sources"):
        config.Profile.adhoc(env=env, vault_path="secret/a", keyring_service="b")
    with pytest.raises(ConfigError, match="expected VAR=FIELD"):
        config.parse_env_mapping(["=x"])


def test_adhoc_overrides_a_configured_profile(tmp_path: Path) -> None:
    base = config.load(write(tmp_path / "c.toml", GOOD)).profile("um-futures")
    p = config.Profile.adhoc(env={"EXTRA": "extra"}, vault_version=4, base=base)
    assert p.name == "um-futures"
    assert p.options["version"] == 4
    assert p.env["EXTRA"] == "extra" and p.env["BINANCE_API_KEY"] == "api_key"


def test_one_off_profile_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError, match="^--vault-path: 'x' has no mount"):
        config.Profile.adhoc(env={"A": "a"}, vault_path="x")
    with pytest.raises(ConfigError, match="^--env: no variables to inject"):
        config.Profile.adhoc(env={}, vault_path="secret/x")


@pytest.mark.parametrize(("body", "needles"), [
    ('env = "BINANCE_API_KEY"', ["profiles.p.env: must be a table", "got a string"]),
    ('env = { S = "s" }\nversion = "3"', ["profiles.p.version: expected a number, got the string '3'",
                                          "version = 3, without quotes"]),
    ('env = { S = "s" }\npath = "secret/data/credbroker/p"', ["names the KV v2 API path",
                                                              'drop "data/": write "secret/credbroker/p"']),
    ('env = { S = "s" }\npath = "secret/metadata/credbroker/p"', ['drop "metadata/"']),
    ('env = { S = "s" }\npath = "um-futures"', ["'um-futures' has no mount", '"secret/um-futures"']),
])
def test_first_hour_mistakes_get_the_message_that_fits(tmp_path: Path, body: str, needles: list[str]) -> None:
    text = '[profiles.p]\nsource = "vault"\n' + body + "\n"
    if "path =" not in body:
        text += 'path = "secret/credbroker/p"\n'
    f = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as err:
        config.load(f)
    message = str(err.value)
    assert "\n" not in message and str(f) in message
    for needle in needles:
        assert needle in message, message


def test_an_explicit_mount_allows_a_folder_named_data(tmp_path: Path) -> None:
    f = write(tmp_path / "c.toml", '[profiles.p]\nsource = "vault"\nmount = "secret"\npath = "data/x"\nenv = { S = "s" }\n')
    assert config.load(f).profile("p").options["path"] == "data/x"


def test_a_profile_typo_suggests_the_close_name(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path / "c.toml", GOOD))
    with pytest.raises(ConfigError) as err:
        cfg.profile("um-futres")
    assert "did you mean 'um-futures'?" in str(err.value) and str(tmp_path.resolve()) in str(err.value)
    with pytest.raises(ConfigError) as far:
        cfg.profile("zzz")
    assert "did you mean" not in str(far.value)
