"""broker.units: the one parser each for durations, sizes and rates, and the settings that use them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest

from broker import units
from broker.errors import ConfigError


@pytest.mark.parametrize(("value", "expected"), [
    ("45s", 45.0), ("30m", 1800.0), ("12h", 43200.0), ("2d", 172800.0), ("1w", 604800.0), (" 5 m ", 300.0),
    (90, 90.0), (0.5, 0.5), ("0.5", 0.5), ("10", 10.0),
])
def test_seconds(value: object, expected: float) -> None:
    assert units.seconds(value, "--grace") == expected


@pytest.mark.parametrize("value", ["30x", "", "5 minutes", "-1", "1.5h", None, True, [], "inf", "nan"])
def test_bad_duration_is_one_line_naming_the_setting(value: object) -> None:
    with pytest.raises(ConfigError) as err:
        units.seconds(value, "cfg.toml: profiles.p.rotation.interval")
    text = str(err.value)
    assert text.startswith("cfg.toml: profiles.p.rotation.interval: ") and "\n" not in text
    assert err.value.remedy and "e.g." in err.value.remedy


@pytest.mark.parametrize("value", [99999999999999999999999, 1e20, "9999999999999w", "400000000", "9" * 5000 + "s"])
def test_a_duration_past_ten_years_or_of_endless_digits_is_refused(value: object) -> None:
    """Timers and socket timeouts overflow far before a float does ([vault] timeout = 1e23 was an
    OverflowError in a thread); int() refuses 4,300 digits and more with a ValueError of its own."""
    with pytest.raises(ConfigError) as err:
        units.seconds(value, "[vault] timeout")
    assert str(err.value).startswith("[vault] timeout: ") and len(str(err.value)) < 200
    assert units.seconds(f"{10 * 52}w", "x") == 520 * 7 * 86400  # ten years still is a duration


@pytest.mark.parametrize("value", ["9" * 5000, "9" * 5000 + "MiB", "\u00b2"])
def test_a_size_of_endless_or_unicode_digits_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^\[audit\] max_size: invalid size"):
        units.size(value, "[audit] max_size")


@pytest.mark.parametrize("value", [0, "0", "0s", -3])
def test_a_duration_is_positive(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^--grace: expected a duration > 0"):
        units.seconds(value, "--grace")


def test_duration_refuses_a_bare_number_unless_asked() -> None:
    assert units.duration("90d", "[audit] keep") == timedelta(days=90)
    for value in (90, "90"):
        with pytest.raises(ConfigError, match=r"^\[audit\] keep: invalid duration") as err:
            units.duration(value, "[audit] keep")
        assert "7d" in str(err.value.remedy)  # days and weeks, the units of retention
    assert units.duration(90, "x", bare_seconds=True) == timedelta(seconds=90)


@pytest.mark.parametrize(("value", "expected"), [
    ("64MiB", 64 * 1024**2), ("64M", 64 * 1024**2), ("1GB", 10**9), ("500kb", 500_000), ("4096", 4096),
    (8192, 8192), ("12 KiB", 12 * 1024),
])
def test_size(value: object, expected: int) -> None:
    assert units.size(value, "[audit] max_size") == expected


@pytest.mark.parametrize(("value", "message"), [
    ("64 megabytes", "invalid size"), (True, "got a boolean"), ("1.5MiB", "invalid size"), (None, "invalid size"),
    ("100", "too small"),
])
def test_bad_size_names_the_setting(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^\[audit\] max_size: ") as err:
        units.size(value, "[audit] max_size", minimum=4096)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_too_small_says_the_minimum_in_its_unit() -> None:
    with pytest.raises(ConfigError) as err:
        units.size("1K", "[audit] max_size", minimum=4096)
    assert err.value.remedy == "use at least 4KiB"


@pytest.mark.parametrize(("value", "expected"), [
    ("20/s", (20, 1.0)), ("100/m", (100, 60.0)), ("1000 / hour", (1000, 3600.0)), ("5/min", (5, 60.0)),
])
def test_rate(value: str, expected: tuple[int, float]) -> None:
    assert units.rate(value, "x.rate_limit") == expected


@pytest.mark.parametrize("value", ["0/s", "20/day", "20", 20, "/s", None, "9" * 5000 + "/s"])
def test_bad_rate_names_the_setting(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^cfg\.toml: profiles\.p\.policy\.rate_limit: expected \"COUNT/s\""):
        units.rate(value, "cfg.toml: profiles.p.policy.rate_limit")


def test_every_setting_parses_through_units(tmp_path: object) -> None:
    """The settings that took durations, sizes and rates give the same one-line errors, naming themselves."""
    import tomllib

    from broker.audit.settings import load_settings
    from broker.config import Profile, parse_dict
    from broker.rotation import policy_from
    from broker.signing.settings import SignerSettings
    from broker.signing_policy import SigningPolicy

    def profile(extra: str) -> Profile:
        text = '[profiles.p]\nsource = "vault"\npath = "secret/p"\nenv = { A = "a" }\n' + extra
        return parse_dict(tomllib.loads(text), origin="cfg.toml").profile("p")

    with pytest.raises(ConfigError, match=r"refresh_interval: invalid duration"):
        SignerSettings.for_profile(profile('[profiles.p.signer]\nrefresh_interval = "soon"'))
    s = SignerSettings.for_profile(profile('[profiles.p.signer]\ntransit_key = "k"\ntoken_ttl = "90m"'))
    assert s.ttl_seconds() == 5400 and s.token_ttl == "5400s"
    with pytest.raises(ConfigError, match=r"token_ttl: expected whole seconds"):
        SignerSettings.for_profile(profile('[profiles.p.signer]\ntransit_key = "k"\ntoken_ttl = 1.5'))
    with pytest.raises(ConfigError, match=r"cfg\.toml: profiles\.p\.rotation\.interval: invalid duration"):
        policy_from(profile('[profiles.p.rotation]\non_rotate = "restart"\ninterval = "often"'),
                    None, None, None)
    with pytest.raises(ConfigError, match=r"rate_limit: expected"):
        SigningPolicy.from_mapping({"rate_limit": "fast"}, "cfg.toml: profiles.p.policy")
    env = {"HOME": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"^\[audit\] keep: invalid duration"):
        load_settings({"keep": "forever"}, env)
    assert load_settings({"max_size": "1MiB", "anchor_interval": "2m"}, env).anchor_interval == timedelta(minutes=2)


def test_vault_timeout_through_units() -> None:
    from broker.vault.settings import VaultSettings

    assert VaultSettings.from_env({"CREDBROKER_VAULT_TIMEOUT": "2m"}).timeout == 120.0
    with pytest.raises(ConfigError, match=r"CREDBROKER_VAULT_TIMEOUT.*expected a duration > 0"):
        VaultSettings.from_env({"CREDBROKER_VAULT_TIMEOUT": "0"})


def test_signer_settings_do_not_load_the_runner() -> None:
    """A bot that sets refresh_interval imports the parser, not broker.rotation and what it pulls in."""
    code = textwrap.dedent("""
        import sys, tomllib
        from broker.config import parse_dict
        from broker.signing.settings import SignerSettings
        text = '[profiles.p]\\nsource = "vault"\\npath = "secret/p"\\nenv = { A = "a" }\\n'
        text += '[profiles.p.signer]\\nrefresh_interval = "5m"\\n'
        s = SignerSettings.for_profile(parse_dict(tomllib.loads(text), origin="c").profile("p"))
        assert s.refresh_interval == 300.0, s
        loaded = sorted(m for m in ("broker.rotation", "broker.runner") if m in sys.modules)
        print(",".join(loaded) or "none")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "none"
