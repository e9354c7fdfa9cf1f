"""The signing agent's server: the broker signs for its bot, so the bot never holds the secret.

``credbroker run --agent --profile P -- python bot.py`` keeps the signing key
in the broker. The child gets the public API key and ``CREDBROKER_AGENT_SOCKET``,
the path of a Unix socket served by a thread of the broker; ``get_signer()``
in the child finds it and asks the broker to sign (``broker.signing.agent``).
The wire protocol is ``broker.agent.protocol``; the run's glue is
``broker.agent.run``; the sign op's policy glue ``broker.agent.policy``.

Who may connect:

* the socket sits in a fresh folder only this user can enter (0700, made by
  ``mkdtemp``); the socket itself is 0600;
* at every connection the agent checks the peer (``broker.agent.peer``): the
  bot the broker started or one of its descendants, with the bot's uid.
  Anything else is refused and closed, with a one-line reason for its first
  ``EXPLAIN_REFUSALS`` attempts in a window;
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

Durability: a signature is sent back only after its audit record is written
to the log file. Records are group-committed: the agent reads every request
that is waiting on any connection, signs them, writes all their records with
one ``write`` (``AuditLog.flush``), and only then answers them all. With
``[audit] fsync = "every"`` (the default: "nothing acknowledged is lost") that
flush also fdatasyncs, so one bot signing one request at a time waits one
fsync per signature and concurrent requests share one; with ``"group"`` the
log fsyncs in the background within 50 ms (``broker.audit.log``). If the log
cannot be written, every request of that group is answered with an error
instead of a signature (fail closed).

Ops are dispatched from one table (``Agent._ops``): a new op is one handler
there and its name in ``protocol.Op``. What a connection may use (the profile,
its signer and its policy) comes from one method, ``Agent._served``.
"""

from __future__ import annotations

import os
import selectors
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ..errors import AgentRefused, AuditError, BrokerError, RunError, SigningError
from ..events import Recorder
from ..signing import binance
from ..signing_policy import SigningPolicy
from ..unixsock import listen_private, peer_credentials, private_dir, send_some
from . import policy as policy_glue
from .peer import PeerCheck, RefusalTally
from .protocol import HEADER, MAX_MESSAGE, PROTOCOL, Op, decode, encode, encode_signature, error_reply

#: New connections accepted (and checked) per round, after the round's requests are answered.
ACCEPT_BATCH = 4
#: Refusals per peer and window that are explained to the peer (one line); later ones are just closed.
EXPLAIN_REFUSALS = 8

#: Audit event names this module writes.
SIGNED = "signed"
POLICY_REFUSED = "policy_refused"
AGENT_REFUSED = "agent_refused"
AGENT_STARTED = "agent_started"
AGENT_STOPPED = "agent_stopped"


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


# -- the server ----------------------------------------------------------------------------


class _Conn:
    __slots__ = ("sock", "fd", "pid", "inbuf", "outbuf", "writing")

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()  # the key in the serving loop's table (-1 once dropped)
        self.pid = pid
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.writing = False  # registered for EVENT_WRITE (an answer did not fit at once)


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
        self._pending_replies: list[tuple[_Conn, dict[str, Any] | bytes]] = []
        self._pending_records = 0
        self._round_failed: BrokerError | None = None
        self._tally = RefusalTally()
        self._peers = PeerCheck(self.peer_uid)
        self._ops: dict[str, Callable[[dict[str, Any], int], dict[str, Any] | bytes]] = {
            Op.HELLO: self._hello,
            Op.SIGN: self._sign,
            Op.SIGN_WS: self._sign_ws,
        }

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
                        touched[conn.fd] = conn
                # The requests already waiting come first: sign, commit, answer ...
                self._commit()
                for conn in touched.values():
                    if conn.fd in conns and not self._write(sel, conn):
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
            conns[conn.fd] = conn
            sel.register(sock, selectors.EVENT_READ, conn)

    def _refusal(self, pid: int, uid: int) -> str | None:
        """Why a peer may not sign (None: it may)."""
        with self._lock:
            child = self._child
        return self._peers.refusal(pid, uid, child)

    def _refuse(self, sock: socket.socket, pid: int, uid: int, reason: str) -> None:
        """Tell the peer why in one line (if it can take it at once), close, and count it."""
        self.refused += 1
        seen = self._tally.add(pid or None, uid if uid >= 0 else None, reason, time.monotonic())
        try:
            if seen <= EXPLAIN_REFUSALS:
                # Telling costs a wake-up of the peer; a peer refused again and again in one
                # window has had its explanation and is just closed.
                error = AgentRefused(f"the credbroker signing agent refused this process: {reason}",
                                     "only the bot that `credbroker run --agent` started (and its children) "
                                     "may sign")
                sock.send(encode(error_reply(error, protocol=PROTOCOL)), socket.MSG_DONTWAIT)
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
        if not buf and len(data) >= HEADER.size:
            # The usual read: exactly one whole request, handled without copying it into the buffer.
            (length,) = HEADER.unpack_from(data)
            if length > MAX_MESSAGE:
                return False
            if len(data) == HEADER.size + length:
                self._pending_replies.append((conn, self._handle(data[HEADER.size:], conn.pid)))
                return True
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
            failed = error_reply(AuditError(failure.message, failure.remedy))
            replies = [(conn, failed) for conn, _ in replies]
        for conn, reply in replies:
            conn.outbuf += reply if isinstance(reply, bytes) else encode(reply)

    def _write(self, sel: selectors.BaseSelector, conn: _Conn) -> bool:
        out = conn.outbuf
        # One send for all of this connection's answers of the round.
        if out and not send_some(conn.sock, out):
            return False
        want = bool(out)
        if want != conn.writing:  # one epoll_ctl only when the interest changes, not per answer
            sel.modify(conn.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0), conn)
            conn.writing = want
        return True

    def _drop(self, sel: selectors.BaseSelector, conns: dict[int, _Conn], conn: _Conn) -> None:
        fd = conn.fd
        if fd >= 0:
            try:
                sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conns.pop(fd, None)
            conn.fd = -1
        conn.sock.close()

    # -- requests ----------------------------------------------------------------------
    def _served(self, pid: int) -> tuple[str, Any, SigningPolicy]:
        """(profile name, signer, policy) that the peer ``pid`` signs with: the one place a request's
        profile is looked up. The signer is None while the agent shuts down."""
        return self.profile, self._signer, self.policy

    def _handle(self, raw: bytes, pid: int) -> dict[str, Any] | bytes:
        """The reply to one request: a message, or one already encoded (the signature's)."""
        try:
            request = decode(raw)
        except ValueError:
            return error_reply(SigningError("the signing agent got a malformed request",
                                            "use the same credbroker version in the bot as in the broker"))
        if not isinstance(request, dict):
            return error_reply(SigningError("the signing agent got a malformed request"))
        op = request.get("op")
        handler = self._ops.get(op) if isinstance(op, str) else None
        if handler is None:
            return error_reply(SigningError(f"the signing agent does not know the operation {str(op)[:32]!r}",
                                            "use the same credbroker version in the bot as in the broker"))
        return handler(request, pid)

    def _hello(self, request: dict[str, Any], pid: int) -> dict[str, Any]:
        profile, signer, _policy = self._served(pid)
        # The public API key too, for a profile that maps no variable to it (it is not the secret).
        api_key = getattr(signer, "_api_key", None)
        return {"ok": True, "protocol": PROTOCOL, "profile": profile,
                "kind": getattr(signer, "kind", None), "recv_window": getattr(signer, "recv_window", None),
                "api_key": str(api_key) if api_key is not None else None}

    def _sign(self, request: dict[str, Any], pid: int) -> dict[str, Any] | bytes:
        profile, signer, policy = self._served(pid)
        try:
            query, body, summary, refusal = policy_glue.check_sign(request, policy)
        except SigningError as exc:
            return error_reply(exc)
        if refusal is not None:
            self.refused += 1
            return self._recorded(POLICY_REFUSED, {"profile": profile, "pid": pid, "rule": refusal.rule,
                                                   "reason": refusal.message, **summary}, error_reply(refusal))
        if signer is None:
            return error_reply(SigningError("the signing agent is shutting down"))
        try:
            signature = signer.sign(query + body)  # Binance's totalParams: query then body, no separator
        except BrokerError as exc:
            return error_reply(exc)
        self.signed += 1
        return self._recorded(SIGNED, {"profile": profile, "pid": pid, **summary}, encode_signature(signature))

    def _sign_ws(self, request: dict[str, Any], pid: int) -> dict[str, Any] | bytes:
        """A WebSocket API request given as an object (``policy.check_sign_ws``): the agent builds the
        payload itself (``binance.ws_payload``), so values holding '=' or '&' are signed as they are."""
        profile, signer, policy = self._served(pid)
        try:
            checked = policy_glue.check_sign_ws(request, policy, getattr(signer, "_api_key", None))
        except SigningError as exc:
            return error_reply(exc)
        if checked.refusal is not None:
            self.refused += 1
            return self._recorded(POLICY_REFUSED, {"profile": profile, "pid": pid, "rule": checked.refusal.rule,
                                                   "reason": checked.refusal.message, **checked.summary},
                                  error_reply(checked.refusal))
        if signer is None:
            return error_reply(SigningError("the signing agent is shutting down"))
        try:
            if checked.method is not None and binance.ws_base_method(checked.method) == binance.WS_LOGON:
                signer.check_ws_logon()
            signature = signer.sign(binance.ws_payload(checked.params))
        except BrokerError as exc:
            return error_reply(exc)
        self.signed += 1
        return self._recorded(SIGNED, {"profile": profile, "pid": pid, **checked.summary},
                              encode_signature(signature))

    def _recorded(self, event: str, fields: dict[str, Any], reply: dict[str, Any] | bytes) -> dict[str, Any] | bytes:
        try:
            self._audit.record(event, fields, durable=False)
        except BrokerError as exc:
            # An automatic flush inside record() may have lost earlier records of this round too.
            self._round_failed = exc
            return error_reply(AuditError(exc.message, exc.remedy))
        self._pending_records += 1
        return reply
