"""broker.sdnotify against a real datagram socket, as systemd listens on one."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    try:
        yield sock, path
    finally:
        sock.close()


def test_ready_stopping_and_status_are_one_datagram_each(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled and n.watchdog_interval is None
    assert n.ready(4242)
    lines = sock.recv(4096).decode().split("\n")
    assert lines[0] == "READY=1" and "STATUS=bot running (pid 4242)" in lines
    assert n.stopping("SIGTERM from systemd")
    assert sock.recv(4096).decode().startswith("STOPPING=1\n")
    assert n.status("a\nmulti-line   status")
    assert sock.recv(4096) == b"STATUS=a multi-line status"
    assert not n.watchdog()  # no WATCHDOG_USEC: nothing sent


def test_watchdog_at_half_the_interval_only_for_this_pid(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval == 1.5
    assert n.watchdog() and sock.recv(4096) == b"WATCHDOG=1"
    other = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None and not other.watchdog()
    for usec in ("\u00b2", "-5", "0", "1e6"):  # not a whole number of microseconds: no watchdog, no crash
        assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": usec}).watchdog_interval is None


def test_abstract_socket_address() -> None:
    name = f"credbroker-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(10)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).send("READY=1")
        assert sock.recv(64) == b"READY=1"


def test_outside_systemd_or_with_a_gone_manager_nothing_breaks(tmp_path: Path) -> None:
    assert not Notifier({}).enabled and not Notifier({}).ready(1)
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert gone.enabled and gone.ready(1) is False


def _datagrams(sock: socket.socket, until: bytes, limit: int = 50) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < limit:
        got.append(sock.recv(4096))
        if until in got[-1]:
            return got
    raise AssertionError(f"{until!r} never came: {got}")


def test_run_under_systemd_says_ready_after_the_fetch_feeds_the_watchdog_and_says_stopping(
        listener: tuple[socket.socket, str], tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import credbroker_bin, start_openbao

    sock, path = listener
    (tmp_path / "srv").mkdir()
    server = start_openbao(tmp_path / "srv")
    try:
        server.kv_put("credbroker/sd", api_secret="sd-secret")
        env = {**server.env(), "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000",
               "CREDBROKER_AUDIT_LOG": str(tmp_path / "audit.log")}
        seen = tmp_path / "bot-env"
        bot = ("import os, sys, time; open(sys.argv[1], 'w').write(repr(sorted(k for k in os.environ "
               "if k in ('NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID')))); time.sleep(600)")
        proc = subprocess.Popen([credbroker_bin(), "run", "--vault-path", "secret/credbroker/sd", "-e",
                                 "S=api_secret", "--", sys.executable, "-c", bot, str(seen)], env=env)
        try:
            ready = _datagrams(sock, b"READY=1")[-1].decode()
            assert f"MAINPID={proc.pid}" in ready
            # READY came once the bot ran with its secret; the bot itself inherited none of systemd's variables.
            deadline = time.monotonic() + 60
            while not seen.exists() or not seen.read_text():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert seen.read_text() == "[]"
            assert _datagrams(sock, b"WATCHDOG=1")[-1] == b"WATCHDOG=1"
            proc.send_signal(signal.SIGTERM)
            assert _datagrams(sock, b"STOPPING=1")[-1].startswith(b"STOPPING=1")
            assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        finally:
            if proc.poll() is None:
                proc.kill()
        # A fetch that fails: no READY, ever (the unit fails instead of looking started).
        failed = subprocess.run([credbroker_bin(), "run", "--vault-path", "secret/credbroker/nope", "-e",
                                 "S=api_secret", "--", "true"], env=env, capture_output=True, timeout=60)
        assert failed.returncode == 125
        sock.settimeout(0.5)
        leftovers: list[bytes] = []
        try:
            while True:
                leftovers.append(sock.recv(4096))
        except TimeoutError:
            pass
        assert not any(b"READY=1" in d for d in leftovers)
    finally:
        server.stop()
