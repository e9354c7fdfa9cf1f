"""Long command lines: up to the kernel's limit the bot starts and is recorded in full; beyond it, nothing starts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.cmdline import MAX_ARG_STRLEN, audit_fields, exec_limit

from tests.conftest import OpenBao, credbroker_bin

pytestmark = pytest.mark.vault

PATH = "secret/credbroker/cmdline"


@pytest.fixture
def env(openbao: OpenBao, tmp_path: Path) -> Iterator[dict[str, str]]:
    openbao.kv_put("credbroker/cmdline", api_secret="cmdline-secret")
    yield {**openbao.env(), "HOME": str(tmp_path), "CREDBROKER_AUDIT_LOG": str(tmp_path / "audit.log")}


def events(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def argv_from_log(log: Path) -> list[str]:
    recs = events(log)
    injected = [r for r in recs if r["event"] == "secret_injected"]
    assert len(injected) == 1
    parts = [r["data"] for r in recs if r["event"] == "command_args"]  # type: ignore[index]
    if not parts:
        return injected[0]["data"]["command"]  # type: ignore[index,no-any-return]
    assert [p["part"] for p in parts] == list(range(1, len(parts) + 1))  # type: ignore[index]
    return json.loads("".join(p["json"] for p in parts))  # type: ignore[index,no-any-return]


def run(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([credbroker_bin(), "run", "--vault-path", PATH, "--env", "S=api_secret", "--", *argv],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("size", [70 * 1024, MAX_ARG_STRLEN - 1])
def test_a_long_argument_starts_and_is_recorded_in_full(env: dict[str, str], tmp_path: Path, size: int) -> None:
    arg = "x" * size
    out = tmp_path / "len"
    res = run(env, sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write(str(len(sys.argv[2])))",
              str(out), arg)
    assert res.returncode == 0, res.stderr
    assert out.read_text() == str(size)  # the child started with the whole argument
    log = tmp_path / "audit.log"
    assert argv_from_log(log)[-1] == arg
    names = [r["event"] for r in events(log)]
    assert "child_exited" in names and "refused" not in names


def test_many_arguments_up_to_the_total_are_recorded_in_full(env: dict[str, str], tmp_path: Path) -> None:
    args = [f"a{i:06d}-" + "y" * 90 for i in range(5000)]  # about 500 KB, under the 2 MiB of a default stack
    res = run(env, "sh", "-c", 'test "$#" = 5000', "sh", *args)
    assert res.returncode == 0, res.stderr
    assert argv_from_log(tmp_path / "audit.log")[4:] == args


def test_an_argument_over_the_kernels_limit_starts_nothing(env: dict[str, str], tmp_path: Path) -> None:
    """Through the library (the CLI itself could not be started with such an argument)."""
    from broker import runner
    from broker.config import Profile
    from broker.errors import RunError

    marker = tmp_path / "started"
    recorded: list[tuple[str, dict[str, object]]] = []
    profile = Profile.adhoc(env={"S": "api_secret"}, vault_path=PATH)
    with pytest.raises(RunError) as err:
        runner.run(runner.RunOptions.build(profile, ["sh", "-c", f"touch {marker}", "sh", "z" * MAX_ARG_STRLEN],
                                           environ=env, record=lambda event, fields: recorded.append((event, fields))))
    assert err.value.exit_code == 125 and "not started" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    assert [e for e, _ in recorded] == ["refused"]
    assert "sha256" in str(recorded[0][1]["command"])  # the refusal names the command, bounded


def test_a_command_line_over_the_total_starts_nothing(openbao: OpenBao, env: dict[str, str], tmp_path: Path) -> None:
    """The broker's own command line fits; the bot's, with the injected secret, does not."""
    # Two fields of 60 KB (a source refuses one value over 64 KiB): the injected secrets take 120 KB.
    big, big2 = "s" * 60_000, "t" * 60_000
    openbao.kv_put("credbroker/cmdline-big", api_secret=big, api_key=big2)
    marker = tmp_path / "started"
    env_size = sum(len(k) + len(v) + 2 for k, v in env.items())
    room = exec_limit() - env_size - 60_000  # about 60 KB left for the broker; the secret takes 120 KB
    args = ["w" * 100_000] * (room // 100_008)
    res = subprocess.run([credbroker_bin(), "run", "--vault-path", "secret/credbroker/cmdline-big", "--env",
                          "S=api_secret", "--env", "K=api_key", "--", "sh", "-c", f"touch {marker}", "sh", *args],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 125, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "not started" in res.stderr, res.stderr
    assert big not in res.stderr and big2 not in res.stderr
    assert not marker.exists()
    names = [r["event"] for r in events(tmp_path / "audit.log")]
    assert "secret_injected" not in names and "child_exited" not in names


def test_audit_fields_split_and_rejoin_exactly() -> None:
    argv = ["bot", "\udcff\u00e9\"\\" * 20_000, "tail"]
    shown, chunks = audit_fields(argv)
    assert chunks and shown[0] == "bot" and "sha256" in shown[-1]
    assert json.loads("".join(chunks)) == argv
    assert audit_fields(["python", "bot.py"]) == (["python", "bot.py"], [])
