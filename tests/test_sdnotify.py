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
