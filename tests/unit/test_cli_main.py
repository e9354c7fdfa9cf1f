"""The `credbroker` entry point: what is credbroker's own argument and what is the bot's, help, hints."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.cli import _own_args, main


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    out, err = capsys.readouterr()
    code = exit_.value.code
    return (code if isinstance(code, int) else 1), out, err


def test_bare_credbroker_prints_the_help_as_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main([], capsys)
    assert code == 0 and err == ""
    assert out.startswith("Usage: credbroker") and "Commands:" in out and "-h, --help" in out


def test_a_childs_json_flag_is_the_childs(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["run", "-p", "nosuch", "--", "echo", "--json"], ["run", "-p", "nosuch", "echo", "--json"]):
        code, out, err = _main(args, capsys)
        assert code == 125 and err.startswith("credbroker: ")
        with pytest.raises(json.JSONDecodeError):
            json.loads(err)


def test_check_json_is_credbrokers(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _main(["check", "-p", "nosuch", "--json"], capsys)
    assert code == 125 and json.loads(err)["error"] == "ConfigError"


def test_global_json_asks_for_json_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main(["--json", "run", "-p", "nosuch", "--", "echo", "hi"], capsys)
    assert code == 125 and out == "" and json.loads(err)["error"] == "ConfigError"


def test_json_as_another_options_value_is_not_a_request_for_json(capsys: pytest.CaptureFixture[str]) -> None:
    """Only what click parsed as credbroker's own --json counts, not the word anywhere in argv."""
    for args in (["run", "-p", "nosuch", "-e", "--json", "--", "true"],
                 ["--config", "--json", "check", "-p", "nosuch"],
                 ["run", "-p", "nosuch", "--", "echo", "--json"]):
        code, _, err = _main(args, capsys)
        assert code == 125 and err.startswith("credbroker: ") and err.count("\n") == 1, (args, err)
        with pytest.raises(json.JSONDecodeError):
            json.loads(err)


def test_global_options_after_the_subcommand(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    code, _, err = _main(["run", "--config", "/nonexistent/c.toml", "-p", "x", "--", "true"], capsys)
    assert code == 125 and "config file /nonexistent/c.toml not found" in err
    code, _, err = _main(["run", "--config=/nonexistent/d.toml", "-p", "x", "--", "true"], capsys)
    assert code == 125 and "/nonexistent/d.toml" in err
    code, _, err = _main(["run", "--debug", "-p", "nosuch", "--", "true"], capsys)
    assert code == 125 and "Traceback" in err  # --debug took effect


@pytest.mark.parametrize(("args", "own", "rest"), [
    (["run", "-p", "P", "--", "python", "--debug"], ["run", "-p", "P"], ["--", "python", "--debug"]),
    (["run", "-p", "P", "python", "--json"], ["run", "-p", "P"], ["python", "--json"]),
    (["run", "--debug", "-e", "A=a", "x"], ["--debug", "run", "-e", "A=a"], ["x"]),
    (["--config", "c", "audit", "report", "--json"], ["--config", "c", "audit", "report", "--json"], []),
    (["audit", "verify", "--config", "c"], ["--config", "c", "audit", "verify"], []),
])
def test_own_args_split(args: list[str], own: list[str], rest: list[str]) -> None:
    assert _own_args(args) == (own, rest)


def test_missing_double_dash_gets_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _main(["run", "-p", "P", "python", "-u", "bot.py"], capsys)
    assert code == 125 and "the bot's command goes after --" in err and err.count("\n") == 1


def test_profiles_lists_aligned_columns_with_the_absolute_config_path(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from broker.cli import cli

    (tmp_path / "credbroker.toml").write_text(
        '[profiles.um-futures]\nsource = "vault"\npath = "secret/credbroker/um-futures"\n'
        'env = { BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }\n'
        'rotation = { on_rotate = "restart" }\npolicy = { symbols = ["BTCUSDT"] }\n'
        'signer = { type = "hmac" }\n'
        '[profiles.spot]\nsource = "keyring"\nenv = { BINANCE_API_SECRET = "api_secret" }\n')
    res = CliRunner().invoke(cli, ["profiles"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == f"config: {(tmp_path / 'credbroker.toml').resolve()}"
    header, fut, spot = lines[1:4]
    for column in ("SOURCE", "READS", "VARIABLES", "SIGNER", "ROTATION", "POLICY"):
        at = header.index(column)
        assert fut[at - 1] == " " and spot[at - 1] == " " and fut[at] != " "  # each column starts aligned
    assert "hmac" in fut and "restart" in fut and "symbols" in fut
    assert "credbroker/spot" in spot


def test_audit_verify_and_report_before_anything_was_recorded(tmp_path: Any) -> None:
    """A new install: "nothing recorded yet", exit 0. A removed log that left its head is not that."""
    from click.testing import CliRunner

    from broker.cli import cli

    log = tmp_path / "state" / "credbroker" / "audit.log"
    for args in (["audit", "verify"], ["audit", "report"]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0 and "nothing recorded yet" in res.output, res.output
    res = CliRunner().invoke(cli, ["audit", "verify", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["nothing_recorded"] is True
    log.parent.mkdir(parents=True)
    (tmp_path / "state" / "credbroker" / "audit.log.head").write_text("{}\n")
    res = CliRunner().invoke(cli, ["audit", "verify"])
    assert res.exit_code == 1 and "nothing recorded" not in res.output
    res = CliRunner().invoke(cli, ["audit", "report"])
    assert res.exit_code != 0 and "nothing recorded" not in res.output


@pytest.mark.parametrize("args", [
    ["audit", "show", "--log", "a" * 5000],  # ENAMETOOLONG from a stat no BrokerError named
    ["audit", "verify", "--host-logs", "b" * 5000],
    ["audit", "report", "--log", "c" * 5000],
])
def test_a_path_the_system_refuses_is_one_line_not_an_internal_error(args: list[str],
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _main(args, capsys)
    assert code == 125 and err.startswith("credbroker: ") and len(err.strip().splitlines()) == 1, err
    assert "internal error" not in err and len(err) < 400


def test_a_usage_error_listing_choices_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _main(["policy", "show", "--name", "x"], capsys)
    assert code == 125 and len(err.strip().splitlines()) == 1, err
    assert "admin, audit-anchor, auditor, bot" in err
