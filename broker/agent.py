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
  child's pid). Anything else is refused and closed, with a one-line reason
  for its first ``EXPLAIN_REFUSALS`` attempts in a window. A process the bot
  double-forked away (re-parented to init) is outside the tree and refused too;
* the agent is a thread of the broker: it dies with it. It removes its folder
  when the run ends; after a SIGKILL of the broker the folder (with a socket
  nobody listens on) stays behind in ``$XDG_RUNTIME_DIR`` or ``/tmp``.

Refusals cannot stall the bot. The peer check never blocks: the uid (one
``getsockopt``) is checked first, then the parent chain in ``/proc``. Until
the bot's pid is known nothing is accepted: a connection (the bot's, racing
its own start) waits in the socket's backlog, in order, and holds up nothing.
Connections are multiplexed on one thread; each round answers the requests already
waiting on open connections before it accepts at most ``ACCEPT_BATCH`` new
ones, so a flood of connections delays a bot's signature by at most one small
batch of refusals. Refusals are recorded aggregated, never one fsync each:
one ``agent_refused`` record per peer (pid, uid, reason) per
``REFUSAL_WINDOW`` seconds with the ``count`` of connections refused, written
when the window ends and when the agent stops (beyond ``MAX_PEERS_RECORDED``
peers in one window the rest share one record with ``pid`` null).

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
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from . import childenv
from .events import Event, Recorder
from .errors import AgentRefused, BrokerError, PolicyRefused, RunError, from_dict
from .signing_policy import SigningPolicy, SignRequest
from .unixsock import HEADER, MAX_MESSAGE, frame, listen_private, peer_credentials, private_dir

PROTOCOL = 1
SOCKET_VAR = childenv.AGENT_SOCKET
_MAX_TREE_DEPTH = 128
_MAX_OUTSIDERS = 4096

#: New connections accepted (and checked) per round, after the round's requests are answered.
ACCEPT_BATCH = 4
#: Refusals are counted per peer and recorded once per window of this many seconds.
REFUSAL_WINDOW = 10.0
#: Refusals per peer and window that are explained to the peer (one line); later ones are just closed.
EXPLAIN_REFUSALS = 8
#: Peers recorded one by one per window; the rest share one record.
MAX_PEERS_RECORDED = 64

#: Audit event names this module writes.
SIGNED = Event.SIGNED
POLICY_REFUSED = Event.POLICY_REFUSED
AGENT_REFUSED = Event.AGENT_REFUSED
AGENT_STARTED = Event.AGENT_STARTED
AGENT_STOPPED = Event.AGENT_STOPPED


class AuditSink(Protocol):
    """What the agent needs from the audit log (``broker.audit.AuditLog`` fits)."""

    def record(self, event: str, fields: Mapping[str, Any], *, durable: bool = True) -> Any: ...

    def flush(self) -> None: ...


class RecorderSink:
    """An ``AuditSink`` over a plain ``record(event, fields)`` callable: every record durable."""

    def __init__(self, record: Recorder) -> None:
        self._record = record

    def record(self, event: str, fields: Mapping[str, Any], *, durable: bool = True) -> Any:
        return self._record(event, dict(fields))

    def flush(self) -> None:
        pass


# -- peer checks ---------------------------------------------------------------------------


def _stat(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (None if the process is gone).

    Read with ``os.open``/``os.read``: a third of the cost of ``open()``, and this
    runs for every connection a stranger makes.
    """
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ')'.
    try:
        return data[data.rindex(b")") + 2:].split()
    except ValueError:
        return None


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` from ``/proc/PID/stat`` (None if it is gone)."""
    fields = _stat(pid)
    try:
        return int(fields[1]) if fields is not None else None
    except (ValueError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot): with the pid, names one process, never its successor."""
    fields = _stat(pid)
    try:
        return int(fields[19]) if fields is not None else None
    except (ValueError, IndexError):
        return None


def in_tree(pid: int, root: int) -> bool:
    """True when ``pid`` is ``root`` or one of its descendants."""
    return tree_walk(pid, root) is True


def tree_walk(pid: int, root: int) -> bool | None:
    """True: ``pid`` is ``root`` or below it; False: the chain reached init without it;
    None: a process of the chain vanished during the walk (no lasting verdict)."""
    current: int | None = pid
    for _ in range(_MAX_TREE_DEPTH):
        if current is None:
            return None
        if current <= 1:
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


class RefusalTally:
    """Refused connections counted per peer, turned into one audit record per peer per window."""

    def __init__(self, window: float | None = None, max_peers: int | None = None) -> None:
        self.window = REFUSAL_WINDOW if window is None else window
        self.max_peers = MAX_PEERS_RECORDED if max_peers is None else max_peers
        self.counts: dict[tuple[int | None, int | None, str], int] = {}
        self.started: float | None = None

    def add(self, pid: int | None, uid: int | None, reason: str, now: float) -> int:
        """Count one refusal; how many this peer has had in this window."""
        if self.started is None:
            self.started = now
        key = (pid, uid, reason)
        if key not in self.counts and len(self.counts) >= self.max_peers:
            key = (None, None, "more peers than recorded one by one in this window")
        count = self.counts[key] = self.counts.get(key, 0) + 1
        return count

    def due(self, now: float) -> bool:
        return self.started is not None and now - self.started >= self.window

    def deadline(self) -> float | None:
        return None if self.started is None else self.started + self.window

    def drain(self, profile: str, now: float) -> list[dict[str, Any]]:
        """The records for the window so far (and start a new one)."""
        seconds = 0.0 if self.started is None else round(now - self.started, 3)
        records = [{"profile": profile, "pid": pid, "uid": uid, "reason": reason, "count": count,
                    "window_s": seconds} for (pid, uid, reason), count in self.counts.items()]
        self.counts, self.started = {}, None
        return records


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
        self._lock = threading.Lock()
        self.signed = 0
        self.refused = 0
        self._pending_replies: list[tuple[_Conn, dict[str, Any]]] = []
        self._pending_records = 0
        self._round_failed: BrokerError | None = None
        self._tally = RefusalTally()
        #: pid -> (start time, bot pid) of processes found outside the bot's tree.
        self._outsiders: dict[int, tuple[int, int]] = {}

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
            # A deep backlog: under a flood of foreign connections the bot's own new
            # connections (its threads, its children) queue here until their turn.
            listener = listen_private(path, 1024)
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
        self._wake()  # accept (or stop accepting) at once

    def set_signer(self, signer: Any) -> None:
        """Swap the signer (after a key rotation); the old one is closed."""
        with self._lock:
            old, self._signer = self._signer, signer
        if old is not None and old is not signer:
            old.close()

    def stop(self) -> None:
        """Stop the thread, close every connection, remove the socket and its folder. Idempotent."""
        self._stopping = True
        self._wake()
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

    def _wake(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # the pipe is full: the loop is awake already

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving -----------------------------------------------------------------------
    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        assert self._listener is not None
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        conns: dict[int, _Conn] = {}
        listening = False
        try:
            while not self._stopping:
                with self._lock:
                    bot_known = self._child is not None
                if bot_known != listening:
                    # Until the bot's pid is known, connections wait in the backlog, unaccepted.
                    if bot_known:
                        sel.register(self._listener, selectors.EVENT_READ, None)
                    else:
                        sel.unregister(self._listener)
                    listening = bot_known
                events = sel.select(self._tally_timeout())
                touched: dict[int, _Conn] = {}
                incoming = False
                for key, mask in events:
                    if key.fileobj is self._listener:
                        incoming = True
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
                # The requests already waiting come first: sign, commit, answer ...
                self._commit()
                for conn in touched.values():
                    if conn.sock.fileno() in conns and not self._write(sel, conn):
                        self._drop(sel, conns, conn)
                # ... then at most one batch of newcomers (a flood waits in the backlog, not the bot).
                if incoming:
                    self._accept(sel, conns)
                if self._tally.due(time.monotonic()):
                    self._record_refusals()
        finally:
            for conn in list(conns.values()):
                self._drop(sel, conns, conn)
            sel.close()
            self._record_refusals()

    def _tally_timeout(self) -> float | None:
        end = self._tally.deadline()
        return None if end is None else max(0.0, end - time.monotonic())

    def _accept(self, sel: selectors.BaseSelector, conns: dict[int, _Conn]) -> None:
        assert self._listener is not None
        with self._lock:
            if self._child is None:
                return  # not yet (or no longer) a bot: leave them in the backlog
        for _ in range(ACCEPT_BATCH):
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
                pid, uid, reason = 0, -1, "its credentials could not be read"
            if reason is not None:
                self._refuse(sock, pid, uid, reason)
                continue
            sock.setblocking(False)
            conn = _Conn(sock, pid)
            conns[sock.fileno()] = conn
            sel.register(sock, selectors.EVENT_READ, conn)

    def _refusal(self, pid: int, uid: int) -> str | None:
        """Why a peer may not sign (None: it may). Never blocks; the cheapest checks come first."""
        if uid != self.peer_uid:
            return f"uid {uid} is not the bot's"
        with self._lock:
            child = self._child
        if child is None:
            return "no bot is running"
        # A process whose whole parent chain up to init lies outside the bot's tree never
        # enters it (re-parenting only moves a process to one of its own ancestors), so that
        # verdict is remembered for the process (pid and start time) and the bot's pid: a
        # stranger's repeated connections cost one /proc read each.
        started = start_time(pid)
        if started is not None and self._outsiders.get(pid) == (started, child):
            return f"pid {pid} is not the bot (pid {child}) or one of its descendants"
        verdict = tree_walk(pid, child)
        if verdict is not True:
            if verdict is False and started is not None:
                if len(self._outsiders) >= _MAX_OUTSIDERS:
                    self._outsiders.clear()
                self._outsiders[pid] = (started, child)
            return f"pid {pid} is not the bot (pid {child}) or one of its descendants"
        return None

    def _refuse(self, sock: socket.socket, pid: int, uid: int, reason: str) -> None:
        """Tell the peer why in one line (if it can take it at once), close, and count it."""
        self.refused += 1
        seen = self._tally.add(pid or None, uid if uid >= 0 else None, reason, time.monotonic())
        try:
            if seen <= EXPLAIN_REFUSALS:
                # Telling costs a wake-up of the peer; a peer refused again and again in one
                # window has had its explanation and is just closed.
                error = AgentRefused(f"the credbroker signing agent refused this process: {reason}", "only the bot "
                                     "that `credbroker run --agent` started (and its children) may sign").to_wire()
                sock.send(frame({"ok": False, "protocol": PROTOCOL, "error": error}), socket.MSG_DONTWAIT)
        except OSError:
            pass  # a peer that cannot take a few hundred bytes at once gets no explanation
        finally:
            sock.close()

    def _record_refusals(self) -> None:
        """Write the window's refusal counts: one record per peer, one flush for them all."""
        records = self._tally.drain(self.profile, time.monotonic())
        if not records:
            return
        try:
            for fields in records:
                self._audit.record(AGENT_REFUSED, fields, durable=False)
            self._audit.flush()
        except BrokerError:
            pass  # refusing is what matters; the log's trouble shows at the next signature

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
    err = from_dict({"error": kind, "message": message, "remedy": remedy, "rule": rule})
    return {"ok": False, "error": err.to_wire()}





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
        self._record: Recorder | None = None

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

    def check_key(self, creds: Any, *, record: Recorder, audit_config: Any = None
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

    def start_agent(self, audit_log: Any, record: Recorder,
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
