"""A lean HTTP/1.1 keep-alive server on loopback: one thread per connection, raw sockets.

The proxy's first server was ``http.server``: its per-request cost (headers
parsed by the ``email`` package, a write per header line, buffered file
objects) was a large share of what the proxy added to each round trip. This
loop reads a request's head up to the blank line, splits the header lines
itself, reads a ``Content-Length`` body, and writes the whole answer in one
``sendall`` (no Nagle stall: ``TCP_NODELAY`` is set anyway).

What it accepts: ``METHOD TARGET HTTP/1.x``, headers of at most ``MAX_HEAD``
bytes, a body with ``Content-Length`` (no chunked request bodies: 411), and
``Expect: 100-continue``. HTTP/1.1 connections stay open until the client
closes them or sends ``Connection: close``; HTTP/1.0 ones close after one
answer unless they ask for keep-alive.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from http import HTTPStatus
from typing import NamedTuple

from .upstream import Answer

MAX_HEAD = 64 * 1024
MAX_BODY = 1 << 20
_IDLE_TIMEOUT = 600.0  # seconds a kept-alive connection may wait for its next request


class Request(NamedTuple):
    """One request as read: header names lower-cased (the last of a repeated one)."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes


#: Called once per connection, in its thread: (client address, server address) -> a value for ``Serve``.
Accept = Callable[[tuple[str, int], tuple[str, int]], object]
#: Called per request: (the value ``Accept`` returned, the request) -> the answer, and whether to close after it.
Serve = Callable[[object, Request], tuple[Answer, bool]]


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


def _error(status: int, message: str) -> Answer:
    import json

    body = json.dumps({"code": -1000, "msg": f"credbroker proxy: {message}"}).encode()
    return Answer(status, [("Content-Type", "application/json;charset=UTF-8")], body)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HttpServer:
    """Listen on 127.0.0.1 (a free port); ``start()`` returns the port, ``stop()`` closes everything."""

    def __init__(self, accept: Accept, serve: Serve, *, name: str = "credbroker-proxy") -> None:
        self._accept = accept
        self._serve = serve
        self._name = name
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(256)
        listener.settimeout(0.5)  # accept() wakes up to see stop()
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._thread = threading.Thread(target=self._accept_loop, name=self._name, daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        """Stop accepting, close every connection (idempotent)."""
        with self._lock:
            self._stopping = True
            conns, self._conns = self._conns, set()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def _accept_loop(self) -> None:
        while True:
            listener = self._listener
            if listener is None:
                return
            try:
                conn, addr = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by stop()
            with self._lock:
                if self._stopping:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._connection, args=(conn, addr), name=f"{self._name}-conn",
                             daemon=True).start()

    def _connection(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        try:
            # Blocking, with the idle timeout kept by the kernel (SO_RCVTIMEO/SO_SNDTIMEO): a Python-level
            # timeout polls before every send and receive, one more GIL release (a hand-off to another
            # connection's thread) per call. A timed-out call raises OSError (EAGAIN): the connection ends.
            conn.setblocking(True)
            idle = struct.pack("ll", int(_IDLE_TIMEOUT), 0)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, idle)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, idle)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            state = self._accept((str(addr[0]), int(addr[1])), ("127.0.0.1", self.port))
            buf = bytearray()
            while True:
                try:
                    request, keep = self._read(conn, buf)
                except _BadRequest as exc:
                    conn.sendall(encode_answer(_error(exc.status, exc.message), True))
                    return
                if request is None:
                    return
                answer, close = self._serve(state, request)
                close = close or not keep
                conn.sendall(encode_answer(answer, close))
                if close:
                    return
        except OSError:
            return  # the client went away (or stop() shut the connection)
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    @staticmethod
    def _read(conn: socket.socket, buf: bytearray) -> tuple[Request | None, bool]:
        """The next request on ``conn`` (None at a clean end), and whether the connection stays open."""
        while True:
            while buf.startswith(b"\r\n"):  # stray line breaks between requests (RFC 9112 section 2.2)
                del buf[:2]
            end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
            if end >= 0:
                break
            if len(buf) > MAX_HEAD:
                raise _BadRequest(431, "the request's headers are too long")
            data = conn.recv(65536)
            if not data:
                if buf.strip():
                    raise _BadRequest(400, "the request ended before its headers did")
                return None, False
            buf += data
        head = bytes(buf[:end]).decode("latin-1")
        del buf[:end + 4]
        request_line, _, rest = head.partition("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400, "not an HTTP/1.x request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in rest.split("\r\n") if rest else []:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _BadRequest(400, "a malformed header line")
            lower = name.lower()
            value = value.strip()
            if lower == "content-length" and lower in headers and headers[lower] != value:
                raise _BadRequest(400, "conflicting Content-Length headers")
            headers[lower] = value
        if "transfer-encoding" in headers:
            raise _BadRequest(411, "send the body with a Content-Length")
        raw_length = headers.get("content-length", "0")
        if not raw_length.isdigit() or int(raw_length) > MAX_BODY:
            raise _BadRequest(400, "bad Content-Length")
        length = int(raw_length)
        connection = headers.get("connection", "").lower()
        keep = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        if length and headers.get("expect", "").lower() == "100-continue" and len(buf) < length:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(buf) < length:
            data = conn.recv(max(65536, length - len(buf)))
            if not data:
                raise _BadRequest(400, "the request ended before its body did")
            buf += data
        body = bytes(buf[:length])
        del buf[:length]
        return Request(method, target, headers, body), keep
