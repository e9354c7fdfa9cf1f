"""A resident fetch process: hvac stays loaded, so `credbroker run` starts fast.

``import hvac`` (it pulls in requests, urllib3, charset_normalizer, certifi)
costs more than the whole run of the Go ``bao``/``vault`` CLI. ``credbroker
daemon`` imports it once and serves Vault fetches over a private Unix socket;
``credbroker run`` (and ``broker.sources.fetch``) use it when it is running
and fall back to fetching in-process when it is not.

It holds no credential between requests: each request carries the caller's
own Vault settings (address, token or AppRole ids), exactly what the caller
could use itself, and the daemon answers with the fields it fetched. So it
grants a same-user caller no power it did not have.

Protections:

* the socket lives in a folder only the user can enter (0700, checked by both
  sides before use), the socket itself is 0600;
* both ends check the other's uid with ``SO_PEERCRED``: the daemon serves only
  its own user, and a client never sends a token to a socket another user
  planted;
* the daemon is hardened like the broker (no core dumps, not dumpable);
* it never logs a request's contents.

What it costs: one resident process of about the broker's size, a socket to
protect, a restart after upgrading credbroker (a version mismatch makes the
client fall back to the slow path), and the secret crossing a Unix socket
(kernel memory, same user) once per fetch.
"""

from __future__ import annotations

import base64
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import __version__
from .config import Profile
from .errors import BrokerError
from .secret import Credentials, Origin, Secret
from .unixsock import frame, listen_private, peer_is_me, private_dir, recv_message
from .vault.origins import skip_verify_var

PROTOCOL = 1
#: The code this daemon process loaded (set when it starts serving).
_SERVER_CODE: str | None = None

#: Only these variables are sent to the daemon: what the Vault source reads.
_ENV_PREFIXES = ("VAULT_", "BAO_", "CREDBROKER_VAULT_", "CREDBROKER_ROLE_ID", "CREDBROKER_SECRET_ID",
                 "CREDBROKER_APPROLE_")


def code_id() -> str:
    """Names the exact code that fetches: a daemon started before an upgrade
    (or an edit) differs here even when the version string is the same, and
    is then not used. Built from the size and mtime of the fetching modules."""
    import hashlib

    package = Path(__file__).resolve().parent
    h = hashlib.sha256(__version__.encode())
    folders = (package, package / "sources", package / "vault")
    for path in sorted(p for folder in folders for p in folder.glob("*.py")):
        try:
            st = path.stat()
        except OSError:
            continue
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def socket_path(env: Mapping[str, str]) -> Path:
    """``$CREDBROKER_DAEMON_SOCKET``, else ``$XDG_RUNTIME_DIR/credbroker/daemon.sock``."""
    explicit = env.get("CREDBROKER_DAEMON_SOCKET")
    if explicit:
        return Path(explicit)
    runtime = env.get("XDG_RUNTIME_DIR") or f"/tmp/credbroker-{os.getuid()}"
    return Path(runtime) / "credbroker" / "daemon.sock"


# -- client --------------------------------------------------------------------------


def fetch(profile: Profile, env: Mapping[str, str]) -> Credentials | None:
    """Fetch through a running daemon; None when there is no usable daemon.

    A BrokerError from the daemon (sealed, denied, missing field...) is raised
    here exactly as the in-process fetch would raise it.
    """
    if env.get("CREDBROKER_DAEMON") == "0":
        return None
    path = socket_path(env)
    if not private_dir(path.parent, create=False):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(float(env.get("CREDBROKER_VAULT_TIMEOUT") or 10) + 5)
        sock.connect(str(path))
        if not peer_is_me(sock):
            return None  # someone else's socket: never send it a token
        request_code = code_id()
        request = {
            "op": "fetch",
            "protocol": PROTOCOL,
            "version": __version__,
            "code": request_code,
            "profile": {"name": profile.name, "source": profile.source, "env": dict(profile.env),
                        "options": dict(profile.options)},
            "env": {k: v for k, v in env.items() if k.startswith(_ENV_PREFIXES) or k == "HOME"},
        }
        sock.sendall(frame(request))
        del request
        reply = recv_message(sock)
    except (OSError, ValueError, ConnectionError):
        return None  # no daemon, a stale socket or a dead one: fetch in-process
    finally:
        sock.close()
    if not isinstance(reply, dict) or reply.get("protocol") != PROTOCOL or reply.get("code") != request_code:
        return None
    insecure = skip_verify_var(env)
    if insecure:  # the daemon's own warning went to its stderr: say it where this run's operator looks
        from .vault.session import warn_insecure

        warn_insecure(insecure, env.get("VAULT_ADDR") or env.get("BAO_ADDR") or "Vault")
    if not reply.get("ok"):
        raise _error_from(reply.get("error"))
    origin = reply["origin"]
    fields = {name: Secret(base64.b64decode(value)) for name, value in reply["fields"].items()}
    reply.clear()
    return Credentials(profile=profile.name, origin=Origin(**origin), fields=fields)


def _error_from(data: Any) -> BrokerError:
    from . import errors

    if not isinstance(data, dict):
        return BrokerError("the credbroker daemon answered with an invalid error", "restart `credbroker daemon`")
    cls = getattr(errors, str(data.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, BrokerError)):
        cls = BrokerError
    return cls(str(data.get("message", "unknown error")), data.get("remedy"))


# -- server --------------------------------------------------------------------------


def _handle(request: Any) -> dict[str, Any]:
    from .sources import fetch as source_fetch

    base = {"protocol": PROTOCOL, "version": __version__, "code": _SERVER_CODE}
    if isinstance(request, dict) and request.get("code") != _SERVER_CODE:
        # Different code from the caller's (an upgrade since this daemon started):
        # answer before touching Vault, so the caller fetches in-process instead
        # and Vault sees exactly one read for the one fetch the broker records.
        return {**base, "ok": False, "stale": True}
    if not isinstance(request, dict) or request.get("op") != "fetch" or request.get("protocol") != PROTOCOL:
        return {**base, "ok": False, "error": {"type": "BrokerError", "message": "unsupported request",
                                               "remedy": "use the same credbroker version as the daemon"}}
    try:
        p = request["profile"]
        profile = Profile(name=str(p["name"]), source=str(p["source"]), env=dict(p["env"]),
                          options=dict(p["options"]))
        if profile.source != "vault":
            raise BrokerError("the daemon only serves vault profiles", "fetch keyring profiles in-process")
        env = {str(k): str(v) for k, v in dict(request["env"]).items()}
        creds = source_fetch(profile, env=env, use_daemon=False)
    except BrokerError as exc:
        return {**base, "ok": False, "error": {"type": type(exc).__name__, "message": exc.message,
                                               "remedy": exc.remedy}}
    except (KeyError, TypeError, ValueError):
        return {**base, "ok": False, "error": {"type": "BrokerError", "message": "malformed request",
                                               "remedy": "use the same credbroker version as the daemon"}}
    try:
        fields = {name: base64.b64encode(secret.reveal()).decode() for name, secret in creds.items()}
        return {**base, "ok": True, "origin": creds.origin.to_dict(), "fields": fields}
    finally:
        creds.wipe()


def serve(path: Path, *, ready: Any = None) -> None:
    """Serve fetches on ``path`` until SIGTERM/SIGINT. Single-threaded: fetches are short."""
    from .hardening import harden_process

    global _SERVER_CODE
    _SERVER_CODE = code_id()
    harden_process()
    import hvac  # noqa: F401 - the whole point: load it once, here

    from .sources import vault  # noqa: F401

    if not private_dir(path.parent, create=True):
        raise BrokerError(f"{path.parent} is not a folder private to this user (owner and mode 0700)",
                          "remove it or choose another --socket")
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    server = listen_private(path, 16)
    if ready is not None:
        ready(path)
    try:
        while True:
            conn, _ = server.accept()
            with conn:
                try:
                    conn.settimeout(30)
                    if not peer_is_me(conn):
                        continue
                    reply = _handle(recv_message(conn))
                    try:
                        conn.sendall(frame(reply))
                    finally:
                        reply.clear()
                except (OSError, ValueError, ConnectionError):
                    continue
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        try:
            path.unlink()
        except OSError:
            pass


def main_loop(path: Path) -> None:
    """Run the daemon in the foreground, exiting cleanly on SIGTERM."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    serve(path, ready=lambda p: print(f"credbroker daemon: serving on {p}", file=sys.stderr, flush=True))
