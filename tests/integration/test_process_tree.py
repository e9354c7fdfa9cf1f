"""Nothing of the bot's process tree outlives `credbroker run`, however the broker ends.

The bot runs in a process group of its own; a watchdog process stops that
group (SIGTERM, a grace, SIGKILL) when the broker dies, even by SIGKILL, and
the broker stops it itself on every normal exit path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import OpenBao, credbroker_bin

pytestmark = pytest.mark.vault

PATH = "secret/credbroker/tree"
# A bot that ignores SIGTERM behind a shell, with a grandchild that ignores it too.
STUBBORN = 'trap "" TERM; sleep 300 & echo "$$ $!" > "$1"; wait'


@pytest.fixture
def env(openbao: OpenBao, tmp_path: Path) -> Iterator[dict[str, str]]:
    openbao.kv_put("credbroker/tree", api_secret="tree-secret")
    yield {**openbao.env(), "HOME": str(tmp_path), "CREDBROKER_AUDIT_LOG": str(tmp_path / "audit.log")}


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] != b"Z"


def wait_pids(path: Path, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text.endswith("\n"):
            return [int(p) for p in text.split()]
        time.sleep(0.02)
    raise AssertionError(f"the bot never wrote its pids to {path}")


def wait_gone(pids: list[int], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(running(p) for p in pids):
            return
        time.sleep(0.05)
    raise AssertionError(f"still running: {[p for p in pids if running(p)]}")


def start(env: dict[str, str], tmp: Path, *flags: str) -> tuple[subprocess.Popen[bytes], list[int]]:
    pids = tmp / "pids"
    proc = subprocess.Popen([credbroker_bin(), "run", "--vault-path", PATH, "--env", "S=api_secret", *flags, "--",
                             "sh", "-c", STUBBORN, "sh", str(pids)], env=env, stderr=subprocess.PIPE)
    return proc, wait_pids(pids)


def test_sigkill_of_the_broker_stops_the_whole_tree(env: dict[str, str], tmp_path: Path) -> None:
    proc, pids = start(env, tmp_path, "--grace", "1s")
    try:
        assert all(running(p) for p in pids)
        proc.kill()  # SIGKILL: no cleanup in the broker; PDEATHSIG reaches the shell only, which ignores it
        proc.wait()
        wait_gone(pids)
    finally:
        for p in pids:
            if running(p):
                os.kill(p, signal.SIGKILL)


def test_a_stop_signal_stops_what_the_bot_left_behind(env: dict[str, str], tmp_path: Path) -> None:
    """The shell exits on SIGINT (sh does), its TERM-ignoring grandchild is stopped by the broker."""
    pids_file = tmp_path / "pids"
    proc = subprocess.Popen([credbroker_bin(), "run", "--vault-path", PATH, "--env", "S=api_secret", "--grace", "1s",
                             "--", "sh", "-c", 'trap "" TERM; sleep 300 & echo "$$ $!" > "$1"; wait', "sh",
                             str(pids_file)], env=env, stderr=subprocess.PIPE)
    pids = wait_pids(pids_file)
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 128 + signal.SIGINT, proc.stderr.read() if proc.stderr else ""
        assert not any(running(p) for p in pids)  # gone before the broker returned
    finally:
        for p in pids:
            if running(p):
                os.kill(p, signal.SIGKILL)


def test_a_bot_that_exits_leaving_a_background_process(env: dict[str, str], tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    res = subprocess.run([credbroker_bin(), "run", "--vault-path", PATH, "--env", "S=api_secret", "--grace", "1s",
                          "--", "sh", "-c", 'sleep 300 & echo "$!" > "$1"; exit 3', "sh", str(pids_file)],
                         env=env, capture_output=True, timeout=60)
    assert res.returncode == 3, res.stderr
    pids = [int(p) for p in pids_file.read_text().split()]
    try:
        assert not any(running(p) for p in pids)
    finally:
        for p in pids:
            if running(p):
                os.kill(p, signal.SIGKILL)


def test_signals_still_reach_the_bot_and_statuses_pass_through(env: dict[str, str], tmp_path: Path) -> None:
    res = subprocess.run([credbroker_bin(), "run", "--vault-path", PATH, "--env", "S=api_secret", "--",
                          "sh", "-c", "kill -TERM $$"], env=env, capture_output=True, timeout=60)
    assert res.returncode == 128 + signal.SIGTERM


def state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return stat[stat.rindex(b")") + 2:][:1].decode()


def wait_state(pid: int, states: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state(pid) in states:
            return
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} stayed in state {state(pid)}, expected one of {states}")


def test_job_control_stops_and_continues_the_bot_with_the_broker(env: dict[str, str], tmp_path: Path) -> None:
    """SIGTSTP (Ctrl-Z's signal) stops the bot's group and the broker; SIGCONT (`fg`) continues both."""
    pids_file = tmp_path / "pids"
    proc = subprocess.Popen([credbroker_bin(), "run", "--vault-path", PATH, "--env", "S=api_secret", "--grace", "1s",
                             "--", "sh", "-c", 'sleep 300 & echo "$$ $!" > "$1"; wait', "sh", str(pids_file)],
                            env=env, stderr=subprocess.PIPE)
    pids = wait_pids(pids_file)
    try:
        proc.send_signal(signal.SIGTSTP)
        for pid in (*pids, proc.pid):
            wait_state(pid, "T")
        proc.send_signal(signal.SIGCONT)
        for pid in (*pids, proc.pid):
            wait_state(pid, "SR")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert not any(running(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in pids:
            if running(p):
                os.kill(p, signal.SIGKILL)


def cgroup_possible() -> bool:
    from broker.watchdog import make_cgroup, remove_cgroup

    path = make_cgroup()
    if path is None:
        return False
    remove_cgroup(path)
    return True


@pytest.mark.parametrize("kill_broker", [True, False])
def test_a_process_that_left_the_group_is_stopped_through_the_cgroup(env: dict[str, str], tmp_path: Path,
                                                                     kill_broker: bool) -> None:
    """Where a cgroup can be made (root, or a delegated subtree): `setsid` does not escape."""
    if not cgroup_possible():
        pytest.skip("this process may not make a cgroup v2 here (needs root or a delegated subtree)")
    pids_file = tmp_path / "pids"
    proc = subprocess.Popen([credbroker_bin(), "run", "--vault-path", PATH, "--env", "S=api_secret", "--grace", "1s",
                             "--", "sh", "-c", 'setsid sh -c \'trap "" TERM; echo $$ > "$1"; exec sleep 300\' sh "$1.x" & '
                             'while [ ! -s "$1.x" ]; do sleep 0.02; done; cat "$1.x" > "$1.y"; mv "$1.y" "$1"; '
                             'echo >> "$1"; sleep 300', "sh", str(pids_file)], env=env, stderr=subprocess.PIPE)
    pids = wait_pids(pids_file)
    try:
        assert all(running(p) for p in pids)
        if kill_broker:
            proc.kill()
            proc.wait()
        else:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        wait_gone(pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in pids:
            if running(p):
                os.kill(p, signal.SIGKILL)
