"""`[audit] fsync`: "every" fsyncs each commit before it returns; "group" writes before it returns and
fsyncs in the background within a bounded window. Both keep the chain valid and write the signing
agent's record before the bot gets its signature."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import broker.audit.log as log_module
from broker.agent.server import Agent
from broker.audit.files import read_head
from broker.audit.log import AuditLog
from broker.audit.settings import AuditSettings, load_settings
from broker.audit.verify import verify_files
from broker.errors import ConfigError
from broker.secret import Secret
from broker.signing.agent import AgentSigner
from broker.signing.hmac_sha256 import HmacSigner
from broker.signing_policy import SigningPolicy
from tests.conftest import REPO

SYNCER = "credbroker-audit-sync"


class Fsyncs:
    """Counts fdatasync calls per thread kind; can hold the background syncer inside its fdatasync."""

    def __init__(self) -> None:
        self.writer = 0
        self.syncer = 0
        self.release = threading.Event()
        self.release.set()
        self._real = os.fdatasync

    def __call__(self, fd: int) -> None:
        if threading.current_thread().name == SYNCER:
            self.release.wait(60)
            self.syncer += 1
        else:
            self.writer += 1
        self._real(fd)


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fsyncs]:
    counter = Fsyncs()
    monkeypatch.setattr(log_module.os, "fdatasync", counter)
    yield counter
    counter.release.set()


def make_log(path: Path, fsync: str) -> AuditLog:
    return AuditLog(AuditSettings(path=path, fsync=fsync))


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def wait_until(cond: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_fsync_setting_is_validated() -> None:
    env = {"HOME": "/tmp/nohome"}
    assert load_settings(None, env).fsync == "every"  # the default keeps "nothing acknowledged is lost"
    assert load_settings({"fsync": "group"}, env).fsync == "group"
    with pytest.raises(ConfigError, match=r"\[audit\] fsync: unknown value 'sometimes'.*every, group"):
        load_settings({"fsync": "sometimes"}, env)


def test_every_mode_fsyncs_each_commit_before_it_returns(tmp_path: Path, fsyncs: Fsyncs) -> None:
    log = make_log(tmp_path / "audit.log", "every")
    for i in range(5):
        log.record("signed", {"n": i}, durable=False)
        log.flush()
        assert fsyncs.writer == i + 1 and log.unsynced() == 0
    assert fsyncs.syncer == 0
    assert read_head(log.path).seq == 5  # type: ignore[union-attr]
    log.close()


def test_group_mode_writes_before_returning_and_fsyncs_in_the_background(
        tmp_path: Path, fsyncs: Fsyncs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log_module, "FSYNC_GROUP_WINDOW", 3600.0)
    monkeypatch.setattr(log_module, "SYNCER_DELAY", 0.0)
    log = make_log(tmp_path / "audit.log", "group")
    log.record("opened", {}, durable=True)  # durable: fsynced by the writer in group mode too
    assert fsyncs.writer == 1 and log.unsynced() == 0
    fsyncs.release.clear()  # the syncer stalls inside its fdatasync (a slow disk)
    for i in range(5):
        log.record("signed", {"n": i}, durable=False)
        log.flush()
        # In the file when flush() returns, although not yet on disk.
        assert b'"n":%d' % i in lines(log.path)[-1]
    assert fsyncs.writer == 1 and log.unsynced() == 5
    assert read_head(log.path).seq == 1  # type: ignore[union-attr]  # the head follows the disk, not the writer
    fsyncs.release.set()
    wait_until(lambda: log.unsynced() == 0 and read_head(log.path).seq == 6,  # type: ignore[union-attr]
               "the syncer never caught up")
    assert fsyncs.writer == 1 and fsyncs.syncer >= 1
    log.close()
    assert verify_files(None, active=log.path).ok


def test_group_mode_writer_fsyncs_itself_once_the_oldest_write_is_past_the_window(
        tmp_path: Path, fsyncs: Fsyncs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound: a commit never leaves records older than the window unsynced behind it."""
    monkeypatch.setattr(log_module, "FSYNC_GROUP_WINDOW", 0.0)
    fsyncs.release.clear()
    log = make_log(tmp_path / "audit.log", "group")
    for i in range(4):
        log.record("signed", {"n": i}, durable=False)
        log.flush()
        assert fsyncs.writer == i + 1 and log.unsynced() == 0
    fsyncs.release.set()
    log.close()


def test_a_killed_group_mode_writer_loses_no_answered_record_and_the_next_writer_sees_no_gap(
        tmp_path: Path) -> None:
    """A crash of credbroker itself loses nothing: every flush()ed record is in the file (only a crash of
    the machine can lose the records of the last window). The lagging head is no gap."""
    path = tmp_path / "audit.log"
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from broker.audit.log import AuditLog\n"
        "from broker.audit.settings import AuditSettings\n"
        "import broker.audit.log as m\n"
        "m.FSYNC_GROUP_WINDOW = 3600.0\n"
        "import threading\n"
        "real = m.os.fdatasync\n"
        "def stuck(fd):  # the background syncer never finishes: the head stays behind\n"
        "    if threading.current_thread().name == 'credbroker-audit-sync':\n"
        "        threading.Event().wait()\n"
        "    real(fd)\n"
        "m.os.fdatasync = stuck\n"
        "log = AuditLog(AuditSettings(path=Path(sys.argv[1]), fsync='group'))\n"
        "for i in range(50):\n"
        "    log.record('signed', {'n': i}, durable=False)\n"
        "    log.flush()\n"
        "    print(i, flush=True)  # 'answered'\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == -9, out.stderr[-2000:]
    answered = [int(x) for x in out.stdout.split()]
    assert answered == list(range(50))
    assert [b'"n":%d' % i in line for i, line in enumerate(lines(path))] == [True] * 50
    head = read_head(path)
    assert head is not None and head.seq == 1  # synced by the writer's first commit; then it lagged
    result = verify_files(None, active=path)
    assert result.ok
    log = make_log(path, "group")
    log.record("after", {}, durable=True)
    log.close()
    events = [line.split(b'"event":"')[1].split(b'"')[0] for line in lines(path)]
    assert b"gap" not in events and events[-1] == b"after" and len(events) == 51
    assert verify_files(None, active=path).ok


@pytest.mark.parametrize("fsync", ["every", "group"])
def test_the_agents_record_is_in_the_file_when_the_bot_gets_its_signature(
        tmp_path: Path, fsyncs: Fsyncs, fsync: str) -> None:
    log = make_log(tmp_path / "audit.log", fsync)
    agent = Agent(HmacSigner("KEY", Secret(b"s3cret")), profile="p", policy=SigningPolicy.from_mapping(None, "x"),
                  audit=log)
    agent.start()
    agent.set_child(os.getpid())
    try:
        assert agent.path is not None
        signer = AgentSigner("KEY", agent.path, profile="p")
        for i in range(20):
            signer.sign_params({"symbol": "BTCUSDT", "quantity": f"0.{i:03d}"}, endpoint="/fapi/v1/order")
            assert b'"quantity":"0.%03d"' % i in lines(log.path)[-1]
        if fsync == "every":
            assert fsyncs.writer == 20  # one bot thread, one request at a time: one fsync per answer

        def work(n: int) -> None:
            s = AgentSigner("KEY", agent.path, profile="p")  # type: ignore[arg-type]
            for j in range(25):
                s.sign_params({"symbol": "ETHUSDT", "quantity": f"{n}.{j}"}, endpoint="/fapi/v1/order")
            s.close()

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        signer.close()
    finally:
        agent.stop()
        log.close()
    assert agent.signed == 120
    assert sum(b'"event":"signed"' in line for line in lines(log.path)) == 120
    assert log.unsynced() == 0
    assert verify_files(None, active=log.path).ok


def test_group_mode_syncs_a_lone_commit_without_further_writes(tmp_path: Path, fsyncs: Fsyncs) -> None:
    """With no later commit to push it, the syncer still takes the last record to disk (and the head)."""
    log = make_log(tmp_path / "audit.log", "group")
    log.record("opened", {}, durable=True)
    log.record("signed", {"n": 1}, durable=False)
    log.flush()
    wait_until(lambda: log.unsynced() == 0 and read_head(log.path).seq == 2,  # type: ignore[union-attr]
               "the last commit was never synced")
    assert fsyncs.syncer == 1 and fsyncs.writer == 1
    log.close()
