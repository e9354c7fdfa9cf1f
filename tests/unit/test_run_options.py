"""The run options the CLI used to compute itself: which profiles a run takes, and the preflight mode."""

from __future__ import annotations

import pytest

from broker.config import parse_dict, run_profiles
from broker.errors import ConfigError
from broker.preflight import PreflightOptions, mode_for

CONFIG = parse_dict({"profiles": {
    "a": {"source": "vault", "path": "secret/credbroker/a", "env": {"A_KEY": "api_key"}},
    "b": {"source": "vault", "path": "secret/credbroker/b", "env": {"B_KEY": "api_key"}},
}})


def test_a_configured_profile_is_taken_as_configured() -> None:
    assert run_profiles(CONFIG, ["a"]) == [CONFIG.profile("a")]
    assert run_profiles(CONFIG, ["a", "b"]) == [CONFIG.profile("a"), CONFIG.profile("b")]


def test_one_off_options_shape_one_profile_on_top_of_the_named_one() -> None:
    (prof,) = run_profiles(CONFIG, ["a"], env_items=["X_SECRET=api_secret"])
    assert prof != CONFIG.profile("a")
    assert prof.env["X_SECRET"] == "api_secret" and prof.options["path"] == "secret/credbroker/a"
    (alone,) = run_profiles(CONFIG, [], vault_path="secret/credbroker/z", env_items=["Z_KEY=api_key"])
    assert alone.source == "vault" and alone.options["path"] == "secret/credbroker/z"
    assert dict(alone.env) == {"Z_KEY": "api_key"}


def test_one_off_options_with_several_profiles_are_refused() -> None:
    with pytest.raises(ConfigError, match="shape one profile"):
        run_profiles(CONFIG, ["a", "b"], vault_version=3)
    with pytest.raises(ConfigError):
        run_profiles(CONFIG, ["nosuch"])


@pytest.mark.parametrize(("agent", "flag", "mode"), [
    (False, None, "off"), (True, None, "auto"), (False, True, "on"), (True, True, "on"),
    (True, False, "off"), (False, False, "off"),
])
def test_the_preflight_mode(agent: bool, flag: bool | None, mode: str) -> None:
    assert mode_for(agent=agent, flag=flag) == mode
    opts = PreflightOptions.for_run(agent=agent, flag=flag, base_url="https://example.test",
                                    unsafe_allow_margin=True, env={})
    assert opts.mode == mode and opts.base_url == "https://example.test" and opts.overrides == ["--unsafe-allow-margin"]
