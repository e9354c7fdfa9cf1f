"""HTTP/1.1 for the proxy's bot side: a request read from a buffer, an answer written as one.

The proxy's first server was ``http.server``: its per-request cost (headers
parsed by the ``email`` package, a write per header line, buffered file
objects) was a large share of what the proxy added to each round trip. Here a
request's head is read up to the blank line, the header lines are split by
hand, a ``Content-Length`` body is taken, and the whole answer is one buffer
(one ``send``). The connections themselves are the event loop's (``loop.py``).

What it accepts: ``METHOD TARGET HTTP/1.x``, headers of at most ``MAX_HEAD``
bytes, a body with ``Content-Length`` (no chunked request bodies: 411), and
``Expect: 100-continue``. HTTP/1.1 connections stay open until the client
closes them or sends ``Connection: close``; HTTP/1.0 ones close after one
answer unless they ask for keep-alive.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import NamedTuple

from .upstream import Answer

MAX_HEAD = 64 * 1024
MAX_BODY = 1 << 20


class Request(NamedTuple):
    """One request as read: header names lower-cased (the last of a repeated one)."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes


#: Reason phrases by status (an enum lookup per answer cost more than the rest of the status line).
_PHRASES = {int(s): s.phrase for s in HTTPStatus}


def _phrase(status: int) -> str:
    return _PHRASES.get(status, "")


def encode_answer(answer: Answer, close: bool) -> bytes:
    """Status line, headers (plus Content-Length and, when closing, Connection: close), blank line, body."""
    lines = [f"HTTP/1.1 {answer.status} {_phrase(answer.status)}"]
    lines += [f"{name}: {value}" for name, value in answer.headers]
    lines.append(f"Content-Length: {len(answer.body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + answer.body


def error_answer(status: int, message: str) -> Answer:
    """Binance's error shape, from the proxy itself."""
    import json

    body = json.dumps({"code": -1000, "msg": f"credbroker proxy: {message}"}).encode()
    return Answer(status, [("Content-Type", "application/json;charset=UTF-8")], body)


class BadRequest(Exception):
    """A request the proxy cannot read: the status and message the client gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Incomplete(NamedTuple):
    """More bytes are needed; ``expects_continue``: the head is there and asks for ``100 Continue``."""

    expects_continue: bool


_MORE = Incomplete(False)
#: What no request head may hold (RFC 9112): a control character other than a tab, or a CR or LF that
#: is not part of a CRLF. A lone LF ends a line for some servers and not for others, so a head holding
#: one could reach the exchange as two different requests ("request smuggling").
#: (Searched in the head with its CRLFs taken out: one character class is much faster than lookarounds.)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]").search
#: At most this many digits of Content-Length (leading zeros included): past it, no body fits MAX_BODY.
_LENGTH_DIGITS = 18


def parse_request(buf: bytearray) -> tuple[Request, bool] | Incomplete:
    """The first request in ``buf`` (removed from it) and whether the connection stays open after it,
    or ``Incomplete``. Raises ``BadRequest`` (status and message for the client) for a malformed one."""
    while buf.startswith(b"\r\n"):  # stray line breaks between requests (RFC 9112 section 2.2)
        del buf[:2]
    end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise BadRequest(431, "the request's headers are too long")
        return _MORE
    head = bytes(buf[:end]).decode("latin-1")
    if _CONTROL(head.replace("\r\n", "")):
        raise BadRequest(400, "a control character or a bare CR or LF in the request's head")
    request_line, _, rest = head.partition("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "not an HTTP/1.x request line")
    method, target, version = parts
    if not target.isascii() or "\t" in target:
        raise BadRequest(400, "the request target holds a tab or a non-ASCII character (percent-encode it)")
    headers: dict[str, str] = {}
    for line in rest.split("\r\n") if rest else []:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(400, "a malformed header line")
        lower = name.lower()
        value = value.strip()
        if lower == "content-length" and lower in headers and headers[lower] != value:
            raise BadRequest(400, "conflicting Content-Length headers")
        headers[lower] = value
    if "transfer-encoding" in headers:
        raise BadRequest(411, "send the body with a Content-Length")
    raw_length = headers.get("content-length", "0")
    # ASCII digits only: str.isdigit() also takes '\xb2' (superscript two), which int() refuses.
    if not (raw_length.isascii() and raw_length.isdigit()) or len(raw_length) > _LENGTH_DIGITS \
            or int(raw_length) > MAX_BODY:
        raise BadRequest(400, "bad Content-Length")
    total = end + 4 + int(raw_length)
    if len(buf) < total:
        return Incomplete(headers.get("expect", "").lower() == "100-continue")
    connection = headers.get("connection", "").lower()
    keep = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    body = bytes(buf[end + 4:total])
    del buf[:total]
    return Request(method, target, headers, body), keep
