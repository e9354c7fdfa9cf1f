"""`credbroker audit verify` and `prune`: every tamper case is named, a crash is not tampering."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.audit.chain import build_prefix, encode_rest, finish_line, make_hasher, parse_header
from broker.audit.prune import prune
from broker.audit.verify import verify_files
from broker.cli import cli
from broker.errors import AuditError, ConfigError

from tests.helpers.auditlog import KEY, KEY_HEX, lines, make_log, records

N = 30


def _write(path: Path, key: bytes | None) -> None:
    log = make_log(path, key)
    for i in range(N):
        log.record("secret_fetched", {"profile": "um", "i": i, "version": 3})
    log.close()


def _forge(after: bytes, event: str = "secret_fetched", seq_delta: int = 1) -> bytes:
    """A well-formed record chained after ``after`` with a correct *unkeyed* hash."""
    h = parse_header(after.rstrip(b"\n"))
    assert h is not None
    alg, digest = make_hasher(None)
    prefix = build_prefix(h.seq + seq_delta, h.ts, event, h.digest, alg, None,
                          encode_rest({"data": {"profile": "um", "forged": True}, "host": "x", "pid": 1, "user": "x"}))
    return finish_line(prefix, digest(prefix))


def _rechain_unkeyed(ls: list[bytes]) -> list[bytes]:
    """What someone who can edit the file but lacks the key can do: recompute every hash."""
    alg, digest = make_hasher(None)
    prev, out = "0" * 64, []
    for raw in ls:
        h = parse_header(raw.rstrip(b"\n"))
        assert h is not None
        rest = h.prefix.split(b'"alg":', 1)[1].split(b",", 1)[1]
        if rest.startswith(b'"kid"'):
            rest = rest.split(b",", 1)[1]
        rest = rest.replace(b'"i":5,', b'"i":500,')  # the edit the rechaining hides
        prefix = build_prefix(h.seq, h.ts, h.event, prev, alg, None, rest.decode())
        prev = digest(prefix)
        out.append(finish_line(prefix, prev))
    return out


Tamper = Callable[[list[bytes]], bytes]

CASES: list[tuple[str, Tamper, str, int]] = [
    ("edit a field", lambda ls: b"".join(ls).replace(b'"i":5,', b'"i":6,'), "edited", 6),
    ("delete a line", lambda ls: b"".join(ls[:10] + ls[11:]), "deleted", 11),
    ("delete the first line", lambda ls: b"".join(ls[1:]), "deleted", 1),
    ("swap two lines", lambda ls: b"".join(ls[:10] + [ls[11], ls[10]] + ls[12:]), "reordered", 11),
    ("move a line further", lambda ls: b"".join(ls[:10] + ls[11:15] + [ls[10]] + ls[15:]), "reordered", 11),
    ("truncate whole records", lambda ls: b"".join(ls[:25]), "truncated", 26),
    ("truncate mid-record", lambda ls: b"".join(ls[:29]) + ls[29][:40], "truncated", 30),
    ("insert text", lambda ls: b"".join(ls[:10] + [b"hello\n"] + ls[10:]), "inserted", 11),
    ("insert a copy", lambda ls: b"".join(ls[:10] + [ls[9]] + ls[10:]), "inserted", 11),
    ("insert a forged record", lambda ls: b"".join(ls[:10] + [_forge(ls[9])] + ls[10:]), "inserted", 11),
    ("append a record with a bad hash", lambda ls: b"".join(ls) + _forge(ls[-1]).replace(b'"forged":true',
                                                                                        b'"forged":false'),
     "edited", 31),
]


@pytest.mark.parametrize("name, tamper, kind, line", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
def test_every_tamper_case_is_named_with_its_line(
    tmp_path: Path, name: str, tamper: Tamper, kind: str, line: int, keyed: bool
) -> None:
    path = tmp_path / "audit.log"
    key = KEY if keyed else None
    _write(path, key)
    assert verify_files(None, active=path, key=key).ok
    path.write_bytes(tamper(lines(path)))
    result = verify_files(None, active=path, key=key)
    assert not result.ok and result.problem is not None
    expected_kind = kind
    if keyed and kind == "edited" and name != "truncate whole records":
        expected_kind = "forged"  # a keyed record whose MAC fails, or an unkeyed record in a keyed log
    if keyed and name == "insert a forged record":
        expected_kind = "forged"
    assert result.problem.kind == expected_kind, result.summary()
    assert result.problem.line == line, result.summary()
    assert f"audit.log:{line}" in result.summary()


def test_keyed_chain_catches_an_unkeyed_recomputation_that_fools_the_unkeyed_check(tmp_path: Path) -> None:
    # Unkeyed: an editor who recomputes every hash (and rewrites the head) goes unnoticed.
    # That is the documented limit of an unkeyed chain, and why the keyed chain exists.
    plain = tmp_path / "plain" / "audit.log"
    _write(plain, None)
    forged = _rechain_unkeyed(lines(plain))
    plain.write_bytes(b"".join(forged))
    h = parse_header(forged[-1].rstrip(b"\n"))
    assert h is not None
    (plain.parent / "audit.log.head").write_text(json.dumps({"seq": h.seq, "hash": h.digest}))
    assert verify_files(None, active=plain).ok

    keyed = tmp_path / "keyed" / "audit.log"
    _write(keyed, KEY)
    forged = _rechain_unkeyed(lines(keyed))
    keyed.write_bytes(b"".join(forged))
    h = parse_header(forged[-1].rstrip(b"\n"))
    assert h is not None
    (keyed.parent / "audit.log.head").write_text(json.dumps({"seq": h.seq, "hash": h.digest}))
    result = verify_files(None, active=keyed, key=KEY)
    assert not result.ok and result.problem is not None
    assert result.problem.kind == "forged" and result.problem.line == 1
    assert "without the key" in result.problem.message
    # The next keyed writer refuses to continue the re-chained file instead of blessing it.
    with pytest.raises(AuditError, match="unkeyed"):
        make_log(keyed, KEY).record("sign", {})
    # Appending one unkeyed forged record to an intact keyed log is named too.
    keyed = tmp_path / "keyed2" / "audit.log"
    _write(keyed, KEY)
    keyed.write_bytes(keyed.read_bytes() + _forge(lines(keyed)[-1]))
    appended = verify_files(None, active=keyed, key=KEY)
    assert appended.problem is not None and appended.problem.kind == "forged" and appended.problem.line == N + 1


def test_a_keyed_log_without_the_key_is_not_called_intact(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write(path, KEY)
    result = verify_files(None, active=path)
    assert result.status == "unverified" and not result.ok
    assert "CREDBROKER_AUDIT_KEY" in result.summary()
    wrong = verify_files(None, active=path, key=b"w" * 32)
    assert wrong.problem is not None and wrong.problem.kind == "forged" and "another key" in wrong.problem.message


def test_a_crash_partial_tail_is_a_note_not_tampering(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write(path, None)
    with path.open("ab") as fh:
        fh.write(b'{"v":1,"seq":31,"ts":"2026-11-24T0')  # never committed: the head says 30
    result = verify_files(None, active=path)
    assert result.ok and result.problem is None
    assert [n.kind for n in result.notes] == ["partial_tail"] and result.notes[0].line == N + 1
    # After the next writer recorded it, an edit of the recovered partial line is tampering.
    make_log(path).record("sign", {})
    assert verify_files(None, active=path).ok
    data = path.read_bytes().replace(b'"ts":"2026-11-24T0\n', b'"ts":"2026-11-24T1\n')
    path.write_bytes(data)
    bad = verify_files(None, active=path)
    assert bad.problem is not None and bad.problem.kind == "inserted" and bad.problem.line == N + 1


# -- the CLI ------------------------------------------------------------------------------------
def _cli(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    res = CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
    return res.exit_code, res.output


def test_cli_verify_exit_codes_and_json(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write(path, None)
    env = {"CREDBROKER_AUDIT_LOG": str(path)}
    code, out = _cli(["audit", "verify"], env)
    assert code == 0 and "intact" in out and f"{N} records" in out
    code, out = _cli(["audit", "verify", "--json"], env)
    assert code == 0 and json.loads(out)["status"] == "intact"
    path.write_bytes(path.read_bytes().replace(b'"i":7,', b'"i":8,'))
    code, out = _cli(["audit", "verify", str(path)], env)
    assert code == 1 and "NOT intact" in out and "audit.log:8" in out and "edited" in out


def test_cli_verify_keyed_with_env_key(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write(path, KEY)
    code, out = _cli(["audit", "verify"], {"CREDBROKER_AUDIT_LOG": str(path), "CREDBROKER_AUDIT_KEY": KEY_HEX})
    assert code == 0 and "hmac-sha256" in out
    code, out = _cli(["audit", "verify"], {"CREDBROKER_AUDIT_LOG": str(path)})
    assert code == 1 and "no audit key" in out


def test_installed_cli_with_no_log_yet_and_with_a_removed_log(tmp_path: Path, run_broker) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, "CREDBROKER_AUDIT_LOG": str(tmp_path / "nope.log")}
    for args in (["audit", "verify"], ["audit", "report"]):
        # Never written (no log, no head): a new install, not an error.
        res = run_broker(args, env=env)
        assert res.returncode == 0 and "nothing recorded yet" in res.stdout and "Traceback" not in res.stderr
    # A log removed while its head stayed: one line, not "nothing recorded".
    (tmp_path / "nope.log.head").write_text("{}\n")
    res = run_broker(["audit", "report"], env=env)
    assert res.returncode == 125
    assert res.stderr.count("\n") == 1 and "no audit log" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "nope.log.head").unlink()
    res = run_broker(["audit", "verify"], env={**env, "CREDBROKER_AUDIT_KEY": "zz-not-hex-secretish-value"})
    assert res.returncode == 125 and "zz-not-hex" not in res.stderr + res.stdout


def test_verify_explicit_files_in_any_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = make_log(path, rotate="size", max_size=4096)
    for i in range(40):
        log.record("sign", {"i": i, "pad": "p" * 120})
    files = sorted(tmp_path.glob("audit.log*"))
    files = [f for f in files if not f.name.endswith((".head", ".lock"))]
    code, out = _cli(["audit", "verify", *map(str, reversed(files))], {"CREDBROKER_AUDIT_LOG": str(path)})
    assert code == 0 and "40 records" in out
    # Leaving out a middle file is a deletion.
    rotated = sorted(tmp_path.glob("audit.log.2*"))
    code, out = _cli(["audit", "verify", *map(str, [rotated[0], *rotated[2:], path])],
                     {"CREDBROKER_AUDIT_LOG": str(path)})
    assert code == 1 and "deleted" in out


# -- prune ----------------------------------------------------------------------------------------
def test_prune_removes_old_files_and_what_remains_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import broker.audit.log as logmod

    path = tmp_path / "audit.log"
    log = make_log(path, rotate="size", max_size=10**9)
    start = datetime.now(timezone.utc) - timedelta(days=200)
    for week in range(28):
        stamp = (start + timedelta(weeks=week)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        monkeypatch.setattr(logmod, "utc_timestamp", lambda now=None, s=stamp: s)
        for i in range(3):
            log.record("secret_fetched", {"profile": "um", "week": week, "i": i})
        log.rotate()
    monkeypatch.undo()
    log.record("secret_fetched", {"profile": "um", "week": "now"})
    before = sorted(tmp_path.glob("audit.log.2*"))
    assert len(before) == 28
    dry = prune(log, timedelta(days=90), dry_run=True)
    assert dry.removed and all(Path(f).exists() for f in dry.removed)
    result = prune(log, timedelta(days=90))
    assert result.removed == dry.removed
    remaining = sorted(tmp_path.glob("audit.log.2*"))
    assert len(remaining) == 28 - len(result.removed) and 12 <= len(remaining) <= 14
    verified = verify_files(None, active=path)
    assert verified.ok, verified.summary()
    assert any(n.kind == "pruned" for n in verified.notes)
    assert records(path)[-1]["event"] == "pruned"
    assert records(path)[-1]["data"]["through_seq"] == result.through_seq
    # Deleting one more old file by hand is not covered by the anchor: named as a deletion.
    remaining[0].unlink()
    hand = verify_files(None, active=path)
    assert hand.problem is not None and hand.problem.kind == "deleted"


def test_cli_prune(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    make_log(path).record("sign", {})
    code, out = _cli(["audit", "prune", "--keep", "90d"], {"CREDBROKER_AUDIT_LOG": str(path)})
    assert code == 0 and "nothing to prune" in out
    with pytest.raises(ConfigError, match="--keep"):
        _cli(["audit", "prune", "--keep", "soon"], {"CREDBROKER_AUDIT_LOG": str(path)})


def test_cli_enable_key_continues_an_unkeyed_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write(path, None)
    env = {"CREDBROKER_AUDIT_LOG": str(path), "CREDBROKER_AUDIT_KEY": KEY_HEX}
    code, out = _cli(["audit", "enable-key"], env)
    assert code == 0 and "keyed from seq" in out
    code, out = _cli(["audit", "enable-key"], env)
    assert code == 0 and "nothing to do" in out
    code, out = _cli(["audit", "verify"], env)
    assert code == 0 and "hmac-sha256" in out


# -- the batch path: many ordinary records checked at once (``Verifier._batcher``) -------------------
BIG = 12_000  # ~4 MB: several of the verifier's 1 MB blocks, batches of thousands of lines
AT = 7_001  # the line tampered with: deep inside a block and a batch


def _chain(events: list[tuple[str, dict[str, object], int]], key: bytes | None) -> list[bytes]:
    """Lines in the writer's exact format, each (event, data, seq), chained and hashed (MAC'd when keyed)."""
    from broker.audit.keys import key_id

    alg, digest = make_hasher(key)
    kid = key_id(key) if key is not None else None
    prev, out = "0" * 64, []
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    for n, (event, data, seq) in enumerate(events):
        ts = (start + timedelta(seconds=n)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        prefix = build_prefix(seq, ts, event, prev, alg, kid,
                              encode_rest({"data": data, "host": "h", "pid": 7, "user": "u"}))
        prev = digest(prefix)
        out.append(finish_line(prefix, prev))
    return out


def _plain(n: int) -> list[tuple[str, dict[str, object], int]]:
    return [("secret_fetched" if i % 100 == 0 else "sign", {"profile": "p", "i": i}, i + 1) for i in range(n)]


def _per_line_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The verifier without its batch path: every line through the per-line checks."""
    from broker.audit.verify import Verifier

    monkeypatch.setattr(Verifier, "_batcher", lambda self, *a: (lambda *b: (0, [], [], [])))


def _gap_at(events: list[tuple[str, dict[str, object], int]]) -> list[tuple[str, dict[str, object], int]]:
    # a writer's gap record: seq AT..AT+2 lost, the gap record is AT+3, the records after it follow on;
    # 1000 records later (deep in a run of ordinary records, seq continuous) an operator acknowledges it
    out = events[: AT - 1] + [("gap", {"missing": [AT, AT + 2], "reason": "test"}, AT + 3)]
    after = [(e, d, s + 4) for e, d, s in events[AT - 1 :]]
    after[1000] = ("gap_acknowledged", {"gap_seq": AT + 3, "reason": "disk full"}, after[1000][2])
    return out + after


BATCH_CASES: list[tuple[str, Callable[[bool], list[bytes]], str, str]] = [
    ("an edited record", lambda keyed: [ln if i != AT - 1 else ln.replace(b'"i":7000', b'"i":7999')
                                        for i, ln in enumerate(_chain(_plain(BIG), KEY if keyed else None))],
     "edited", "forged"),
    ("a wrong hash", lambda keyed: [ln if i != AT - 1 else ln[:-4] + (b"0" if ln[-4:-3] != b"0" else b"1") + ln[-3:]
                                    for i, ln in enumerate(_chain(_plain(BIG), KEY if keyed else None))],
     "edited", "forged"),
    ("a seq that skips", lambda keyed: [ln for i, ln in enumerate(_chain(_plain(BIG), KEY if keyed else None))
                                        if i != AT - 1], "deleted", "deleted"),
    ("a special event (gap) in the batch", lambda keyed: _chain(_gap_at(_plain(BIG)), KEY if keyed else None),
     "gap", "gap"),
    ("a non-ASCII byte in a record", lambda keyed: [
        ln if i != AT - 1 else ln.replace(b'"profile":"p"', b'"profile":"\xc3\xa9"')
        for i, ln in enumerate(_chain(_plain(BIG), KEY if keyed else None))], "inserted", "inserted"),
    ("two records swapped", lambda keyed: (lambda lines: lines[: AT - 1] + [lines[AT], lines[AT - 1]] + lines[AT + 1 :])(
        _chain(_plain(BIG), KEY if keyed else None)), "reordered", "reordered"),
    ("a rechained seq one digit off (same width)",
     lambda keyed: _chain([(e, d, s + 10 if s == AT else s) for e, d, s in _plain(BIG)], KEY if keyed else None),
     "deleted", "deleted"),
    ("a rechained record of another format version",
     lambda keyed: _chain(_plain(BIG), KEY if keyed else None)[: AT - 1]
     + [ln.replace(b'{"v":1,', b'{"v":2,', 1) for ln in _chain(_plain(BIG), KEY if keyed else None)[AT - 1 : AT]]
     + _chain(_plain(BIG), KEY if keyed else None)[AT:], "inserted", "inserted"),
]


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
@pytest.mark.parametrize("name, make, kind, keyed_kind", BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
def test_the_batch_path_names_the_same_problem_as_the_per_line_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, make: Callable[[bool], list[bytes]], kind: str,
    keyed_kind: str, keyed: bool,
) -> None:
    """A bad record deep inside a big block is caught where it is, exactly as record by record."""
    key = KEY if keyed else None
    path = tmp_path / "audit.log"
    path.write_bytes(b"".join(_chain(_plain(BIG), key)))
    assert verify_files([path], active=path, key=key).ok
    path.write_bytes(b"".join(make(keyed)))
    batched = verify_files([path], active=path, key=key)
    assert batched.problem is not None and not batched.ok, batched.summary()
    assert batched.problem.kind == (keyed_kind if keyed else kind), batched.summary()
    assert batched.problem.line == AT, batched.summary()
    if kind == "gap":  # the acknowledgement inside a batch was seen
        assert "acknowledged at" in batched.problem.message and "NOT" not in batched.problem.message
    with monkeypatch.context() as m:
        _per_line_only(m)
        assert verify_files([path], active=path, key=key).to_dict() == batched.to_dict()


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
def test_the_batch_path_hands_the_report_the_same_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keyed: bool
) -> None:
    """walk_records: the period's records and the older ones the report keeps, the same with and without batches."""
    from broker.audit.verify import Verifier

    key = KEY if keyed else None
    path = tmp_path / "audit.log"
    path.write_bytes(b"".join(_chain(_plain(BIG), key)))
    since = "2026-11-01T02:30:00.000000Z"  # 9000 s in: the boundary falls inside a batch

    def walk() -> tuple[list[tuple[str, str, bytes]], dict[str, object]]:
        v = Verifier(key=key)
        got = [(ts, ev, line.rstrip(b"\n")) for ts, ev, line in
               v.walk_records([path], since=since, keep=frozenset({"secret_fetched"}))]
        return got, v.result().to_dict()

    batched, result = walk()
    assert result["status"] == "intact" and result["records"] == BIG
    with monkeypatch.context() as m:
        _per_line_only(m)
        assert walk() == (batched, result)
    assert len(batched) == 1 + (BIG - 9000) + 90 - 1  # the first record, the period, the older fetches
    assert all(ts >= since or ev == "secret_fetched" for ts, ev, _ in batched[1:])
