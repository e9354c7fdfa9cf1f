"""The weekly review raises no false alarm and reads at a glance: bots on old versions, secrets of two
Vaults kept apart, the verdict, --fail-on for cron, and `audit show` / `audit tail --follow`."""

from __future__ import annotations

import json
import os
import subprocess
import queue
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.audit.model import FAIL_ON_NAMES
from broker.audit.report import render_text
from broker.cli import cli
from broker.errors import ConfigError

from tests.helpers.week import ADDR, PATH, Week, report
from tests.helpers.auditlog import NOW, SINCE

ARGS = ["--since", SINCE.isoformat(), "--until", NOW.isoformat()]


@pytest.fixture
def week(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Week:
    return Week(tmp_path / "audit.log", monkeypatch)


def inject(w: Week, when: object, pid: int, version: int, host: str = "bot-1", address: str = ADDR,
           command: str = "bot.py") -> None:
    w.at(when, "secret_fetched", host, profile="um-futures", source="vault", path=PATH,  # type: ignore[arg-type]
         address=address, version=version)
    w.at(when, "secret_injected", host, profile="um-futures", version=version, source="vault",  # type: ignore[arg-type]
         path=PATH, address=address, command=["python", command], pid=pid, user="trader", host=host)


def test_only_bots_still_on_an_old_version_at_the_end_are_listed(week: Week) -> None:
    t = SINCE + timedelta(days=1)
    # ten bots that ran on v3 and exited before the rotation: not stale
    for i in range(10):
        inject(week, t + timedelta(hours=i), 100 + i, 3, command=f"old{i}.py")
        week.at(t + timedelta(hours=i, minutes=20), "child_exited", "bot-1", profile="um-futures", pid=100 + i,
                status=0)
    # a bot restarted by the rotation: its v3 child exits right after it, the v4 child runs on
    inject(week, t + timedelta(days=1), 200, 3, command="restarted.py")
    rot = t + timedelta(days=2)
    week.at(rot, "rotation_detected", "bot-1", profile="um-futures", old_version=3, new_version=4,
            source="vault", path=PATH, address=ADDR, action="restart")
    week.at(rot + timedelta(seconds=1), "child_exited", "bot-1", profile="um-futures", pid=200, status=0)
    inject(week, rot + timedelta(seconds=2), 201, 4, command="restarted.py")
    # one bot that kept running on v3, and one that stopped only after the period ended
    inject(week, t + timedelta(days=1, hours=1), 300, 3, command="grid.py")
    inject(week, t + timedelta(days=1, hours=2), 400, 3, command="late.py")
    week.at(NOW + timedelta(hours=3), "child_exited", "bot-1", profile="um-futures", pid=400, status=0)
    r = report(week).to_dict()
    rows = [(b["command"], b["pid"], b["running"], b["version"], b["latest_version"]) for b in r["stale_versions"]]
    assert rows == [("python grid.py", 300, True, 3, 4), ("python late.py", 400, False, 3, 4)]
    late = r["stale_versions"][1]
    assert late["exited"].startswith((NOW + timedelta(hours=3)).strftime("%Y-%m-%dT%H"))
    assert late["started"].startswith((t + timedelta(days=1, hours=2)).strftime("%Y-%m-%dT%H"))
    assert r["summary"][[s["name"] for s in r["summary"]].index("old-versions")]["count"] == 2


def test_secrets_of_two_vaults_are_kept_apart(week: Week) -> None:
    t = SINCE + timedelta(days=1)
    inject(week, t, 100, 7)  # vault-a is at v7
    inject(week, t + timedelta(hours=1), 101, 2, address="https://vault-b:8200")  # a test Vault at v2
    r = report(week).to_dict()
    rows = {p["secret"]: p for p in r["profiles"]}
    assert set(rows) == {f"{ADDR} {PATH}", f"https://vault-b:8200 {PATH}"}
    assert rows[f"https://vault-b:8200 {PATH}"]["versions"] == {"2": 1}
    assert rows[f"https://vault-b:8200 {PATH}"]["latest_version"] == 2
    assert r["stale_versions"] == []  # v2 of vault-b is not "older than v7" of vault-a
    assert "https://vault-b:8200" in render_text(report(week))


def test_a_namespace_is_part_of_the_secret(week: Week) -> None:
    t = SINCE + timedelta(days=1)
    week.at(t, "secret_fetched", "bot-1", profile="um-futures", source="vault", path=PATH, address=ADDR,
            namespace="team-a", version=3)
    week.at(t, "secret_fetched", "bot-1", profile="um-futures", source="vault", path=PATH, address=ADDR, version=9)
    secrets = {p["secret"] for p in report(week).to_dict()["profiles"]}
    assert secrets == {f"{ADDR} [team-a] {PATH}", f"{ADDR} {PATH}"}


def test_the_verdict_opens_the_text_report_and_names_what_needs_history(week: Week) -> None:
    inject(week, SINCE + timedelta(days=1), 100, 3)
    week.failure(SINCE + timedelta(days=2))
    r = report(week)
    text = render_text(r)
    lines = text.splitlines()
    assert lines[3] == "SUMMARY (! = look at it; ? = not known)"
    assert any(line.startswith("  !     1  signature failures") for line in lines[3:15])
    assert "not enough history yet" in text and "needs --vault-audit FILE" in text
    names = [i.name for i in r.summary]
    assert names == list(FAIL_ON_NAMES)
    assert r.item("new-commands").count is None and r.item("unmatched-reads").count is None
    assert "NEW COMMANDS (never seen before the period): not enough history yet" in text
    assert "read: " in lines[1] and str(week.log.path) in lines[1]


def test_fail_on_exits_1_only_for_the_named_findings(week: Week) -> None:
    inject(week, SINCE + timedelta(days=1), 100, 3)
    week.failure(SINCE + timedelta(days=2))
    week.mp.undo()
    env = {"CREDBROKER_AUDIT_LOG": str(week.log.path)}
    run = CliRunner().invoke
    assert run(cli, ["audit", "report", *ARGS], env=env).exit_code == 0  # without --fail-on: always 0
    res = run(cli, ["audit", "report", *ARGS, "--fail-on", "broken,signature-failures"], env=env)
    assert res.exit_code == 1 and "--fail-on: signature-failures" in res.output
    res = run(cli, ["audit", "report", *ARGS, "--json", "--fail-on", "broken,new-hosts,old-versions"], env=env)
    assert res.exit_code == 0 and json.loads(res.output)["signature_failures"]["total"] == 1
    res = run(cli, ["audit", "report", *ARGS, "--fail-on", "broken,unmatched-reads"], env=env)
    assert isinstance(res.exception, ConfigError) and "needs --vault-audit" in str(res.exception)
    assert run(cli, ["audit", "report", *ARGS, "--fail-on", "all"], env=env).exit_code == 1
    res = run(cli, ["audit", "report", *ARGS, "--fail-on", "signature-failure"], env=env)
    assert isinstance(res.exception, ConfigError) and "unknown name 'signature-failure'" in str(res.exception)


def test_audit_show_filters_records(week: Week) -> None:
    inject(week, SINCE + timedelta(days=1), 100, 3)
    seq = week.failure(SINCE + timedelta(days=2))
    week.at(SINCE + timedelta(days=3), "refused", "bot-1", profile="spot", error="VaultNotFound", reason="no path")
    week.mp.undo()
    env = {"CREDBROKER_AUDIT_LOG": str(week.log.path)}
    res = CliRunner().invoke(cli, ["audit", "show", "--json", "--event", "signature_failure"], env=env)
    assert res.exit_code == 0, res.output
    (rec,) = [json.loads(line) for line in res.output.splitlines()]
    assert rec["seq"] == seq and rec["data"]["code"] == -1022
    res = CliRunner().invoke(cli, ["audit", "show", "--profile", "spot"], env=env)
    assert res.exit_code == 0 and len(res.output.splitlines()) == 1 and "refused" in res.output
    assert "error=VaultNotFound" in res.output and 'reason="no path"' in res.output
    res = CliRunner().invoke(cli, ["audit", "show", "--since", (SINCE + timedelta(days=2, hours=12)).isoformat(),
                                   "--json"], env=env)
    assert [json.loads(line)["event"] for line in res.output.splitlines()] == ["refused"]
    res = CliRunner().invoke(cli, ["audit", "show", "--seq", str(seq)], env=env)
    assert res.output.split()[0] == str(seq)
    res = CliRunner().invoke(cli, ["audit", "tail", "-n", "1", "--json"], env=env)
    assert [json.loads(line)["event"] for line in res.output.splitlines()] == ["refused"]


def test_audit_tail_follow_prints_new_records_as_they_are_written(tmp_path: Path) -> None:
    from tests.helpers.auditlog import make_log

    path = tmp_path / "audit.log"
    log = make_log(path)
    log.record("secret_fetched", {"profile": "old"})
    env = {**os.environ, "CREDBROKER_AUDIT_LOG": str(path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "broker", "audit", "tail", "--follow", "--json", "-n", "1",
                             "--event", "signature_failure", "--event", "secret_fetched"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    try:
        first = json.loads(lines.get(timeout=60))
        assert first["data"]["profile"] == "old"  # the last matching record first
        log.record("sign", {"profile": "x"})  # filtered out
        log.record("signature_failure", {"profile": "um-futures", "code": -1022})
        got = json.loads(lines.get(timeout=60))  # the next line printed, whenever it comes
        assert got["event"] == "signature_failure" and got["data"]["code"] == -1022
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.vault
def test_keys_not_rotated_come_from_kv_metadata_where_readable(openbao: object, tmp_path: Path) -> None:
    from tests.conftest import OpenBao
    from tests.helpers.auditlog import make_log

    assert isinstance(openbao, OpenBao)
    version = openbao.kv_put("credbroker/binance/unrotated", api_key="AK", api_secret="S")
    (tmp_path / "credbroker.toml").write_text(
        '[profiles.old]\nsource = "vault"\npath = "secret/credbroker/binance/unrotated"\n'
        'env = { BINANCE_API_SECRET = "api_secret" }\n')
    log = tmp_path / "audit.log"
    make_log(log).record("secret_fetched", {"profile": "old"})  # a log younger than 90 days
    env = {**openbao.env(), "CREDBROKER_AUDIT_LOG": str(log)}

    def unrotated(*args: str, token: str | None = None) -> dict[str, object]:
        run_env = {**env, "VAULT_TOKEN": token} if token else env
        res = CliRunner().invoke(cli, ["audit", "report", "--json", *args], env=run_env, catch_exceptions=False)
        assert res.exit_code == 0, res.output
        data = json.loads(res.output)
        summary = {s["name"]: s for s in data["summary"]}["unrotated-keys"]
        return {"count": summary["count"], **data["unrotated"]}

    now = unrotated()
    assert now["count"] == 0 and now["note"] == "" and now["items"] == []  # known from Vault: created just now
    later = unrotated("--until", (NOW.now().astimezone() + timedelta(days=3)).isoformat(), "--rotate-days", "1")
    (row,) = later["items"]  # type: ignore[misc]
    assert later["count"] == 1 and row["source"] == "vault metadata" and row["version"] == version
    assert row["secret"] == f"{openbao.addr} secret/credbroker/binance/unrotated"
    denied = unrotated(token="not-a-token")  # metadata not readable: back to the log, too young to say
    assert denied["count"] is None and denied["note"] == "not enough history yet"


def test_terminal_escapes_from_the_log_are_shown_not_obeyed(week: Week) -> None:
    """Command lines and reasons come partly from bots: printed raw, ESC sequences could hide a line."""
    inject(week, SINCE - timedelta(days=3), 99, 3)
    inject(week, SINCE + timedelta(days=1), 100, 3, command="bot.py\x1b[2J\x1b[1A\r")
    week.at(SINCE + timedelta(days=2), "refused", "bot-1", profile="spot", error="X", reason="no\x1b]0;hi\x07 path")
    text = render_text(report(week))
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text
    assert "bot.py\\x1b[2J" in text
    res = CliRunner().invoke(cli, ["audit", "show"], env={"CREDBROKER_AUDIT_LOG": str(week.log.path)})
    assert res.exit_code == 0 and "\x1b" not in res.output and "\x07" not in res.output
    assert "\\u001b]0;hi\\u0007" in res.output and "bot.py\\u001b[2J" in res.output


@pytest.mark.vault
def test_runs_and_refusals_against_a_second_vault_are_its_own_row(openbao: object, tmp_path: Path) -> None:
    """A real run against OpenBao, and a refused one against another address: two secrets, never mixed."""
    from tests.conftest import OpenBao, credbroker_bin, free_port

    assert isinstance(openbao, OpenBao)
    openbao.kv_put("credbroker/binance/two-vaults", api_key="AK", api_secret="S")
    (tmp_path / "credbroker.toml").write_text(
        '[profiles.um]\nsource = "vault"\npath = "secret/credbroker/binance/two-vaults"\n'
        'env = { BINANCE_API_SECRET = "api_secret" }\n')
    log = tmp_path / "audit.log"
    env = {**openbao.env(), "CREDBROKER_AUDIT_LOG": str(log)}
    ok = subprocess.run([credbroker_bin(), "run", "-p", "um", "--", sys.executable, "-c", "pass"], env=env,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    other = f"http://127.0.0.1:{free_port()}"
    bad = subprocess.run([credbroker_bin(), "run", "-p", "um", "--", sys.executable, "-c", "pass"],
                         env={**env, "VAULT_ADDR": other}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 125
    res = CliRunner().invoke(cli, ["audit", "report", "--json"], env=env, catch_exceptions=False)
    rows = {p["secret"]: p for p in json.loads(res.output)["profiles"]}
    path = "secret/credbroker/binance/two-vaults"
    assert (rows[f"{openbao.addr} {path}"]["accesses"], rows[f"{openbao.addr} {path}"]["refusals"]) == (1, 0)
    assert (rows[f"{other} {path}"]["accesses"], rows[f"{other} {path}"]["refusals"]) == (0, 1)
    (group,) = json.loads(res.output)["refusals"]["groups"]
    assert group["secret"] == f"{other} {path}"


def test_follow_goes_on_in_the_new_file_when_the_writer_rotates(tmp_path: Path) -> None:
    from broker.audit.files import log_set
    from broker.audit.show import RecordFilter, follow

    from tests.helpers.auditlog import make_log

    path = tmp_path / "audit.log"
    got: list[int] = []
    done = threading.Event()

    def emit(rec: dict[str, object]) -> None:
        got.append(int(rec["seq"]))  # type: ignore[call-overload]
        if len(got) == 60:
            done.set()

    # No file yet: follow() waits for it and then reads it from its start, so no record is missed
    # whenever the thread gets to run.
    worker = threading.Thread(target=follow, args=(path, RecordFilter(), emit), kwargs={"stop": done.is_set},
                              daemon=True)
    worker.start()
    log = make_log(path, rotate="size", max_size=4096)
    written = [int(log.record("secret_fetched", {"profile": f"p{i}", "pad": "x" * 200})["seq"]) for i in range(60)]
    assert len(log_set(path)) > 2  # the writer rotated meanwhile
    assert done.wait(60), got
    worker.join(30)
    assert got == written
