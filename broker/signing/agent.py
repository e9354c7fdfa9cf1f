"""The bot's side of the signing agent: a Signer that asks the broker to sign.

Under ``credbroker run --agent`` the child's environment holds the public API
key and ``CREDBROKER_AGENT_SOCKET``, never the secret. ``get_signer()`` then
returns an ``AgentSigner``: the same interface as every other signer
(``sign``, ``sign_params``, ``headers()``, ``requests`` auth), but each
signature is a round trip to the broker, which checks the profile's signing
policy, records the signature in the audit log, and answers.

A request the policy refuses raises ``PolicyRefused`` (a ``SigningError``)
with the broker's one-line reason; so does any other refusal.

Thread-safe: each thread keeps its own connection, so a bot's threads sign
concurrently (and the broker commits their audit records together).

Of the agent it imports only the wire protocol (``broker.agent.protocol``) and
the error tree: the bot never loads the broker's server, peer checks or policy.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, NoReturn

from .. import childenv
from ..agent import protocol
from ..errors import AgentRefused, BrokerError, SigningError
from . import binance
from .base import Signer

SOCKET_VAR = childenv.AGENT_SOCKET

__all__ = ["SOCKET_VAR", "AgentSigner", "from_environment"]


class AgentSigner(Signer):
    """Signs through the broker's signing agent; holds no key."""

    kind: ClassVar[str] = "agent"

    def __init__(self, api_key: str | None, socket_path: str | os.PathLike[str], *,
                 timeout: float = 30.0, **kwargs: Any) -> None:
        super().__init__(api_key, **kwargs)
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self._local = threading.local()
        self._closed = False
        #: The broker's signer kind (hmac, ed25519, rsa), from the agent's hello.
        self.remote_kind: str | None = None
        hello = self._call(protocol.hello_request())
        self.remote_kind = hello.get("kind") if isinstance(hello.get("kind"), str) else None
        if self._api_key is None and isinstance(hello.get("api_key"), str) and hello["api_key"]:
            from .base import ApiKey

            self._api_key = ApiKey(hello["api_key"])
        if kwargs.get("recv_window", binance.DEFAULT_RECV_WINDOW) == binance.DEFAULT_RECV_WINDOW:
            window = hello.get("recv_window")
            if isinstance(window, int) and not isinstance(window, bool):
                self.recv_window = binance.check_recv_window(window)

    # -- signing -------------------------------------------------------------------------
    def _sign_bytes(self, payload: bytes) -> str:
        return self._remote_sign(payload.decode("utf-8"), "", None, None)

    def _sign_request(self, query: str, body: str, path: str, method: str | None) -> str:
        return self._remote_sign(query, body, path or None, method)

    def sign_params(self, params: binance.Params | None = None, *, timestamp: int | None = None,
                    recv_window: int | None | bool = True, endpoint: str | None = None,
                    method: str | None = None) -> str:
        """As ``Signer.sign_params``; ``endpoint`` (the URL path) lets the broker's policy see where it goes."""
        items = binance.param_items(params)
        items += self._timing({k for k, _ in items}, timestamp, recv_window)
        query = binance.encode(items)
        return f"{query}&signature={binance.quote_signature(self._remote_sign(query, '', endpoint, method))}"

    sign_query = sign_params

    def _sign_ws(self, payload: str, params: Mapping[str, Any], method: str | None, api: str) -> str:
        # The parameters travel as a JSON object, values as they go into the payload: the agent
        # reads values holding '=' or '&' as they are, checks its policy, and builds the payload.
        values = {name: binance.ws_value(name, value) for name, value in params.items() if value is not None}
        reply = self._call(protocol.sign_ws_request(values, method, api))
        signature = reply.get(protocol.SIGNATURE)
        if not isinstance(signature, str):
            raise SigningError("the signing agent answered without a signature", "restart the bot under credbroker")
        return signature

    def ws_logon_kind(self) -> str:
        """The broker's key kind as Binance sees it at ``session.logon`` (the agent checks it too)."""
        remote = self.remote_kind or "unknown"
        return "ed25519" if remote == "transit" else remote

    def _remote_sign(self, query: str, body: str, endpoint: str | None, method: str | None) -> str:
        reply = self._call_raw(protocol.encode_sign_request(query, body, endpoint, method))
        signature = reply.get(protocol.SIGNATURE)
        if not isinstance(signature, str):
            raise SigningError("the signing agent answered without a signature", "restart the bot under credbroker")
        return signature

    # -- transport -----------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        sock: socket.socket | None = getattr(self._local, "sock", None)
        if sock is not None:
            return sock
        if self._closed:
            raise SigningError("this signer has been closed", "get a new one with get_signer()")
        from ..unixsock import peer_credentials, private_dir

        if not (private_dir(self.socket_path.parent, create=False) or _served_by_root(self.socket_path)):
            raise SigningError(f"the signing agent's folder {self.socket_path.parent} is missing or not private",
                               "start the bot with `credbroker run --agent`; the agent ends with the broker")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.socket_path))
            # Ours, or root's: a broker running as root serves a bot started with --user.
            if peer_credentials(sock)[1] not in (os.getuid(), 0):
                raise SigningError("the signing agent's socket belongs to another user",
                                   "start the bot with `credbroker run --agent`")
        except OSError as exc:
            sock.close()
            raise SigningError(f"cannot reach the signing agent at {self.socket_path}: {exc.strerror or exc}",
                               "the broker has exited; start the bot with `credbroker run --agent`") from None
        except BrokerError:
            sock.close()
            raise
        self._local.sock = sock
        return sock

    def _call(self, request: Mapping[str, Any]) -> dict[str, Any]:
        return self._call_raw(protocol.encode(request))

    def _call_raw(self, data: bytes) -> dict[str, Any]:
        sock = self._connect()
        try:
            try:
                sock.sendall(data)
            except OSError:
                # The agent may have refused this connection and closed it: its one-line
                # reason is still waiting to be read.
                pass
            reply = protocol.recv_reply(sock)
        except (OSError, ValueError, ConnectionError) as exc:
            self._forget()
            raise SigningError(f"the signing agent did not answer ({type(exc).__name__})",
                               "the broker may have exited; check credbroker's output") from None
        if not isinstance(reply, dict):
            raise SigningError("the signing agent answered something malformed", "use the same credbroker version")
        if not reply.get("ok"):
            self._raise(reply.get("error"))
        return reply

    def _raise(self, error: Any) -> NoReturn:
        try:
            protocol.raise_error(error)
        except AgentRefused:
            self._forget()  # the agent closed this connection
            raise

    def _forget(self) -> None:
        sock = getattr(self._local, "sock", None)
        self._local.sock = None
        if sock is not None:
            sock.close()

    def close(self) -> None:
        """Close this thread's connection; the signer refuses to sign afterwards."""
        self._closed = True
        self._forget()


def from_environment(environ: Mapping[str, str], *, recv_window: int | None = None,
                     record_failures: bool = True) -> AgentSigner:
    """The AgentSigner for a child of ``credbroker run --agent`` (what ``get_signer()`` returns there)."""
    path = environ.get(SOCKET_VAR)
    if not path:
        raise SigningError(f"{SOCKET_VAR} is not set", "start the bot with `credbroker run --agent`")
    profile = childenv.profile(environ)
    api_key: str | None = None
    for var in childenv.env_map(environ):
        if environ.get(var):
            api_key = environ[var]
            break
    audit_config = None
    kwargs: dict[str, Any] = {"profile": profile, "audit_config": audit_config, "record_failures": record_failures}
    if recv_window is not None:
        kwargs["recv_window"] = recv_window
    return AgentSigner(api_key, path, **kwargs)


def _served_by_root(socket_path: Path) -> bool:
    """A root broker's socket for a bot started with ``--user``: a root folder only root can change
    (0711), holding a socket that is ours alone (0600)."""
    if os.getuid() == 0:
        return False  # root's own bot: the ordinary private folder, nothing else
    import stat

    try:
        folder, sock = socket_path.parent.lstat(), socket_path.lstat()
    except OSError:
        return False
    return (stat.S_ISDIR(folder.st_mode) and folder.st_uid == 0 and not folder.st_mode & 0o022
            and stat.S_ISSOCK(sock.st_mode) and sock.st_uid == os.getuid() and stat.S_IMODE(sock.st_mode) == 0o600)
