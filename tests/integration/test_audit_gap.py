"""The audit log cannot be erased silently: gaps are recorded, a keyed log stops, Vault witnesses the head.

Every reproduction of the attack campaign is a test here: records cut off the
end (``head -n -3``), the log removed, the active file removed after a rotation
(with and without its head), the head removed plus the last records cut, and
the head rewritten to fit. The writer must record a ``gap`` (and a keyed log
refuse until an operator acknowledges it); ``verify`` and the weekly report must
name it. Against a real OpenBao: the keyed head is anchored at each run's end
and during long runs, and records cut after an anchor are caught even when every
local file was rewritten.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from broker.audit.anchor import place_for, read_all
from broker.audit.log import AuditLog
from broker.audit.settings import load_settings
from broker.audit.verify import verify_files
from broker.errors import AuditError
from broker.vault.settings import VaultSettings
from tests.conftest import OpenBao, credbroker_bin
from tests.helpers.auditlog import KEYED_LOG_KEY, keyed_log

KEY = KEYED_LOG_KEY
KEY_HEX = KEY.hex()


def runs(path: Path, n: int = 3, per_run: int = 3, key: bytes | None = KEY) -> None:
    for r in range(n):
        log = keyed_log(path, key)
        for i in range(per_run):
            log.record("secret_fetched", {"profile": "bot", "run": r, "i": i})
        log.close()


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_bytes().splitlines() if x.strip()]


def cut(path: Path, n: int) -> None:
    """`head -n -N $L > t; cat t > $L`: the same inode, shorter."""
    data = path.read_bytes().splitlines(keepends=True)
    with path.open("r+b") as fh:
        fh.write(b"".join(data[:-n]))
        fh.truncate()


def head_file(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def assert_refused(log: AuditLog) -> AuditError:
    with pytest.raises(AuditError) as info:
        log.check_writable()
    text = str(info.value)
    assert "\n" not in text and "credbroker audit acknowledge-gap --reason" in text
    return info.value


# -- the writer never continues silently over a gap ------------------------------------------------
def test_cut_records_then_a_run_keyed_records_a_gap_and_refuses_until_acknowledged(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.log"
    runs(log_path)
    cut(log_path, 3)
    assert verify_files(None, active=log_path, key=KEY).problem.kind == "truncated"  # type: ignore[union-attr]
    writer = keyed_log(log_path)
    assert_refused(writer)
    gap = events(log_path)[-1]
    assert gap["event"] == "gap" and gap["data"]["missing"] == [7, 9] and gap["seq"] == 10
    # Every later record is refused too, by this writer and by a new one.
    with pytest.raises(AuditError, match="acknowledge-gap"):
        writer.record("secret_fetched", {"profile": "bot"})
    assert_refused(keyed_log(log_path))
    result = verify_files(None, active=log_path, key=KEY)
    assert not result.ok and result.status == "gap" and "seq 7..9 lost" in result.summary()
    assert "NOT acknowledged" in result.summary()
    # The operator's acknowledgment is itself a record; then the log takes records again.
    acked = keyed_log(log_path).acknowledge_gap("cut by the test; checked by ops")
    assert acked is not None and acked["data"]["gap_seq"] == 10
    keyed_log(log_path).record("secret_fetched", {"profile": "bot"})
    after = verify_files(None, active=log_path, key=KEY)
    assert not after.ok and after.status == "gap" and "acknowledged at" in after.gaps[0].message
    assert [e["event"] for e in events(log_path)[-3:]] == ["gap", "gap_acknowledged", "secret_fetched"]
    assert keyed_log(log_path).acknowledge_gap("again") is None  # nothing left to acknowledge


def test_unkeyed_log_records_the_gap_and_goes_on(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.log"
    runs(log_path, key=None)
    cut(log_path, 3)
    keyed_log(log_path, key=None).record("secret_fetched", {"profile": "bot"})
    assert [e["event"] for e in events(log_path)[-2:]] == ["gap", "secret_fetched"]
    result = verify_files(None, active=log_path)
    assert not result.ok and result.gaps and "seq 7..9 lost" in result.gaps[0].message


def test_removed_log_is_a_gap(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.log"
    runs(log_path)
    log_path.unlink()  # `rm $L`: the head stays
    alone = verify_files(None, active=log_path, key=KEY)  # before any writer ran
    assert not alone.ok and alone.problem is not None and alone.problem.kind == "truncated"
    assert_refused(keyed_log(log_path))
    first = events(log_path)[0]
    assert first["event"] == "gap" and first["data"]["missing"] == [1, 9] and first["seq"] == 10
    result = verify_files(None, active=log_path, key=KEY)
    assert result.status == "gap" and "seq 1..9 lost" in result.summary()


@pytest.mark.parametrize("remove_head", [False, True], ids=["head kept", "head removed too"])
def test_removed_active_file_after_a_rotation_is_a_gap(tmp_path: Path, remove_head: bool) -> None:
    log_path = tmp_path / "audit.log"
    runs(log_path)
    assert keyed_log(log_path).rotate() is not None
    runs(log_path)  # records 10..18 in the new active file
    log_path.unlink()
    if remove_head:
        head_file(log_path).unlink()
    # verify alone: the active file is missing (before any writer ran)
    alone = verify_files(None, active=log_path, key=KEY)
    assert not alone.ok and alone.problem is not None and "active file is missing" in alone.problem.message
    assert_refused(keyed_log(log_path))
    gap = events(log_path)[0]
    assert gap["event"] == "gap" and gap["prev"] == events(next(tmp_path.glob("audit.log.2*")))[-1]["hash"]
    if not remove_head:
        assert gap["data"]["missing"] == [10, 18]
    result = verify_files(None, active=log_path, key=KEY)
    assert result.status == "gap" and result.records == 10


def test_removed_head_plus_cut_records(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.log"
    runs(log_path)
    head_file(log_path).unlink()
    cut(log_path, 2)
    alone = verify_files(None, active=log_path, key=KEY)  # no writer ran yet
    assert not alone.ok and alone.problem is not None and "head file is missing" in alone.problem.message
    assert_refused(keyed_log(log_path))
    assert events(log_path)[-1]["event"] == "gap"
    assert verify_files(None, active=log_path, key=KEY).status == "gap"


def test_head_rewritten_to_fit_a_cut_log_is_caught_in_a_keyed_log(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.log"
    runs(log_path)
    cut(log_path, 2)
    last = events(log_path)[-1]
    # What someone without the key can write: the seq and hash they can read, no valid MAC.
    head_file(log_path).write_text(json.dumps({"v": 1, "seq": last["seq"], "hash": last["hash"],
                                               "file": "audit.log"}) + "\n")
    alone = verify_files(None, active=log_path, key=KEY)
    assert not alone.ok and alone.problem is not None and alone.problem.kind == "forged"
    assert_refused(keyed_log(log_path))
    assert "not authenticated" in events(log_path)[-1]["data"]["reason"]


def test_the_keyed_head_carries_a_mac_and_an_intact_log_still_verifies(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.log"
    runs(log_path)
    head = json.loads(head_file(log_path).read_text())
    assert len(head["mac"]) == 64 and head["seq"] == 9
    keyed_log(log_path).check_writable()  # no gap: nothing is written
    result = verify_files(None, active=log_path, key=KEY)
    assert result.ok and result.records == 9 and not result.gaps


def test_writers_of_one_host_agree_and_a_crash_before_the_head_update_is_no_gap(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.log"
    a, b = keyed_log(log_path), keyed_log(log_path)
    for i in range(5):
        a.record("secret_fetched", {"i": i})
        b.record("secret_fetched", {"i": i})
    # A writer cut off between its write and its head update leaves records after the head.
    old_head = head_file(log_path).read_bytes()
    a.record("secret_fetched", {"i": "last"})
    head_file(log_path).write_bytes(old_head)
    keyed_log(log_path).record("secret_fetched", {"i": "next"})
    assert "gap" not in [e["event"] for e in events(log_path)]
    assert verify_files(None, active=log_path, key=KEY).ok


def test_report_shows_the_gap(tmp_path: Path) -> None:
    from datetime import datetime, timedelta, timezone

    from broker.audit.report import build_report, render_text

    log_path = tmp_path / "audit.log"
    runs(log_path)
    cut(log_path, 3)
    with pytest.raises(AuditError):
        keyed_log(log_path).check_writable()
    now = datetime.now(timezone.utc)
    report = build_report([log_path], since=now - timedelta(days=7), until=now + timedelta(minutes=1), key=KEY,
                          active=log_path)
    data = report.to_dict()
    assert data["events"].get("gap") == 1 and data["chain"]["gaps"]
    assert report.item("gaps").count == 1 and report.item("broken").count == 1  # the verdict says it first
    text = render_text(report)
    assert "AUDIT LOG GAPS (records lost: treat as tampering): 1" in text and "seq 7..9 lost" in text


# -- end to end: `credbroker run` fails closed; the acknowledgment is a command ---------------------
def test_issue_repro_cut_then_run_fails_closed_until_acknowledged(openbao: OpenBao, tmp_path: Path) -> None:
    log_path = tmp_path / "state" / "audit.log"
    kv = f"credbroker/gap-{secrets.token_hex(3)}"
    openbao.kv_put(kv, a="value-a")
    env = openbao.env()
    env.update(CREDBROKER_AUDIT_KEY=KEY_HEX, CREDBROKER_AUDIT_LOG=str(log_path))
    exe = credbroker_bin()
    run = [exe, "run", "--vault-path", f"secret/{kv}", "--env", "A=a", "--", "true"]
    for _ in range(3):
        res = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
    cut(log_path, 3)
    res = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 125
    assert res.stderr.count("\n") == 1 and "acknowledge-gap --reason" in res.stderr
    assert "secret_fetched" not in [e["event"] for e in events(log_path)[-1:]]  # stopped before the fetch
    verify = subprocess.run([exe, "audit", "verify"], env=env, capture_output=True, text=True, timeout=60)
    assert verify.returncode == 1 and "gap" in verify.stdout and "NOT acknowledged" in verify.stdout
    ack = subprocess.run([exe, "audit", "acknowledge-gap", "--reason", "test cut"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert ack.returncode == 0 and "acknowledged" in ack.stdout, ack.stderr
    res = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    verify = subprocess.run([exe, "audit", "verify", "--json"], env=env, capture_output=True, text=True,
                            timeout=60)
    out = json.loads(verify.stdout)
    assert verify.returncode == 1 and out["status"] == "gap" and "acknowledged at" in out["gaps"][0]["message"]
    acks = [e for e in events(log_path) if e["event"] == "gap_acknowledged"]
    assert len(acks) == 1 and acks[0]["data"]["reason"] == "test cut"


def test_issue_repro_rm_log_then_run_is_not_intact(openbao: OpenBao, tmp_path: Path) -> None:
    log_path = tmp_path / "state" / "audit.log"
    kv = f"credbroker/gap-{secrets.token_hex(3)}"
    openbao.kv_put(kv, a="value-a")
    env = openbao.env()
    env.update(CREDBROKER_AUDIT_KEY=KEY_HEX, CREDBROKER_AUDIT_LOG=str(log_path))
    exe = credbroker_bin()
    run = [exe, "run", "--vault-path", f"secret/{kv}", "--env", "A=a", "--", "true"]
    res = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    log_path.unlink()
    head_file(log_path).unlink()  # everything local gone: only the Vault anchor remembers
    res = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr  # nothing local to tell it from a new log ...
    verify = subprocess.run([exe, "audit", "verify"], env=env, capture_output=True, text=True, timeout=60)
    assert verify.returncode == 1, verify.stdout  # ... but the anchor does
    assert "Vault" in verify.stdout and "anchor" in verify.stdout


# -- the Vault witness ---------------------------------------------------------------------------
def anchors_of(server: OpenBao, log_path: Path) -> list[Any]:
    place = place_for(load_settings({"path": str(log_path)}, {}), keyed_log(log_path).key_id)
    assert place is not None
    return read_all(VaultSettings.from_env(server.env()), place, KEY)


def test_run_end_anchors_the_head_in_vault(openbao: OpenBao, tmp_path: Path) -> None:
    log_path = tmp_path / "state" / "audit.log"
    kv = f"credbroker/anchor-{secrets.token_hex(3)}"
    openbao.kv_put(kv, a="value-a")
    env = openbao.env()
    env.update(CREDBROKER_AUDIT_KEY=KEY_HEX, CREDBROKER_AUDIT_LOG=str(log_path))
    res = subprocess.run([credbroker_bin(), "run", "--vault-path", f"secret/{kv}", "--env", "A=a", "--", "true"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "WARNING" not in res.stderr, res.stderr
    last = events(log_path)[-1]
    latest = anchors_of(openbao, log_path)[0]
    assert (latest.seq, latest.hash, latest.mac_ok) == (last["seq"], last["hash"], True)
    assert latest.log == str(log_path)


def test_anchor_catches_records_cut_after_it_when_every_local_file_was_rewritten(openbao: OpenBao,
                                                                                  tmp_path: Path) -> None:
    log_path = tmp_path / "audit.log"
    env = openbao.env()
    log = keyed_log(log_path, env=env)
    for i in range(3):
        log.record("secret_fetched", {"i": i})
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("audit.log")}
    for i in range(3):
        log.record("secret_fetched", {"i": i + 3})
    assert log.anchor_now()
    # Roll every local file back to the earlier state: locally, it verifies.
    for name, data in saved.items():
        (tmp_path / name).write_bytes(data)
    assert verify_files(None, active=log_path, key=KEY).ok
    anchors = anchors_of(openbao, log_path)
    result = verify_files(None, active=log_path, key=KEY, anchors=anchors, anchor_place="x")
    assert not result.ok and result.problem is not None and result.problem.kind == "truncated"
    assert "anchor for seq 6" in result.problem.message
    # An untouched log matches its anchors.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    other = keyed_log(fresh / "audit.log", env=env)
    other.record("secret_fetched", {"i": 0})
    assert other.anchor_now()
    good = verify_files(None, active=fresh / "audit.log", key=KEY, anchors=anchors_of(openbao, fresh / "audit.log"))
    assert good.ok and good.anchors_checked == 1 and "1 Vault anchor(s) matched" in good.summary()


def test_verify_cli_uses_the_anchors_by_default_and_flags_a_forged_one(openbao: OpenBao, tmp_path: Path) -> None:
    log_path = tmp_path / "audit.log"
    env = openbao.env()
    env.update(CREDBROKER_AUDIT_KEY=KEY_HEX, CREDBROKER_AUDIT_LOG=str(log_path))
    log = keyed_log(log_path, env=env)
    log.record("secret_fetched", {"i": 0})
    assert log.anchor_now()
    exe = credbroker_bin()
    ok = subprocess.run([exe, "audit", "verify"], env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "1 Vault anchor(s) matched" in ok.stdout, ok.stdout + ok.stderr
    # Someone with write access to the anchor but without the audit key.
    place = place_for(load_settings({"path": str(log_path)}, {}), log.key_id)
    assert place is not None
    openbao.client().secrets.kv.v2.create_or_update_secret(
        path=place.path, mount_point=place.mount,
        secret={"v": 1, "seq": 1, "hash": "0" * 64, "kid": log.key_id, "log": str(log_path), "mac": "0" * 64})
    bad = subprocess.run([exe, "audit", "verify"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "forged" in bad.stdout and "MAC" in bad.stdout
    skipped = subprocess.run([exe, "audit", "verify", "--no-vault-anchors"], env=env, capture_output=True,
                             text=True, timeout=60)
    assert skipped.returncode == 0, skipped.stdout


def test_anchoring_during_a_long_run_at_the_interval(openbao: OpenBao, tmp_path: Path) -> None:
    log_path = tmp_path / "audit.log"
    log = keyed_log(log_path, env=openbao.env(), anchor_interval="1s")
    log.record("secret_fetched", {"i": 0})
    deadline = time.monotonic() + 60
    while True:  # the interval thread anchors without anyone asking
        got = anchors_of(openbao, log_path)
        if got and got[0].seq == 1:
            break
        assert time.monotonic() < deadline, "no anchor within 60 s"
        time.sleep(0.1)
    log.record("secret_fetched", {"i": 1})
    while True:
        got = anchors_of(openbao, log_path)
        if got and got[0].seq == 2:
            break
        assert time.monotonic() < deadline, "no second anchor within 60 s"
        time.sleep(0.1)
    assert all(a.mac_ok for a in got) and len(got) == 2
    assert log.anchorer is not None
    log.anchorer.stop()


def test_anchoring_failure_is_recorded_and_warned_and_the_bot_runs_on(openbao: OpenBao, tmp_path: Path) -> None:
    log_path = tmp_path / "state" / "audit.log"
    kv = f"credbroker/anchor-{secrets.token_hex(3)}"
    openbao.kv_put(kv, a="value-a")
    config = tmp_path / "credbroker.toml"
    config.write_text(f'[audit]\npath = "{log_path}"\nanchor = "no-such-mount/credbroker-audit"\n')
    env = openbao.env()
    env.update(CREDBROKER_AUDIT_KEY=KEY_HEX, CREDBROKER_CONFIG=str(config))
    res = subprocess.run([credbroker_bin(), "run", "--vault-path", f"secret/{kv}", "--env", "A=a", "--",
                          "sh", "-c", "exit 3"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 3  # the bot's own status, whatever the anchoring did
    warnings = [line for line in res.stderr.splitlines() if "could not anchor" in line]
    assert len(warnings) == 1 and "no-such-mount" in warnings[0]
    failed = [e for e in events(log_path) if e["event"] == "anchor_failed"]
    assert len(failed) == 1 and failed[0]["data"]["place"].startswith("no-such-mount/")
    assert "value-a" not in log_path.read_text() and "value-a" not in res.stderr


def test_no_anchoring_without_vault_or_key_or_when_off(tmp_path: Path) -> None:
    assert keyed_log(tmp_path / "a.log", env={}).anchorer is None  # no Vault address
    assert keyed_log(tmp_path / "b.log", key=None, env={"VAULT_ADDR": "http://127.0.0.1:1"}).anchorer is None
    assert keyed_log(tmp_path / "c.log", env={"VAULT_ADDR": "http://127.0.0.1:1"}, anchor="off").anchorer is None
    assert keyed_log(tmp_path / "d.log", env={"VAULT_ADDR": "http://127.0.0.1:1"}).anchorer is not None


@pytest.mark.parametrize("value", ["secret", "secret/../x", "secret//x", "secret/%2e%2e", 5])
def test_bad_anchor_setting_is_a_one_line_config_error(tmp_path: Path, value: object) -> None:
    from broker.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\[audit\] anchor"):
        load_settings({"path": str(tmp_path / "a.log"), "anchor": value}, {})


def test_setup_vault_anchor_host_attaches_the_anchor_policy(fresh_openbao: OpenBao, tmp_path: Path) -> None:
    openbao = fresh_openbao
    from tests.helpers.vaultadmin import Scripts

    scripts = Scripts(openbao, tmp_path)
    res = scripts.run("setup-vault", "--no-audit", "--no-secret-id", "--anchor-host", "bot-host.example", "zeta")
    assert res.returncode == 0, res.stderr
    role = openbao.client().read("auth/approle/role/credbroker-zeta")["data"]
    assert "credbroker-audit-anchor-bot-host.example" in role["token_policies"]
    text = openbao.client().sys.read_acl_policy("credbroker-audit-anchor-bot-host.example")["data"]["policy"]
    assert 'path "secret/data/credbroker-audit/bot-host.example/*"' in text and "__HOST__" not in text
    bad = scripts.run("setup-vault", "--no-audit", "--anchor-host", "../x", "zeta")
    assert bad.returncode == 2 or bad.returncode == 1


def test_the_bots_child_environment_holds_no_anchor_powers() -> None:
    # The anchor MAC key is the audit key: it never reaches a child (stripped like every broker credential).
    from broker.config import BROKER_CREDENTIAL_VARS

    assert "CREDBROKER_AUDIT_KEY" in BROKER_CREDENTIAL_VARS


def test_removing_every_local_file_is_still_seen_by_verify_with_anchors(openbao: OpenBao, tmp_path: Path) -> None:
    log_path = tmp_path / "audit.log"
    log = keyed_log(log_path, env=openbao.env())
    log.record("secret_fetched", {"i": 0})
    assert log.anchor_now()
    anchors = anchors_of(openbao, log_path)
    for p in list(tmp_path.iterdir()):
        if p.name.startswith("audit.log"):
            p.unlink() if p.is_file() else shutil.rmtree(p)
    result = verify_files(None, active=log_path, key=KEY, anchors=anchors)
    assert not result.ok and result.problem is not None and result.problem.kind == "truncated"
    assert os.path.exists(log_path) is False


def test_the_interval_thread_never_takes_the_supervisors_signals(tmp_path: Path) -> None:
    import signal

    log = keyed_log(tmp_path / "audit.log", env={"VAULT_ADDR": "http://127.0.0.1:1"}, anchor_interval="1h")
    log.record("secret_fetched", {"i": 0})
    anchorer = log.anchorer
    assert anchorer is not None and anchorer._thread is not None and anchorer._thread.native_id is not None
    status = Path(f"/proc/self/task/{anchorer._thread.native_id}/status").read_text()
    blocked = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
        assert blocked & (1 << (sig - 1)), sig
    anchorer.stop()
    log.anchorer = None  # nothing to anchor at exit: the address is not a server
