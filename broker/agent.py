"""The signing agent: the broker signs for its bot, so the bot never holds the secret (issue 6).

``credbroker run --agent --profile P -- python bot.py`` keeps the signing key
in the broker. The child gets the public API key and ``CREDBROKER_AGENT_SOCKET``,
the path of a Unix socket served by a thread of the broker; ``get_signer()``
in the child finds it and asks the broker to sign (``broker.signing.agent``).

Who may connect:

* the socket sits in a fresh folder only this user can enter (0700, made by
  ``mkdtemp``); the socket itself is 0600;
* at every connection the agent reads the peer's credentials (``SO_PEERCRED``):
  the uid must be ours, and the pid must be the bot the broker started or one
  of its descendants (the parent chain in ``/proc/PID/stat`` leads to the
  child's pid). Anything else is refused with one line and an ``agent_refused``
  audit record. A process the bot double-forked away (re-parented to init) is
  outside the tree and refused too;
* the agent is a thread of the broker: it dies with it. It removes its folder
  when the run ends; after a SIGKILL of the broker the folder (with a socket
  nobody listens on) stays behind in ``$XDG_RUNTIME_DIR`` or ``/tmp``.

What is checked and recorded, per request: the profile's signing policy
(``broker.signing_policy``) first; then one audit record per signature
(``signed``: profile, caller pid, endpoint, method, parameter names and the
order's public fields; never the signature, the timestamp or any secret), or
one ``policy_refused`` record for a refusal.

Durability ("nothing acknowledged is lost"): a signature is sent back only
after its audit record is written to the log file *and* fsynced. Records are
group-committed: the agent reads every request that is waiting on any
connection, signs them, writes all their records with one ``write`` and one
``fdatasync`` (``AuditLog.flush``), and only then answers them all. One bot
signing one request at a time therefore waits one fsync per signature; many
concurrent requests share one. If the log cannot be written, every request of
that group is answered with an error instead of a signature (fail closed).

Wire format: a 4-byte big-endian length, then a JSON object (as
``broker.daemon``). Requests: ``{"op": "hello"}`` and ``{"op": "sign", "q":
QUERY, "b": BODY, "e": PATH, "m": METHOD}``; the agent signs ``q + b``
(Binance's totalParams). Replies: ``{"ok": true, ...}`` or ``{"ok": false,
"error": {"type", "message", "remedy", "rule"}}``.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from .errors import BrokerError, RunError
from .signing_policy import PolicyRefused, SigningPolicy, SignRequest
from .unixsock import HEADER, MAX_MESSAGE, frame, listen_private, peer_credentials, private_dir

PROTOCOL = 1
SOCKET_VAR = "CREDBROKER_AGENT_SOCKET"
_MAX_TREE_DEPTH = 128

#: Audit event names this module writes.
SIGNED = "signed"
POLICY_REFUSED = "policy_refused"
AGENT_REFUSED = "agent_refused"
AGENT_STARTED = "agent_started"
AGENT_STOPPED = "agent_stopped"


class AgentRefused(BrokerError):
    """The signing agent refused a connection (not the bot's process tree)."""


class AuditSink(Protocol):
    """What the agent needs from the audit log (``broker.audit.AuditLog`` fits)."""

    def record(self, event: str, fields: Mapping[str, Any], *, durable: bool = True) -> Any: ...

    def flush(self) -> None: ...


class RecorderSink:
    """An ``AuditSink`` over a plain ``record(event, fields)`` callable: every record durable."""

    def __init__(self, record: Callable[[str, dict[str, Any]], Any]) -> None:
        self._record = record

    def record(self, event: str, fields: Mapping[str, Any], *, durable: bool = True) -> Any:
        return self._record(event, dict(fields))

    def flush(self) -> None:
        pass


# -- peer checks ---------------------------------------------------------------------------


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` from ``/proc/PID/stat`` (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ')'.
    try:
        return int(data[data.rindex(b")") + 2:].split()[1])
    except (ValueError, IndexError):
        return None


def in_tree(pid: int, root: int) -> bool:
    """True when ``pid`` is ``root`` or one of its descendants."""
    current: int | None = pid
    for _ in range(_MAX_TREE_DEPTH):
        if current is None or current <= 1:
            return False
        if current == root:
            return True
        current = parent_pid(current)
    return False


# -- the server ----------------------------------------------------------------------------


class _Conn:
    __slots__ = ("sock", "pid", "inbuf", "outbuf")

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid
        self.inbuf = bytearray()
        self.outbuf = bytearray()


class Agent:
    """The broker side: a thread that signs for the bot's process tree (see the module docstring)."""

    def __init__(
        self,
        signer: Any,
        *,
        profile: str,
        policy: SigningPolicy,
        audit: AuditSink,
        runtime_dir: str | os.PathLike[str] | None = None,
        peer_uid: int | None = None,
    ) -> None:
        self._signer = signer
        #: the uid the bot runs as (``--user``); ours by default
        self.peer_uid = os.getuid() if peer_uid is None else peer_uid
        self.profile = profile
        self.policy = policy
        self._audit = audit
        self._runtime_dir = runtime_dir
        self.folder: Path | None = None
        self.path: Path | None = None
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._stopping = False
        self._child: int | None = None
        self._child_set = threading.Event()
        self._lock = threading.Lock()
        self.signed = 0
        self.refused = 0
        self._pending_replies: list[tuple[_Conn, dict[str, Any]]] = []
        self._pending_records = 0
        self._round_failed: BrokerError | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> Path:
        """Create the private folder and the socket, start the serving thread; return the socket path.

        Call it with the broker's forwarded signals already blocked: the thread
        inherits the mask, so every signal keeps going to the main thread.
        """
        base = self._runtime_dir or os.environ.get("XDG_RUNTIME_DIR") or None
        if base is not None and not os.path.isdir(base):
            base = None
        try:
            folder = Path(tempfile.mkdtemp(prefix="credbroker-agent-", dir=base))  # 0700
            path = folder / "agent.sock"
            listener = listen_private(path, 64)
            listener.setblocking(False)
        except OSError as exc:
            raise RunError(f"cannot create the signing agent's socket: {exc.strerror or exc}",
                           "check that $XDG_RUNTIME_DIR (or /tmp) is writable") from exc

        if not private_dir(folder, create=False):  # the same check the fetch daemon's clients make
            raise RunError(f"{folder} is not private to this user", "check the permissions of its parent folder")
        if self.peer_uid != os.getuid():
            # A bot of another user: it may enter the folder (not list it) and
            # connect to the socket, which is its own (0600); nobody else may.
            try:
                os.chown(path, self.peer_uid, -1)
                os.chmod(folder, 0o711)
            except OSError as exc:
                listener.close()
                raise RunError(f"cannot open the signing agent's socket to uid {self.peer_uid}: "
                               f"{exc.strerror or exc}", "run credbroker as root to use --user") from exc
        self.folder, self.path, self._listener = folder, path, listener
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._serve, name="credbroker-agent", daemon=True)
        self._thread.start()
        return path

    def set_child(self, pid: int | None) -> None:
        """The pid of the bot now running: connections are accepted from its process tree only."""
        with self._lock:
            self._child = pid
        if pid is None:
            self._child_set.clear()
        else:
            self._child_set.set()

    def set_signer(self, signer: Any) -> None:
        """Swap the signer (after a key rotation); the old one is closed."""
        with self._lock:
            old, self._signer = self._signer, signer
        if old is not None and old is not signer:
            old.close()

    def stop(self) -> None:
        """Stop the thread, close every connection, remove the socket and its folder. Idempotent."""
        self._stopping = True
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self.path is not None:
            try:
                self.path.unlink()
            except OSError:
                pass
        if self.folder is not None:
            try:
                self.folder.rmdir()
            except OSError:
                pass
        with self._lock:
            signer, self._signer = self._signer, None
        if signer is not None:
            signer.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving -----------------------------------------------------------------------
    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        assert self._listener is not None
        sel.register(self._listener, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        conns: dict[int, _Conn] = {}
        try:
            while not self._stopping:
                events = sel.select()
                touched: dict[int, _Conn] = {}
                for key, mask in events:
                    if key.fileobj is self._listener:
                        self._accept(sel, conns)
                    elif key.fd == self._wake_r:
                        try:
                            os.read(self._wake_r, 4096)
                        except OSError:
                            pass
                    else:
                        conn = key.data
                        if mask & selectors.EVENT_READ and not self._read(conn):
                            self._drop(sel, conns, conn)
                            continue
                        touched[conn.sock.fileno()] = conn
                self._commit()
                for conn in touched.values():
                    if conn.sock.fileno() in conns and not self._write(sel, conn):
                        self._drop(sel, conns, conn)
        finally:
            for conn in list(conns.values()):
                self._drop(sel, conns, conn)
            sel.close()

    def _accept(self, sel: selectors.BaseSelector, conns: dict[int, _Conn]) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                pid, uid, _gid = peer_credentials(sock)
                reason = self._refusal(pid, uid)
            except OSError:
                pid, reason = 0, "its credentials could not be read"
            if reason is not None:
                self._refuse(sock, pid, reason)
                continue
            sock.setblocking(False)
            conn = _Conn(sock, pid)
            conns[sock.fileno()] = conn
            sel.register(sock, selectors.EVENT_READ, conn)

    def _refusal(self, pid: int, uid: int) -> str | None:
        if uid != self.peer_uid:
            return f"uid {uid} is not the bot's"
        # The bot can connect before spawn() has returned its pid to us: wait a moment.
        self._child_set.wait(timeout=5.0)
        with self._lock:
            child = self._child
        if child is None:
            return "no bot is running"
        if not in_tree(pid, child):
            return f"pid {pid} is not the bot (pid {child}) or one of its descendants"
        return None

    def _refuse(self, sock: socket.socket, pid: int, reason: str) -> None:
        self.refused += 1
        try:
            self._audit.record(AGENT_REFUSED, {"profile": self.profile, "pid": pid, "reason": reason})
        except BrokerError:
            pass  # refusing is what matters; the log's trouble shows at the next signature
        error = {"type": "AgentRefused", "message": f"the credbroker signing agent refused this process: {reason}",
                 "remedy": "only the bot that `credbroker run --agent` started (and its children) may sign"}
        try:
            sock.settimeout(1.0)
            sock.sendall(frame({"ok": False, "protocol": PROTOCOL, "error": error}))
        except OSError:
            pass
        finally:
            sock.close()

    def _read(self, conn: _Conn) -> bool:
        """Read what is there, handle every complete request; False when the peer is gone."""
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            return False
        if len(conn.outbuf) > 4 * MAX_MESSAGE:
            return False  # a client that sends without ever reading its answers: drop it, not our memory
        buf = conn.inbuf
        buf += data
        while len(buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(buf)
            if length > MAX_MESSAGE:
                return False
            end = HEADER.size + length
            if len(buf) < end:
                break
            raw = bytes(buf[HEADER.size:end])
            del buf[:end]
            self._pending_replies.append((conn, self._handle(raw, conn.pid)))
        return True

    def _commit(self) -> None:
        """Group commit: one write + fsync for every record of this round, then queue the replies."""
        replies, self._pending_replies = self._pending_replies, []
        failure, self._round_failed = self._round_failed, None
        if self._pending_records:
            self._pending_records = 0
            try:
                self._audit.flush()
            except BrokerError as exc:
                failure = exc
        if failure is not None:
            # Not recorded means not acknowledged: no signature leaves this round.
            failed = _error("AuditError", failure.message, failure.remedy)
            replies = [(conn, failed) for conn, _ in replies]
        for conn, reply in replies:
            conn.outbuf += frame(reply)

    def _write(self, sel: selectors.BaseSelector, conn: _Conn) -> bool:
        if conn.outbuf:
            try:
                n = conn.sock.send(conn.outbuf)
                del conn.outbuf[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return False
        sel.modify(conn.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0), conn)
        return True

    def _drop(self, sel: selectors.BaseSelector, conns: dict[int, _Conn], conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd >= 0:
            try:
                sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conns.pop(fd, None)
        conn.sock.close()

    # -- requests ----------------------------------------------------------------------
    def _handle(self, raw: bytes, pid: int) -> dict[str, Any]:
        try:
            request = json.loads(raw)
        except ValueError:
            return _error("SigningError", "the signing agent got a malformed request",
                          "use the same credbroker version in the bot as in the broker")
        if not isinstance(request, dict):
            return _error("SigningError", "the signing agent got a malformed request", None)
        op = request.get("op")
        if op == "sign":
            return self._sign(request, pid)
        if op == "hello":
            signer = self._signer
            # The public API key too, for a profile that maps no variable to it (it is not the secret).
            api_key = getattr(signer, "_api_key", None)
            return {"ok": True, "protocol": PROTOCOL, "profile": self.profile,
                    "kind": getattr(signer, "kind", None), "recv_window": getattr(signer, "recv_window", None),
                    "api_key": str(api_key) if api_key is not None else None}
        return _error("SigningError", f"the signing agent does not know the operation {str(op)[:32]!r}",
                      "use the same credbroker version in the bot as in the broker")

    def _sign(self, request: Mapping[str, Any], pid: int) -> dict[str, Any]:
        query, body = request.get("q", ""), request.get("b", "")
        endpoint, method = request.get("e"), request.get("m")
        if not isinstance(query, str) or not isinstance(body, str) or not all(
                v is None or (isinstance(v, str) and len(v) <= 2048) for v in (endpoint, method)):
            return _error("SigningError", "the signing agent got a malformed sign request", None)
        summary: dict[str, Any] = {"endpoint": endpoint, "method": method}
        try:
            req = SignRequest.from_parts(query, body, endpoint, method)
            summary = req.summary()
            self.policy.check(req)
        except PolicyRefused as exc:
            self.refused += 1
            return self._recorded(POLICY_REFUSED, {"profile": self.profile, "pid": pid, "rule": exc.rule,
                                                   "reason": exc.message, **summary},
                                  _error("PolicyRefused", exc.message, exc.remedy, rule=exc.rule))
        signer = self._signer
        if signer is None:
            return _error("SigningError", "the signing agent is shutting down", None)
        try:
            signature = signer.sign(query + body)  # Binance's totalParams: query then body, no separator
        except BrokerError as exc:
            return _error(type(exc).__name__, exc.message, exc.remedy)
        self.signed += 1
        return self._recorded(SIGNED, {"profile": self.profile, "pid": pid, **summary},
                              {"ok": True, "sig": signature})

    def _recorded(self, event: str, fields: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
        try:
            self._audit.record(event, fields, durable=False)
        except BrokerError as exc:
            # An automatic flush inside record() may have lost earlier records of this round too.
            self._round_failed = exc
            return _error("AuditError", exc.message, exc.remedy)
        self._pending_records += 1
        return reply


def _error(kind: str, message: str, remedy: str | None, *, rule: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"type": kind, "message": message, "remedy": remedy}
    if rule is not None:
        err["rule"] = rule
    return {"ok": False, "error": err}





# -- what `credbroker run` calls --------------------------------------------------------------


class RunSigning:
    """The broker's signing for one ``credbroker run``: key preflight and, in agent mode, the agent.

    ``broker.runner.run`` calls, in order: ``prepare`` (before any fetch:
    validates the policy and the signer kind), ``check_key`` (after the fetch:
    builds the signer, runs the preflight), ``child_view`` (what the child may
    see), ``start_agent`` (signals already blocked), ``use``/``started`` around
    each spawn, and ``stop`` at the end.
    """

    def __init__(self, profile: Any, *, agent: bool, preflight: Any, settings: Any, policy: SigningPolicy | None
                 ) -> None:
        self.profile = profile
        self.agent = agent
        self.preflight = preflight
        self.settings = settings
        self.policy = policy
        self.signer: Any = None
        self._creds: Any = None
        self._audit_config: Any = None
        self.server: Agent | None = None
        self._record: Callable[[str, dict[str, Any]], Any] | None = None

    @classmethod
    def prepare(cls, profile: Any, *, agent: bool, preflight: Any, env: Mapping[str, str]) -> RunSigning:
        """Validate what can be validated before any secret is fetched (ConfigError: one line)."""
        from .errors import ConfigError
        from .signing.settings import SignerSettings

        settings = SignerSettings.for_profile(profile)
        policy = None
        if agent:
            if settings.type == "transit":
                raise ConfigError(f"{profile.where('signer')}: --agent does not apply to a transit signer",
                                  "run without --agent: with transit the key already stays inside Vault")
            policy = SigningPolicy.for_profile(profile)
            if preflight is None:
                from .preflight import PreflightOptions

                preflight = PreflightOptions.build(mode="auto", env=env)
        elif preflight is not None and preflight.mode != "off" and settings.type == "transit":
            raise ConfigError(f"{profile.where('signer')}: the key preflight needs a local key, not transit",
                              "run without --preflight")
        return cls(profile, agent=agent, preflight=preflight, settings=settings, policy=policy)

    def _make_signer(self, creds: Any) -> Any:
        from .signing import make_signer

        return make_signer(self.settings, dict(creds.items()), profile=self.profile.name,
                           where=self.profile.where("signer"), audit_config=self._audit_config,
                           record_failures=False)

    def check_key(self, creds: Any, *, record: Callable[[str, dict[str, Any]], Any], audit_config: Any = None
                  ) -> None:
        """Build the broker's signer from ``creds`` and run the key preflight (raises to stop the run)."""
        self._audit_config = audit_config
        self._record = record
        signer = self._make_signer(creds)
        try:
            if self.preflight is not None and self.preflight.mode != "off":
                from .preflight import run_preflight

                run_preflight(signer, self.preflight, profile=self.profile.name, record=record)
        except BaseException:
            signer.close()
            raise
        if self.agent:
            self.signer, self._creds = signer, creds
        else:
            signer.close()

    def child_view(self, parent: Mapping[str, str], profile: Any) -> tuple[dict[str, str], Any]:
        """(parent environment, profile) the child's environment is built from: the API key variable only.

        Every variable the profile maps is removed from the parent environment
        first (a stale copy of the secret must not reach the child either).
        """
        keep = {var: field for var, field in profile.env.items() if field == self.settings.api_key_field}
        clean = {k: v for k, v in parent.items() if k not in profile.env and k != SOCKET_VAR}
        return clean, profile._replace(env=keep)

    def start_agent(self, audit_log: Any, record: Callable[[str, dict[str, Any]], Any],
                    peer_uid: int | None = None) -> dict[str, str]:
        """Start the agent's thread; the variables the child needs (``CREDBROKER_AGENT_SOCKET``).

        ``peer_uid``: the bot runs as that user (``--user``); the socket admits
        it, in a folder under the system's temporary folder (our runtime folder
        is closed to it).
        """
        assert self.policy is not None and self.signer is not None
        sink: AuditSink = audit_log if audit_log is not None else RecorderSink(record)
        runtime = tempfile.gettempdir() if peer_uid is not None and peer_uid != os.getuid() else None
        self.server = Agent(self.signer, profile=self.profile.name, policy=self.policy, audit=sink,
                            runtime_dir=runtime, peer_uid=peer_uid)
        path = self.server.start()
        record(AGENT_STARTED, {"profile": self.profile.name, "socket": str(path), "kind": self.signer.kind,
                               "policy": self.policy.describe()})
        return {SOCKET_VAR: str(path)}

    def use(self, creds: Any) -> None:
        """Before a (re)start: sign with ``creds`` (a rotation brings new ones)."""
        if self.server is None or creds is self._creds:
            return
        self.server.set_signer(self._make_signer(creds))
        self._creds = creds

    def started(self, pid: int) -> None:
        """The bot now running: only its process tree may use the socket."""
        if self.server is not None:
            self.server.set_child(pid)

    def stop(self) -> None:
        """Stop the agent (if any), record its totals, forget the key. Idempotent."""
        server, self.server = self.server, None
        if server is not None:
            server.stop()
            if self._record is not None:
                try:
                    self._record(AGENT_STOPPED, {"profile": self.profile.name, "signed": server.signed,
                                                 "refused": server.refused})
                except BrokerError:
                    pass
        elif self.signer is not None:
            self.signer.close()
        self.signer = None
