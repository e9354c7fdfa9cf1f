"""The keyring source and `credbroker keyring` against the real Secret Service."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker import sources
from broker.config import Profile
from broker.errors import KeyringNotFound, KeyringUnavailable

from tests.conftest import SecretService, credbroker_bin

pytestmark = pytest.mark.keyring

SECRET = "keyring-secret-51d0c2aa9e"


def profile(name: str = "spot", **options: object) -> Profile:
    return Profile(name=name, source="keyring",
                   env={"BINANCE_API_KEY": "api_key", "BINANCE_API_SECRET": "api_secret"}, options=options)


def cli(args: list[str], env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([credbroker_bin(), *args], env=env, input=stdin, capture_output=True, text=True,
                          timeout=60)


def test_fetch_from_the_real_secret_service(secret_service: SecretService) -> None:
    import keyring

    keyring.set_password("credbroker/spot", "api_key", "AK-spot")
    keyring.set_password("credbroker/spot", "api_secret", SECRET)
    creds = sources.fetch(profile(), env=os.environ)
    assert creds["api_secret"].reveal_str() == SECRET
    assert creds.origin.source == "keyring" and creds.origin.path == "credbroker/spot"
    assert SECRET not in repr(creds)


def test_missing_entry_names_service_field_and_fix(secret_service: SecretService) -> None:
    import keyring

    keyring.set_password("credbroker/half", "api_key", "AK")
    with pytest.raises(KeyringNotFound) as info:
        sources.fetch(profile("half"), env=os.environ)
    msg = str(info.value)
    assert "'api_secret'" in msg and "credbroker/half" in msg
    assert "credbroker keyring set half api_secret" in msg


def test_keyring_set_reads_stdin_never_argv(secret_service: SecretService, tmp_path: Path) -> None:
    env = {**secret_service.env, "DBUS_SESSION_BUS_ADDRESS": os.environ["DBUS_SESSION_BUS_ADDRESS"]}
    res = cli(["keyring", "set", "--service", "credbroker/cli-test", "cli-test", "api_secret"], env,
              stdin=SECRET + "\n")
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stdout + res.stderr
    import keyring

    assert keyring.get_password("credbroker/cli-test", "api_secret") == SECRET
    empty = cli(["keyring", "set", "--service", "credbroker/cli-test", "cli-test", "api_secret"], env, stdin="")
    assert empty.returncode == 125 and "empty input" in empty.stderr
    # A profile the config does not have, without --service: refused before anything is read or stored.
    typo = cli(["keyring", "set", "cli-tset", "api_secret"], env, stdin=SECRET + "\n")
    assert typo.returncode == 125 and "profile 'cli-tset' not found" in typo.stderr
    assert SECRET not in typo.stdout + typo.stderr
    assert keyring.get_password("credbroker/cli-tset", "api_secret") is None
    gone = cli(["keyring", "delete", "--service", "credbroker/cli-test", "cli-test", "api_secret"], env)
    assert gone.returncode == 0, gone.stderr
    assert keyring.get_password("credbroker/cli-test", "api_secret") is None


def test_run_with_a_keyring_profile(secret_service: SecretService, tmp_path: Path) -> None:
    import keyring

    keyring.set_password("credbroker/kr-run", "api_key", "AK-kr")
    keyring.set_password("credbroker/kr-run", "api_secret", SECRET)
    out = tmp_path / "seen"
    env = {**secret_service.env, "DBUS_SESSION_BUS_ADDRESS": os.environ["DBUS_SESSION_BUS_ADDRESS"]}
    res = cli(["run", "--keyring-service", "credbroker/kr-run", "--env", "BINANCE_API_SECRET=api_secret", "--",
               "sh", "-c", f'printf %s "$BINANCE_API_SECRET" > {out}'], env)
    assert res.returncode == 0, res.stderr
    assert out.read_text() == SECRET


def test_no_keyring_available_fails_closed(tmp_path: Path) -> None:
    # No D-Bus session at all: keyring falls back to its fail backend.
    env = {k: v for k, v in os.environ.items() if k != "DBUS_SESSION_BUS_ADDRESS"}
    env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={tmp_path}/no-bus"
    res = cli(["run", "--keyring-service", "credbroker/none", "--env", "X=api_secret", "--", "true"], env)
    assert res.returncode == 125
    assert "keyring" in res.stderr and "fix:" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert "no OS keyring is available" in res.stderr


def test_no_keyring_backend_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import keyring
    from keyring.backends import fail

    from broker.sources.keyring import backend_for

    monkeypatch.setattr(keyring, "get_keyring", lambda: fail.Keyring())
    with pytest.raises(KeyringUnavailable, match="no OS keyring"):
        backend_for(profile())


def test_locked_keyring_fails_closed(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.conftest import start_secret_service, stop_secret_service

    service, procs = start_secret_service(tmp_path_factory.mktemp("locked-home"))
    try:
        lock = subprocess.run(
            [sys.executable, "-c",
             "import keyring, secretstorage\n"
             "keyring.set_password('credbroker/locked', 'api_secret', 'x')\n"
             "c = secretstorage.get_default_collection(secretstorage.dbus_init())\n"
             "c.lock()\nassert c.is_locked()\n"],
            env=service.env, capture_output=True, text=True, timeout=60,
        )
        assert lock.returncode == 0, lock.stderr
        res = cli(["run", "--keyring-service", "credbroker/locked", "--env", "X=api_secret", "--", "true"],
                  service.env)
        assert res.returncode == 125
        assert "keyring is locked" in res.stderr and "unlock" in res.stderr
    finally:
        stop_secret_service(service, procs)


def test_keyring_set_and_delete_are_recorded_and_fail_closed(secret_service: SecretService, tmp_path: Path) -> None:
    import json

    import keyring

    log = tmp_path / "audit" / "audit.log"
    env = {**secret_service.env, "DBUS_SESSION_BUS_ADDRESS": os.environ["DBUS_SESSION_BUS_ADDRESS"],
           "CREDBROKER_AUDIT_LOG": str(log)}
    res = cli(["keyring", "set", "--service", "credbroker/rec-test", "rec-test", "api_secret"], env,
              stdin=SECRET + "\n")
    assert res.returncode == 0, res.stderr
    res = cli(["keyring", "delete", "--service", "credbroker/rec-test", "rec-test", "api_secret"], env)
    assert res.returncode == 0, res.stderr
    text = log.read_text()
    recs = [json.loads(line) for line in text.splitlines()]
    assert [(r["event"], r["data"]["profile"], r["data"]["field"], r["data"]["service"]) for r in recs] == [
        ("keyring_set", "rec-test", "api_secret", "credbroker/rec-test"),
        ("keyring_deleted", "rec-test", "api_secret", "credbroker/rec-test"),
    ]
    assert SECRET not in text
    # An audit log that cannot be written: the keyring is not touched.
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    env["CREDBROKER_AUDIT_LOG"] = str(blocked / "audit.log")
    res = cli(["keyring", "set", "--service", "credbroker/rec-test", "rec-test", "api_secret"], env,
              stdin=SECRET + "\n")
    assert res.returncode == 125 and res.stderr.count("\n") == 1, res.stderr
    assert keyring.get_password("credbroker/rec-test", "api_secret") is None


class _Backend:
    """A keyring backend whose get_password raises ``exc`` (pure logic: which failure means what)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def get_password(self, service: str, name: str) -> str:
        raise self.exc


def _fetch_with(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    from broker.sources import keyring as source

    monkeypatch.setattr(source, "backend_for", lambda profile=None: _Backend(exc))
    source.fetch(profile("broken"))


def test_only_transport_failures_mean_the_keyring_did_not_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    import jeepney
    import secretstorage.exceptions

    for exc in (OSError(111, "refused"), ConnectionResetError(),
                secretstorage.exceptions.SecretServiceNotAvailableException("gone"),
                jeepney.DBusErrorResponse(jeepney.new_error(jeepney.new_method_call(
                    jeepney.DBusAddress("/", bus_name="org.freedesktop.secrets"), "Get"), "org.x.Error"))):
        with pytest.raises(KeyringUnavailable, match="did not answer") as info:
            _fetch_with(monkeypatch, exc)
        assert "D-Bus" in str(info.value.remedy)


def test_a_bug_is_not_reported_as_a_keyring_outage(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A TypeError of ours (or of a backend) stays a TypeError: the CLI calls it an internal error, exit 125."""
    from broker.cli import main
    from broker.sources import keyring as source

    with pytest.raises(TypeError):
        _fetch_with(monkeypatch, TypeError("an argument of ours was wrong"))
    monkeypatch.setattr(source, "backend_for", lambda profile=None: _Backend(TypeError("bug")))
    monkeypatch.setenv("CREDBROKER_DAEMON", "0")
    with pytest.raises(SystemExit) as code:
        main(["run", "--keyring-service", "credbroker/x", "--env", "X=api_secret", "--", "true"])
    err = capsys.readouterr().err
    assert code.value.code == 125 and err.count("\n") == 1
    assert err.startswith("credbroker: internal error (run with --debug for the traceback): TypeError")
    assert "keyring" not in err and "D-Bus" not in err
