"""A resident fetch process: hvac stays loaded, so `credbroker run` starts fast.

``import hvac`` (it pulls in requests, urllib3, charset_normalizer, certifi)
costs more than the whole run of the Go ``bao``/``vault`` CLI. ``credbroker
daemon`` imports it once and serves Vault fetches over a private Unix socket;
``credbroker run`` (and ``broker.sources.fetch``) use it when it is running
and fall back to fetching in-process when it is not.

It holds no credential between requests: each request carries the caller's
own Vault settings (address, token or AppRole ids), exactly what the caller
could use itself, and the daemon answers with the fields it fetched. So it
grants a same-user caller no power it did not have. Concretely:

* every connection is served by a child process forked for it, which reads
  the request, fetches, answers and exits: the copies a fetch makes (the
  request's token, hvac's and requests' objects, JSON strings, TLS and socket
  buffers) exist only in that child and go with it. The resident process
  never reads a request; a scan of its memory after a request finds neither
  the secret nor the token;
* a token or AppRole secret in the daemon's own environment (started from a
  shell that exported ``VAULT_TOKEN``) is overwritten and removed at start:
  the daemon never uses it;
* the secret bytes travel raw after the reply's JSON metadata, never inside
  JSON or base64, so the caller reads them into one buffer it wipes.

Clients are served concurrently: a client that connects and sends nothing,
or half a request, is dropped after ``REQUEST_DEADLINE`` seconds and never
delays another; with ``MAX_CLIENTS`` connections in service a further one is
closed at once, and its caller fetches in-process.

Protections:

* the socket lives in a folder only the user can enter (0700, checked by both
  sides before use), the socket itself is 0600;
* both ends check the other's uid with ``SO_PEERCRED``: the daemon serves only
  its own user, and a client never sends a token to a socket another user
  planted;
* the daemon is hardened like the broker (no core dumps, not dumpable; its
  children inherit both);
* it never logs a request's contents.

What it costs: one resident process of about the broker's size, a fork per
fetch (a few milliseconds), a socket to protect, a restart after upgrading
credbroker (a version mismatch makes the client fall back to the slow path),
and the secret crossing a Unix socket (kernel memory, same user) once per
fetch.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, units
from .config import Profile
from .errors import BrokerError
from .secret import Credentials, Origin, Secret, wipe_buffer
from .unixsock import HEADER, frame, listen_private, peer_is_me, private_dir, recv_frame
from .vault.origins import SettingsEnv, VaultTable, lookup, skip_verify_var, value, vault_table

#: 2: the reply carries the secret bytes raw after its JSON metadata (never in JSON).
PROTOCOL = 2
#: A client must send its whole request within this many seconds of connecting.
REQUEST_DEADLINE = 5.0
#: Seconds a child may wait for the client to take its answer.
REPLY_TIMEOUT = 10.0
#: A child serving one connection ends after this many seconds whatever happens.
CHILD_LIMIT = 120
#: Connections served at once; more are closed at once (the client fetches in-process).
MAX_CLIENTS = 32
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
    here exactly as the in-process fetch would raise it. The answer is read
    into one bytearray that is wiped once each field is in its ``Secret``: no
    other copy of a secret is made on this side.
    """
    if env.get("CREDBROKER_DAEMON") == "0":
        return None
    path = socket_path(env)
    if not private_dir(path.parent, create=False):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(_timeout(env) + 5)
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
            **_vault_field(env),
        }
        sock.sendall(frame(request))
        del request
        answer = recv_frame(sock)
    except (OSError, ValueError, ConnectionError):
        return None  # no daemon, a stale socket, a busy or dead one: fetch in-process
    finally:
        sock.close()
    insecure = skip_verify_var(env)
    if insecure:  # the daemon's own warning went to its stderr: say it where this run's operator looks
        from .vault.session import warn_insecure

        warn_insecure(insecure, value(env, "VAULT_ADDR", "BAO_ADDR") or "Vault")
    try:
        return _decode_reply(answer, profile, request_code, via="daemon")
    finally:
        wipe_buffer(answer)


def _decode_reply(answer: bytearray, profile: Profile, request_code: str, *, via: str) -> Credentials | None:
    """Credentials from a reply frame (see ``_encode_reply``); None when it is not a usable answer."""
    if len(answer) < HEADER.size:
        return None
    (meta_len,) = HEADER.unpack_from(answer)
    blob = HEADER.size + meta_len
    try:
        reply = json.loads(bytes(answer[HEADER.size:blob]))  # metadata only: no secret in this part
    except ValueError:
        return None
    if not isinstance(reply, dict) or reply.get("protocol") != PROTOCOL or reply.get("code") != request_code:
        return None
    if not reply.get("ok"):
        raise _error_from(reply.get("error"))
    fields: dict[str, Secret] = {}
    try:
        with memoryview(answer) as view:
            for name, (offset, length) in reply["fields"].items():
                start = blob + int(offset)
                if not (blob <= start <= start + int(length) <= len(answer)):
                    raise ValueError("field outside the frame")
                fields[str(name)] = Secret(view[start:start + int(length)])
        origin = Origin(**reply["origin"])._replace(via=via)
    except (KeyError, TypeError, ValueError):
        for secret in fields.values():
            secret.wipe()
        return None
    return Credentials(profile=profile.name, origin=origin, fields=fields)


#: A fetch child forked early by ``prefork`` (pid, our end of its socket), waiting for its one request.
_PREFORKED: tuple[int, socket.socket] | None = None


def prefork(env: Mapping[str, str]) -> None:
    """Fork the throwaway fetch child now, so it loads hvac while this process does its checks.

    ``credbroker run`` calls this as soon as it knows a vault profile will be
    read and no daemon will serve it. The child is hardened like the broker,
    imports the Vault client, and waits: it contacts Vault only when
    ``fetch_isolated`` sends it the request, i.e. after the run's checks
    passed (audit log writable, command found, no collision). A run that
    ends before that closes the socket and the child exits without a read.
    Best effort: where no child can be made, ``fetch_isolated`` forks as
    before.
    """
    global _PREFORKED
    if _PREFORKED is not None:
        return
    if env.get("CREDBROKER_DAEMON") != "0" and socket_path(env).exists():
        return  # a daemon will most likely serve the fetch (if not, fetch_isolated forks then)
    import signal

    from .hardening import die_with_parent, harden_process

    parent = os.getpid()
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        return
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        return
    if pid == 0:
        status = 1
        try:
            ours.close()
            die_with_parent(parent, signal.SIGKILL)  # a broker that dies takes its fetch along
            harden_process()  # it will hold the secret: no core dump, not dumpable, as the broker
            _default_signals()
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
            from .sources import vault  # noqa: F401 - the point of forking early: hvac loads in parallel
            from .vault import transport  # noqa: F401 - (requests, urllib3) as well

            request = json.loads(recv_frame(theirs))
            p = request["profile"]
            profile = Profile(name=str(p["name"]), source=str(p["source"]), env=dict(p["env"]),
                              options=dict(p["options"]), sections=dict(p["sections"]), origin=p["origin"])
            child_env = _settings_env(request)  # the environment and the caller's [vault] beside it
            del request
            theirs.sendall(_fetch_reply(profile, child_env, {"protocol": PROTOCOL, "code": p["code"]}))
            status = 0
        except BaseException:  # noqa: BLE001 - EOF (the run ended without a fetch) or anything: just go
            pass
        finally:
            os._exit(status)
    theirs.close()
    _PREFORKED = (pid, ours)


def discard_prefork() -> None:
    """Let an unused early fetch child go (it exits on EOF, without reading Vault) and reap it."""
    global _PREFORKED
    held, _PREFORKED = _PREFORKED, None
    if held is None:
        return
    pid, sock = held
    sock.close()
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _ask_preforked(profile: Profile, env: Mapping[str, str], nonce: str) -> tuple[int, socket.socket] | None:
    """Hand the early fetch child its request; (pid, socket) to read the answer from, or None."""
    global _PREFORKED
    held, _PREFORKED = _PREFORKED, None
    if held is None:
        return None
    pid, sock = held
    request = {"profile": {"name": profile.name, "source": profile.source, "env": dict(profile.env),
                           "options": dict(profile.options), "sections": dict(profile.sections),
                           "origin": profile.origin, "code": nonce},
               "env": dict(env), **_vault_field(env)}
    try:
        sock.sendall(frame(request))
    except (OSError, TypeError, ValueError):  # gone, or a profile table JSON cannot carry: fork anew
        sock.close()
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        return None
    finally:
        del request
    return pid, sock


def fetch_isolated(profile: Profile, env: Mapping[str, str]) -> Credentials | None:
    """Fetch a vault profile in a forked child of this process, as the daemon does; None when that fails.

    ``credbroker run`` fetches this way when no daemon runs: every copy the
    fetch makes (hvac's, requests' and the JSON decoder's immutable objects,
    the HTTP and TLS buffers) stays in the child and goes when it exits; this
    process receives the fields into one buffer it wipes. A BrokerError in the
    child is raised here as the in-process fetch would raise it. None (the
    caller then fetches in-process) when no child can be made or it ends
    without an answer.
    """
    import secrets
    import signal

    from .hardening import die_with_parent

    nonce = secrets.token_hex(8)
    parent = os.getpid()
    early = _ask_preforked(profile, env, nonce)
    if early is not None:
        pid, ours = early
        return _isolated_answer(pid, ours, profile, env, nonce)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        return None
    if pid == 0:
        status = 1
        try:
            ours.close()
            die_with_parent(parent, signal.SIGKILL)  # a broker that dies takes its fetch along
            _default_signals()
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
            theirs.sendall(_fetch_reply(profile, env, {"protocol": PROTOCOL, "code": nonce}))
            status = 0
        finally:
            os._exit(status)
    theirs.close()
    return _isolated_answer(pid, ours, profile, env, nonce)


def _isolated_answer(pid: int, ours: socket.socket, profile: Profile, env: Mapping[str, str], nonce: str
                     ) -> Credentials | None:
    """The fetch child's answer (then reaped); None when it ended without one."""
    answer: bytearray | None = None
    try:
        ours.settimeout(4 * _timeout(env) + 10)
        answer = recv_frame(ours)
    except (OSError, ValueError, ConnectionError):
        pass
    finally:
        ours.close()
        if answer is None:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        os.waitpid(pid, 0)
    if answer is None:
        return None
    try:
        return _decode_reply(answer, profile, nonce, via="child")
    finally:
        wipe_buffer(answer)


def _timeout(env: Mapping[str, str]) -> float:
    """The Vault request deadline the caller's settings name (the environment, else ``[vault] timeout``)."""
    raw, where = lookup(env, "CREDBROKER_VAULT_TIMEOUT")
    return units.seconds(raw, where or "CREDBROKER_VAULT_TIMEOUT") if raw else 10.0


def _default_signals() -> None:
    """In a forked child: the default action for every signal the parent handles in Python."""
    import signal

    for signum in signal.valid_signals():
        try:
            if callable(signal.getsignal(signum)):
                signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            continue


def _error_from(data: Any) -> BrokerError:
    from .errors import from_dict

    return from_dict(data)


# -- server --------------------------------------------------------------------------


def _encode_reply(meta: Mapping[str, Any], creds: Credentials | None = None) -> bytearray:
    """A reply frame: length, metadata length, JSON metadata, then the raw secret bytes.

    The secret bytes never go through JSON or base64 (immutable ``str``/``bytes``
    copies the client could not wipe); the metadata names each field's offset
    and length in the raw part.
    """
    offsets: dict[str, list[int]] = {}
    raw = bytearray()
    if creds is not None:
        for name, secret in creds.items():
            offsets[name] = [len(raw), len(secret)]
            raw += secret.reveal()
    head = json.dumps({**meta, "fields": offsets} if creds is not None else dict(meta),
                      separators=(",", ":")).encode()
    out = bytearray(HEADER.pack(HEADER.size + len(head) + len(raw)))
    out += HEADER.pack(len(head))
    out += head
    out += raw
    wipe_buffer(raw)
    return out


def _handle(request: Any) -> bytearray:
    base = {"protocol": PROTOCOL, "version": __version__, "code": _SERVER_CODE}
    if isinstance(request, dict) and request.get("code") != _SERVER_CODE:
        # Different code from the caller's (an upgrade since this daemon started):
        # answer before touching Vault, so the caller fetches in-process instead
        # and Vault sees exactly one read for the one fetch the broker records.
        return _encode_reply({**base, "ok": False, "stale": True})
    if not isinstance(request, dict) or request.get("op") != "fetch" or request.get("protocol") != PROTOCOL:
        return _encode_reply({**base, "ok": False, "error": BrokerError(
            "unsupported request", "use the same credbroker version as the daemon").to_dict()})
    try:
        p = request["profile"]
        profile = Profile(name=str(p["name"]), source=str(p["source"]), env=dict(p["env"]),
                          options=dict(p["options"]))
        if profile.source != "vault":
            raise BrokerError("the daemon only serves vault profiles", "fetch keyring profiles in-process")
        env = _settings_env(request)
    except BrokerError as exc:
        return _encode_reply({**base, "ok": False, "error": exc.to_dict()})
    except (KeyError, TypeError, ValueError):
        return _encode_reply({**base, "ok": False, "error": BrokerError(
            "malformed request", "use the same credbroker version as the daemon").to_dict()})
    return _fetch_reply(profile, env, base)


def _vault_field(env: Mapping[str, str]) -> dict[str, Any]:
    """The caller's ``[vault]`` table as a request carries it beside the environment (``_settings_env``
    rebuilds it): the daemon and the early fetch child resolve settings as the caller would in-process."""
    table = vault_table(env)
    return {} if table is None else {"vault": {"values": dict(table.values), "file": table.file}}


def _settings_env(request: Mapping[str, Any]) -> SettingsEnv:
    """The caller's environment and ``[vault]`` table, as it sent them (KeyError/TypeError when malformed)."""
    environ = {str(k): str(v) for k, v in dict(request["env"]).items()}
    vault = request.get("vault")
    if vault is None:
        return SettingsEnv(environ)
    values = {str(k): str(v) for k, v in dict(vault["values"]).items()}
    return SettingsEnv(environ, VaultTable(values=values, file=str(vault["file"])))


def _fetch_reply(profile: Profile, env: Mapping[str, str], base: Mapping[str, Any]) -> bytearray:
    """Fetch in this (throwaway) process; the reply frame, secrets raw after the metadata.

    The vault source itself, not ``sources.fetch`` (whose client side asks this daemon): the caller's
    ``sources.fetch`` checks the fields and fetches a PEM key's passphrase as for an in-process read."""
    from .sources.vault import fetch as vault_fetch
    from .vault.settings import VaultSettings

    try:  # this process's edge: the caller's environment and [vault], resolved once here
        creds = vault_fetch(profile, settings=VaultSettings.from_env(env))
    except BrokerError as exc:
        return _encode_reply({**base, "ok": False, "error": exc.to_dict()})
    try:
        return _encode_reply({**base, "ok": True, "origin": creds.origin.to_dict()}, creds)
    finally:
        creds.wipe()


def _serve_one(conn: socket.socket, deadline: float) -> None:
    """In a forked child: read one request (by ``deadline``), fetch, answer."""
    request = recv_frame(conn, deadline=deadline)
    reply = _handle(json.loads(request))
    conn.settimeout(REPLY_TIMEOUT)
    conn.sendall(reply)


def _child(conn: socket.socket, listener: socket.socket) -> NoReturn:
    """The forked process that serves one connection, then exits with every copy it made."""
    import signal

    status = 1
    try:
        listener.close()
        signal.set_wakeup_fd(-1)
        _default_signals()
        # A backstop whatever Vault or the client does; the default action ends the process.
        signal.alarm(CHILD_LIMIT)
        _serve_one(conn, time.monotonic() + REQUEST_DEADLINE)
        status = 0
    finally:
        # Always leave here, also on an error: never return into the parent's loop.
        os._exit(status)


#: Credentials the daemon itself never needs (every request brings the caller's own).
_OWN_CREDENTIALS = ("VAULT_TOKEN", "BAO_TOKEN", "VAULT_SECRET_ID", "BAO_SECRET_ID", "CREDBROKER_SECRET_ID")


def _drop_own_credentials() -> list[str]:
    """Overwrite and remove Vault credentials this process was started with; the names dropped.

    A daemon started from a shell that exported ``VAULT_TOKEN`` would hold
    that token for its whole life (in the C environment block and in
    ``os.environ``) although it never uses it. Both copies are zeroed before
    the variable is removed. The bytes objects overwritten here are
    ``os.environ``'s private values (not shared, never interned).
    """
    import ctypes

    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_void_p
    libc.getenv.argtypes = [ctypes.c_char_p]
    data: dict[bytes, bytes] = os.environ._data  # type: ignore[attr-defined]
    dropped = []
    for name in _OWN_CREDENTIALS:
        key = name.encode()
        if key not in data:
            continue
        c_value = libc.getenv(key)
        if c_value:
            ctypes.memset(c_value, 0, len(ctypes.string_at(c_value)))
        value = data[key]
        if len(value) > 1:  # 0- and 1-byte bytes objects are shared singletons: never touch those
            ctypes.memset(ctypes.c_char_p(value), 0, len(value))
        del value
        os.environ.pop(name, None)
        dropped.append(name)
    return dropped


def _reap(children: set[int]) -> None:
    for pid in list(children):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            children.discard(pid)


def serve(path: Path, *, ready: Any = None) -> None:
    """Serve fetches on ``path`` until SIGTERM/SIGINT.

    Each connection is served by a child process forked for it: clients are
    served concurrently (one idle or slow client never delays another), each
    child has a deadline, and every copy of a secret or token a fetch makes
    (JSON, HTTP and TLS buffers, hvac's objects) lives only in that child and
    is gone when it exits. This process never reads a request.
    """
    import select
    import signal

    from .hardening import harden_process

    global _SERVER_CODE
    _SERVER_CODE = code_id()
    harden_process()
    _drop_own_credentials()
    import hvac  # noqa: F401 - the whole point: load it once, here

    from .sources import vault  # noqa: F401
    from .vault import transport  # noqa: F401 - else every forked child imports it for its one fetch

    if not private_dir(path.parent, create=True):
        raise BrokerError(f"{path.parent} is not a folder private to this user (owner and mode 0700)",
                          "remove it or choose another --socket")
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    server = listen_private(path, 64)
    # A child's exit wakes the loop (through this pipe), so its slot is free at once.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    children: set[int] = set()
    if ready is not None:
        ready(path)
    try:
        while True:
            readable, _, _ = select.select([server.fileno(), wake_r], [], [], 1.0)
            if wake_r in readable:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
            _reap(children)
            if server.fileno() not in readable:
                continue
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                try:
                    if not peer_is_me(conn):
                        continue
                except OSError:
                    continue
                if len(children) >= MAX_CLIENTS:
                    continue  # busy: closing makes the client fetch in-process, not wait
                pid = os.fork()
                if pid == 0:
                    _child(conn, server)
                children.add(pid)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)
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
    # SIGTERM (a service manager) or Ctrl-C ended serve(): a normal stop, said as such.
    print(f"credbroker daemon: stopped; {path} removed, `credbroker run` fetches in-process until it is "
          "started again", file=sys.stderr, flush=True)
