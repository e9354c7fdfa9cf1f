"""The signing agent's wire protocol, written once for both ends.

The broker's server (``broker.agent.server``) and the bot's client
(``broker.signing.agent``) both import this module and ``broker.errors``, and
nothing else of each other: the bot never loads the server, its peer checks or
the signing policy.

Transport: a Unix stream socket whose path the child finds in ``SOCKET_VAR``.
Framing (as every credbroker socket, ``broker.unixsock``): a 4-byte big-endian
length, then that many bytes of compact JSON, at most ``MAX_MESSAGE``.

Requests are JSON objects with ``"op"`` (an ``Op``) and that op's fields:

* ``hello``: no fields. Reply: ``protocol``, ``profile``, ``kind`` (hmac,
  ed25519, rsa), ``recv_window``, ``api_key`` (public).
* ``sign``: ``q`` (query string), ``b`` (form body), ``e`` (URL path or null),
  ``m`` (HTTP method or null). The agent signs ``q + b`` (Binance's
  totalParams). Reply: ``sig``.

A new op is a member of ``Op``, its request builder here, and one handler in
the server's op table.

Replies: ``{"ok": true, ...}`` or ``{"ok": false, "error": E}`` where ``E`` is
``BrokerError.to_dict()`` (class name, message, remedy, and the extra fields
such as a policy refusal's ``rule``), rebuilt in the bot by
``broker.errors.from_dict`` as the same class.
"""

from __future__ import annotations

import enum
import json
import re
import socket
from collections.abc import Mapping
from typing import Any, NoReturn

from .. import childenv
from ..errors import BrokerError, SigningError, from_dict
from ..unixsock import HEADER, MAX_MESSAGE

#: Version of this protocol, sent in ``hello`` and in refusals.
PROTOCOL = 1
#: The child's variable holding the socket's path.
SOCKET_VAR = childenv.AGENT_SOCKET

__all__ = ["HEADER", "MAX_MESSAGE", "PROTOCOL", "SOCKET_VAR", "Op", "decode", "encode", "error_reply",
           "hello_request", "raise_error", "recv_reply", "sign_request", "sign_ws_request"]


class Op(enum.StrEnum):
    """The operations a bot may ask for."""

    HELLO = "hello"
    SIGN = "sign"
    SIGN_WS = "sign_ws"


# Field names of a sign request.
QUERY, BODY, ENDPOINT, METHOD = "q", "b", "e", "m"
# Field names of a sign_ws request: the WebSocket API params (a JSON object), its method, spot or futures.
WS_PARAMS, WS_METHOD, WS_API = "p", "wm", "api"
#: Field name of a signature in a sign reply.
SIGNATURE = "sig"

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_loads = json.JSONDecoder().decode
#: The C string escaper of the json module (quotes included, ASCII out).
_quote: Any = getattr(json.encoder, "c_encode_basestring_ascii", None) or json.encoder.encode_basestring_ascii
_pack = HEADER.pack
#: ``encode_signature``'s frame (hex or base64: nothing JSON would escape), read back without json.
_signature_reply = re.compile(b'{"ok":true,"' + SIGNATURE.encode() + b'":"([A-Za-z0-9+/=]*)"}').fullmatch


def encode(message: Mapping[str, Any]) -> bytes:
    """One frame: the length, then compact JSON."""
    data = _dumps(message).encode("utf-8")
    if len(data) > MAX_MESSAGE:
        raise ValueError("message too large")
    return HEADER.pack(len(data)) + data


def decode(payload: bytes | bytearray | memoryview) -> Any:
    """A frame's payload as JSON (ValueError when it is not)."""
    return _loads(bytes(payload).decode("utf-8"))


def hello_request() -> dict[str, Any]:
    return {"op": Op.HELLO.value}


def sign_request(query: str, body: str, endpoint: str | None, method: str | None) -> dict[str, Any]:
    return {"op": Op.SIGN.value, QUERY: query, BODY: body, ENDPOINT: endpoint, METHOD: method}


def sign_ws_request(params: Mapping[str, str], method: str | None, api: str) -> dict[str, Any]:
    """A WebSocket API request to sign: the params travel as an object, so values may hold '=' or '&'."""
    return {"op": Op.SIGN_WS.value, WS_PARAMS: dict(params), WS_METHOD: method, WS_API: api}


def encode_sign_request(query: str, body: str, endpoint: str | None, method: str | None) -> bytes:
    """``encode(sign_request(...))`` without the general encoder: the one request on every signature."""
    data = (f'{{"op":"sign","{QUERY}":{_quote(query)},"{BODY}":{_quote(body)},'
            f'"{ENDPOINT}":{"null" if endpoint is None else _quote(endpoint)},'
            f'"{METHOD}":{"null" if method is None else _quote(method)}}}').encode("ascii")
    if len(data) > MAX_MESSAGE:
        raise ValueError("message too large")
    return _pack(len(data)) + data


def encode_signature(signature: str) -> bytes:
    """``encode({"ok": True, SIGNATURE: signature})``: the answer to every signature."""
    data = f'{{"ok":true,"{SIGNATURE}":{_quote(signature)}}}'.encode("ascii")
    return _pack(len(data)) + data


def error_reply(error: BrokerError, **extra: Any) -> dict[str, Any]:
    """The reply that carries ``error`` to the bot."""
    return {"ok": False, **extra, "error": error.to_dict()}


def raise_error(error: object) -> NoReturn:
    """Raise the broker's error a reply carried, as its own class (a SigningError when unknown)."""
    if not isinstance(error, dict):
        raise SigningError("the signing agent refused without a reason", "check the audit log")
    raise from_dict(error, SigningError)


def recv_reply(sock: socket.socket) -> Any:
    """One whole reply from a blocking socket: usually one ``recv``.

    ValueError for a frame too large or not JSON, ConnectionError when the
    peer closes first, OSError from the socket.
    """
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("connection closed")
    while len(data) < HEADER.size:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("connection closed")
        data += more
    (length,) = HEADER.unpack_from(data)
    if length > MAX_MESSAGE:
        raise ValueError("message too large")
    end = HEADER.size + length
    if len(data) < end:
        parts = [data]
        got = len(data)
        while got < end:
            more = sock.recv(end - got)
            if not more:
                raise ConnectionError("connection closed")
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
    if len(data) > end:
        raise ValueError("the signing agent sent more than one reply")
    signature = _signature_reply(data, HEADER.size)
    if signature is not None:  # the answer to every signature: read without the JSON decoder
        return {"ok": True, SIGNATURE: signature.group(1).decode("ascii")}
    return decode(memoryview(data)[HEADER.size:end])
