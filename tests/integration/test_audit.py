"""The audit log writer: location, permissions, record shape, secret guard, batching,
rotation, keyed chain continuity, several processes at once, kill -9 mid-write."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from broker.audit import open_log
from broker.audit.chain import GENESIS, parse_header
from broker.audit.log import AuditLog
from broker.audit.settings import AuditSettings, load_settings
from broker.audit.verify import verify_files
from broker.errors import AuditError, ConfigError
from broker.secret import Credentials, Origin, Secret

# Shared by the other test_audit_* files (tests/helpers/auditlog.py): re-exported for this file's tests.
from tests.helpers.auditlog import KEY, KEY_HEX, lines, make_log, records  # noqa: E402,F401


# -- location and permissions --------------------------------------------------------------
def test_default_location_is_the_xdg_state_folder(tmp_path: Path) -> None:
    log = open_log()
    assert log.path == tmp_path / "state" / "credbroker" / "audit.log"
    log.record("secret_fetched", {"profile": "p"})
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.path.parent.stat().st_mode) == 0o700


def test_location_order_config_then_env_then_xdg(tmp_path: Path) -> None:
    env = {"CREDBROKER_AUDIT_LOG": str(tmp_path / "env.log"), "XDG_STATE_HOME": str(tmp_path / "x")}
    assert load_settings({"path": str(tmp_path / "cfg.log")}, env).path == tmp_path / "cfg.log"
    assert load_settings(None, env).path == tmp_path / "env.log"
    assert load_settings(None, {"XDG_STATE_HOME": str(tmp_path / "x")}).path == tmp_path / "x/credbroker/audit.log"
    assert load_settings(None, {"HOME": str(tmp_path)}).path == tmp_path / ".local/state/credbroker/audit.log"


def test_permissions_hold_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        log = make_log(tmp_path / "deep" / "er" / "audit.log")
        log.record("secret_fetched", {"profile": "p"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "deep/er/audit.log").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "deep/er").stat().st_mode) == 0o700


@pytest.mark.parametrize(
    "table, needle",
    [
        ({"colour": "red"}, "unknown key"),
        ({"rotate": "hourly"}, "rotate"),
        ({"max_size": "lots"}, "max_size"),
        ({"keep": "forever"}, "keep"),
        ({"key": "s3:bucket"}, "key"),
        ({"key": "vault:nomount#f"}, "key"),
        ({"key": "keyring:onlyservice"}, "key"),
        ({"work_hours": "9 to 5"}, "work_hours"),
        ({"path": ""}, "path"),
    ],
)
def test_bad_audit_table_is_one_clear_config_error(table: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(table, {})
    assert needle in str(info.value) and "\n" not in str(info.value)


# -- records ---------------------------------------------------------------------------------
def test_record_shape_and_chain(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.log")
    r1 = log.record("secret_fetched", {"profile": "um", "version": 3, "fields": ["api_key", "api_secret"]})
    r2 = log.record("child_exited", {"profile": "um", "status": 0, "duration_s": 1.5})
    assert (r1["seq"], r2["seq"]) == (1, 2)
    assert r1["prev"] == GENESIS and r2["prev"] == r1["hash"]
    assert r1["ts"].endswith("Z") and r1["data"]["fields"] == ["api_key", "api_secret"]
    on_disk = records(tmp_path / "audit.log")
    assert on_disk[0] == r1 and on_disk[1] == r2
    assert {"host", "pid", "user", "alg"} <= set(on_disk[0])
    head = json.loads((tmp_path / "audit.log.head").read_text())
    assert head["seq"] == 2 and head["hash"] == r2["hash"]


def test_a_secret_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.log")
    value = b"sk_live_never_in_the_log_123"
    secret = Secret(value)
    creds = Credentials("p", Origin("vault", "secret/x", 1), {"api_secret": Secret(value)})
    for fields in ({"value": secret}, {"nested": {"deep": [secret]}}, {"creds": creds}, {"raw": value}):
        with pytest.raises(AuditError) as info:
            log.record("secret_fetched", fields)
        assert value.decode() not in str(info.value)
    assert not (tmp_path / "audit.log").exists() or value not in (tmp_path / "audit.log").read_bytes()


@pytest.mark.parametrize("event", ["", "Secret", "has space", "x" * 65, "1abc", "signed\n"])
def test_bad_event_names(tmp_path: Path, event: str) -> None:
    with pytest.raises(AuditError):
        make_log(tmp_path / "audit.log").record(event, {})


def test_unserialisable_values_are_refused(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.log")
    for bad in ({"x": {1, 2}}, {"x": float("nan")}, {1: "int key"}, {"x": object()}):
        with pytest.raises(AuditError):
            log.record("sign", bad)  # type: ignore[arg-type]


# Flat records (every signature's: str keys, str/int/bool/None values) skip check_fields' walk.
FLAT_RECORDS: list[dict[str, Any]] = [
    {},
    {"profile": "um", "pid": 4242, "endpoint": "/fapi/v1/order", "method": None, "params": "symbol,side",
     "symbol": "BTCUSDT", "quantity": "0.01", "batch_orders": 3},
    {"z": True, "a": False, "n": -7, "big": 10**40, "none": None, "list": ["a", 1, None, True]},
    {"é-key": "non-ASCII ü €  and \u2028", "esc": 'quote " backslash \\ newline \n tab \t \x00 \x7f'},
]


def test_a_flat_record_is_a_copy_and_anything_else_is_still_checked(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.log")
    fields: dict[str, Any] = {"profile": "um", "pid": 1}
    rec = log.record("signed", fields, durable=False)
    fields["pid"] = 2
    assert rec["data"] == {"profile": "um", "pid": 1}
    for bad in ({"x": Secret(b"s")}, {"x": [Secret(b"s")]}, {"x": b"raw"}, {1: "int key"}, {"x": float("inf")}):
        with pytest.raises(AuditError):
            log.record("signed", bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("fields", FLAT_RECORDS + [{"f": 2.5e-9, "nested": {"b": [1, {"a": None}]}}])
def test_the_reused_record_encoder_writes_what_the_general_one_does(fields: dict[str, Any]) -> None:
    from broker.audit.log import _encode_record, _encode_rest

    body = {"data": fields, "host": "host-ü", "pid": 42, "user": "trader"}
    assert _encode_record(body) == _encode_rest(body)
    with pytest.raises(ValueError):
        _encode_record({"data": {"x": float("inf")}})


def test_flat_records_on_disk_are_what_the_chain_functions_build(tmp_path: Path) -> None:
    """Every line, rebuilt from its parsed JSON with the chain's own functions, is the same bytes:
    the lean path changes nothing the verifier or an existing log depends on."""
    from broker.audit.chain import build_prefix, encode_rest, finish_line, make_hasher

    for key in (None, KEY):
        path = tmp_path / f"{'keyed' if key else 'plain'}.log"
        log = make_log(path, key)
        for fields in FLAT_RECORDS + [{"x": 1.5, "nested": {"a": [1, 2]}}]:
            log.record("signed", fields, durable=False)
        log.flush()
        alg, hasher = make_hasher(key)
        for line in lines(path):
            rec = json.loads(line)
            rest = encode_rest({k: rec[k] for k in ("data", "host", "pid", "user")})
            prefix = build_prefix(rec["seq"], rec["ts"], rec["event"], rec["prev"], alg, rec.get("kid"), rest)
            assert finish_line(prefix, hasher(prefix)) == line
        assert verify_files(None, active=path, key=key).ok


def test_open_log_returns_one_shared_writer_per_log() -> None:
    assert open_log() is open_log()
    assert open_log({"rotate": "daily"}) is not open_log()


# -- batching --------------------------------------------------------------------------------
def test_batched_records_are_group_committed_in_order(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.log")
    with log.batch():
        recs = [log.record("sign", {"i": i}, durable=False) for i in range(50)]
        assert not (tmp_path / "audit.log").exists()  # still in memory
    assert [r["seq"] for r in recs] == list(range(1, 51))
    assert [r["data"]["i"] for r in records(tmp_path / "audit.log")] == list(range(50))


def test_a_durable_record_flushes_pending_ones_first(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.log")
    log.record("sign", {"i": 0}, durable=False)
    log.record("secret_fetched", {"profile": "p"})
    assert [r["event"] for r in records(tmp_path / "audit.log")] == ["sign", "secret_fetched"]


def test_pending_records_are_flushed_at_interpreter_exit(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        from broker.audit import open_log
        log = open_log({{"path": {str(tmp_path / 'audit.log')!r}}})
        for i in range(10):
            log.record("sign", {{"i": i}}, durable=False)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert len(records(tmp_path / "audit.log")) == 10


# -- rotation ----------------------------------------------------------------------------------
def test_size_rotation_keeps_one_chain_across_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = make_log(path, rotate="size", max_size=4096)
    for i in range(60):
        log.record("secret_fetched", {"profile": "p", "i": i, "pad": "x" * 100})
    rotated = sorted(tmp_path.glob("audit.log.2*"))
    assert len(rotated) >= 2
    for f in rotated:
        assert f.stat().st_size <= 4096
    result = verify_files(None, active=path)
    assert result.ok and result.records == 60 and len(result.files) == len(rotated) + 1
    first_of_active = parse_header(lines(path)[0].rstrip(b"\n"))
    last_of_rotated = parse_header(lines(rotated[-1])[-1].rstrip(b"\n"))
    assert first_of_active is not None and last_of_rotated is not None
    assert first_of_active.prev == last_of_rotated.digest


def test_weekly_rotation_when_the_week_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import broker.audit.log as logmod

    path = tmp_path / "audit.log"
    log = make_log(path)
    monkeypatch.setattr(logmod, "utc_timestamp", lambda now=None: "2020-01-01T10:00:00.000000Z")
    log.record("secret_fetched", {"profile": "p"})
    monkeypatch.undo()
    log.record("secret_fetched", {"profile": "p"})  # now is years later: a new week
    assert len(list(tmp_path.glob("audit.log.2*"))) == 1
    assert verify_files(None, active=path).ok


def test_another_writer_follows_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    a, b = make_log(path), make_log(path)
    a.record("sign", {"w": "a"})
    b.record("sign", {"w": "b"})
    a.rotate()
    b.record("sign", {"w": "b2"})  # b's fd points at the rotated file: it must reopen
    a.record("sign", {"w": "a2"})
    assert [r["data"]["w"] for r in records(path)] == ["b2", "a2"]
    result = verify_files(None, active=path)
    assert result.ok and result.records == 4


# -- keyed chain continuity ----------------------------------------------------------------------
def test_keyed_log_refuses_an_unkeyed_writer_and_another_key(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    make_log(path, KEY).record("sign", {})
    with pytest.raises(AuditError, match="keyed"):
        make_log(path).record("sign", {})
    with pytest.raises(AuditError, match="key id"):
        make_log(path, b"k" * 32).record("sign", {})
    assert len(lines(path)) == 1


def test_adding_a_key_later_is_an_explicit_marked_switch(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    make_log(path).record("sign", {"n": 1})
    keyed = make_log(path, KEY)
    with pytest.raises(AuditError, match="enable-key"):
        keyed.record("sign", {"n": 2})  # never implicit: it would bless a re-chained file
    assert keyed.enable_key() is True
    keyed.record("sign", {"n": 2})
    assert keyed.enable_key() is False
    assert [r["event"] for r in records(path)] == ["sign", "audit_keyed", "sign"]
    assert verify_files(None, active=path, key=KEY).ok


def test_env_key_is_hex_and_is_never_echoed(tmp_path: Path) -> None:
    from broker.audit.keys import from_env

    assert from_env({"CREDBROKER_AUDIT_KEY": KEY_HEX}).reveal() == KEY  # type: ignore[union-attr]
    with pytest.raises(AuditError) as info:
        from_env({"CREDBROKER_AUDIT_KEY": "not-hex-but-a-secret-value-0123456789"})
    assert "not-hex-but-a-secret" not in str(info.value)
    with pytest.raises(AuditError):
        from_env({"CREDBROKER_AUDIT_KEY": "abcd"})  # too short
    log = open_log(env={**os.environ, "CREDBROKER_AUDIT_KEY": KEY_HEX, "XDG_STATE_HOME": str(tmp_path / "k")})
    rec = log.record("sign", {})
    assert rec["alg"] == "hmac-sha256" and len(rec["kid"]) == 16
    assert KEY_HEX not in repr(log) and KEY_HEX.encode() not in log.path.read_bytes()


# -- many writers, and crashes -------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys
    from broker.audit import open_log
    path, name, n, batched = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    log = open_log({"path": path, "rotate": "size", "max_size": sys.argv[5]})
    for i in range(n):
        log.record("sign" if batched else "secret_fetched", {"writer": name, "i": i, "pad": "y" * 200},
                   durable=not batched)
    log.flush()
""")


def test_several_processes_writing_at_once_lose_and_corrupt_nothing(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"w{k}", "300", str(k % 2), "200KiB"])
        for k in range(6)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0
    result = verify_files(None, active=path)
    assert result.ok, result.summary()
    assert result.records == 1800 and result.first_seq == 1 and result.last_seq == 1800
    seen = []
    for f in result.files:
        seen += [(r["data"]["writer"], r["data"]["i"]) for r in records(Path(f))]
    assert sorted(seen) == sorted((f"w{k}", i) for k in range(6) for i in range(300))


CRASHER = textwrap.dedent("""
    import sys
    from broker.audit import open_log
    log = open_log({"path": sys.argv[1], "rotate": "size", "max_size": "256KiB"})
    i = 0
    while True:
        for _ in range(200):
            log.record("sign", {"i": i, "pad": "z" * 2000}, durable=False)
            i += 1
        log.flush()
""")


def _total_size(folder: Path) -> int:
    total = 0
    for f in folder.glob("audit.log*"):
        try:
            total += f.stat().st_size
        except FileNotFoundError:
            pass  # renamed by a rotation between glob and stat
    return total


def test_kill_9_during_heavy_writing_leaves_a_verifiable_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    for round_no in range(3):
        proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(path)])
        deadline = time.monotonic() + 120
        start = _total_size(tmp_path)
        while _total_size(tmp_path) < start + 1_500_000:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        result = verify_files(None, active=path)
        assert result.ok, f"round {round_no}: {result.summary()}"
        # active_missing: killed between a rotation's rename and the new active file.
        assert {n.kind for n in result.notes} <= {"partial_tail", "after_head", "active_missing"}
    # The last kill may itself have cut a line mid-write (a SIGKILL during write(2) leaves a
    # short write): a writer recovers that tail first, so the one planted below is the only
    # partial line and its length is known.
    make_log(path).record("secret_fetched", {"profile": "before-crash"})
    assert path.read_bytes().endswith(b"\n")
    # A simulated crash mid-line, then a new writer: recorded, written past, still verifies.
    # (The last kill may itself have left a partial line: the simulated one extends it.)
    data = path.read_bytes() if path.exists() else b""
    left = len(data) - (data.rfind(b"\n") + 1)
    with path.open("ab") as fh:
        fh.write(b'{"v":1,"seq":999999,"ts":"2026-')
    cut = verify_files(None, active=path)
    assert cut.ok and any(n.kind == "partial_tail" and "crash" in n.message for n in cut.notes)
    rec = make_log(path).record("secret_fetched", {"profile": "after-crash"})
    after = verify_files(None, active=path)
    assert after.ok and after.last_seq == rec["seq"]
    assert any("recorded by the next writer" in n.message for n in after.notes)
    marker = [json.loads(x) for x in lines(path) if b'"event":"partial_tail"' in x]
    assert marker and marker[-1]["data"]["bytes"] == left + len(b'{"v":1,"seq":999999,"ts":"2026-')


def test_a_forked_child_does_not_write_the_parents_pending_batch(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.log")
    log.record("sign", {"who": "parent"}, durable=False)
    pid = os.fork()
    if pid == 0:  # the child: a normal exit runs atexit, which flushes what it holds
        try:
            log.record("sign", {"who": "child"})
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    log.flush()
    assert sorted(r["data"]["who"] for r in records(tmp_path / "audit.log")) == ["child", "parent"]
    assert verify_files(None, active=tmp_path / "audit.log").ok


def test_an_unwritable_log_fails_closed_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("x")
    with pytest.raises(AuditError) as info:
        make_log(tmp_path / "not-a-folder" / "audit.log").record("secret_fetched", {"profile": "p"})
    assert "audit log folder" in str(info.value) and "\n" not in str(info.value)
    # A symlink planted where the log goes is not followed (O_NOFOLLOW).
    (tmp_path / "logs").mkdir(mode=0o700)
    target = tmp_path / "elsewhere.txt"
    target.write_text("")
    (tmp_path / "logs" / "audit.log").symlink_to(target)
    with pytest.raises(AuditError, match="cannot write the audit log"):
        make_log(tmp_path / "logs" / "audit.log").record("secret_fetched", {"profile": "p"})
    assert target.read_text() == ""


@pytest.mark.parametrize("fsync", ["every", "group"])
def test_an_active_file_removed_between_two_batches_is_recorded_as_a_gap(tmp_path: Path, fsync: str) -> None:
    """The writer's steady-state commit (same file as it left it) must not hide a removed file: the
    next batch reopens it and writes the gap record first, as any other writer would."""
    path = tmp_path / "audit.log"
    log = make_log(path, fsync=fsync)
    for n in (1, 2):
        log.record("signed", {"n": n}, durable=False)
        log.flush()
    path.unlink()
    log.record("signed", {"n": 3}, durable=False)
    log.flush()
    assert [r["event"] for r in records(path)] == ["gap", "signed"]
    assert records(path)[1]["data"] == {"n": 3}


def test_a_file_that_is_not_an_audit_log_is_neither_written_nor_made_private(tmp_path: Path) -> None:
    """CREDBROKER_AUDIT_LOG=/etc/passwd under root once made /etc/passwd 0600 (the writer tightens a
    permissive log before it reads it) and then refused it as damaged: every other user lost their
    lookups. A file whose first line is not a record is now refused before anything is done to it."""
    other = tmp_path / "passwd"
    content = b"root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n"
    other.write_bytes(content)
    other.chmod(0o644)
    with pytest.raises(AuditError, match="is not a credbroker audit log") as err:
        make_log(other).record("secret_fetched", {"profile": "p"})
    assert "\n" not in str(err.value) and "CREDBROKER_AUDIT_LOG" in str(err.value.remedy)
    assert other.read_bytes() == content and other.stat().st_mode & 0o777 == 0o644
    assert not Path(f"{other}.head").exists()
    # The first bytes of a record, cut short by a crash: still a log (its partial line is recovered).
    cut = tmp_path / "cut.log"
    cut.write_bytes(b'{"v":1,"se')
    make_log(cut).record("secret_fetched", {"profile": "p"})
    assert b'"event":"partial_tail"' in cut.read_bytes()
