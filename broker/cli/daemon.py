"""``credbroker daemon``: the resident fetch process (optional)."""

from __future__ import annotations

import os

import click


@click.command("daemon")
@click.option("--socket", "socket_path", metavar="PATH",
              help="Socket path (default: $CREDBROKER_DAEMON_SOCKET, else $XDG_RUNTIME_DIR/credbroker/daemon.sock).")
def daemon_cmd(socket_path: str | None) -> None:
    """Keep the Vault client loaded so `credbroker run` starts fast.

    Optional. Runs in the foreground (use your service manager, e.g. a systemd
    user unit). `credbroker run` uses it when it is running and fetches
    in-process otherwise; CREDBROKER_DAEMON=0 turns it off for one run. It
    holds no credential between requests: each fetch carries the caller's own
    Vault settings, and only the same user may connect (SO_PEERCRED).
    """
    from pathlib import Path

    from .. import daemon

    daemon.main_loop(Path(socket_path) if socket_path else daemon.socket_path(os.environ))
