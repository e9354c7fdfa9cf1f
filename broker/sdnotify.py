"""systemd's notification protocol (sd_notify(3)): one datagram to ``$NOTIFY_SOCKET``.

``credbroker run`` under a ``Type=notify`` unit says ``READY=1`` once the bot has
started (so never before its secret was fetched), ``STOPPING=1`` when it stops
the bot, and, when ``WATCHDOG_USEC`` is set for this process, ``WATCHDOG=1``
at half that interval. The protocol is a single ``AF_UNIX`` datagram, so it
needs no library. Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op.
The bot never inherits these variables (``SD_VARIABLES``): systemd would
otherwise accept its notifications as ours with ``NotifyAccess=all``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

#: Variables systemd sets for the service's main process; removed from the bot's environment.
SD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Notifications for this process, from its environment; a no-op when systemd did not ask for them."""

    def __init__(self, env: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        environ = os.environ if env is None else env
        self.address = _address(environ.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        owner = environ.get("WATCHDOG_PID", "")
        me = os.getpid() if pid is None else pid
        if self.address is not None and usec.isascii() and usec.isdigit() and int(usec) > 0 and (not owner or owner == str(me)):
            # sd_watchdog_enabled(3) advises notifying at half the timeout.
            self.watchdog_interval = int(usec) / 2_000_000

    @property
    def enabled(self) -> bool:
        """True under a service manager that listens."""
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False (never an exception) when it cannot be sent:
        a service manager that went away must not stop the bot."""
        if self.address is None:
            return False
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self.address)
        except OSError:
            return False
        return True

    def ready(self, pid: int) -> bool:
        """The bot (``pid``) has started with its secret."""
        return self.send("READY=1", f"STATUS=bot running (pid {pid})", f"MAINPID={os.getpid()}")

    def stopping(self, why: str) -> bool:
        """credbroker is stopping the bot."""
        return self.send("STOPPING=1", f"STATUS=stopping the bot: {why}")

    def status(self, text: str) -> bool:
        """A one-line status for ``systemctl status``."""
        return self.send(f"STATUS={' '.join(text.split())}")

    def watchdog(self) -> bool:
        """Feed the watchdog (only when systemd set one for this process)."""
        return self.watchdog_interval is not None and self.send("WATCHDOG=1")


def _address(value: str) -> str | bytes | None:
    """A ``NOTIFY_SOCKET`` value as a socket address: a path, or ``@name`` for the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None  # unset, or a kind this code does not speak (vsock:): no notifications
