"""The way out: kept-alive connections per exchange base URL, and the exchange's clock.

A small HTTP/1.1 client over the standard library's ``socket`` and ``ssl``:
one request written in one ``sendall``, the answer read by hand (status line,
headers, a ``Content-Length`` or chunked body), the connection put back for
the next request. It replaced urllib3's pool (on ``http.client``), whose
per-request cost, mostly ``http.client`` parsing every answer's headers with
the ``email`` package, was most of the proxy's own (``scripts/bench_proxy.py``).
What a proxy must not do by itself it does not do: no retries (an order must
never be sent twice because a read timed out; a kept-alive connection is only
reused when it has not been closed by the exchange meanwhile), no redirects
(the API key would follow them). TLS: ``ssl.create_default_context`` with
certificate and host name verification, trusting certifi's bundle (what
requests trusts) or the profile's ``ca_file``. Each request has a connect
timeout and a read timeout.

Clock offset: Binance accepts a request when ``timestamp < serverTime + 1000``
and ``serverTime - timestamp <= recvWindow`` ("Timing security"). The proxy
learns ``serverTime - localTime`` from the upstream's unsigned time endpoint
(``GET /api/v3/time`` or ``/fapi/v1/time``) when it starts and again after the
exchange answers -1021, and stamps each request with its own clock plus that
offset, so a host whose clock is seconds off still sends valid timestamps.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from ..errors import UpstreamError

#: Headers a response must not carry back through the proxy as they are (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade", "content-length"})


class Answer(NamedTuple):
    """The exchange's answer, byte for byte (body not decoded)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


MAX_HEAD = 64 * 1024  # bytes of status line and headers an answer may have
MAX_ANSWER = 64 * 1024 * 1024  # bytes of body (exchangeInfo is a few MB)


class AnswerReader:
    """Reads one HTTP/1.1 answer from bytes as they arrive (``feed``), for the blocking pool and the
    proxy's event loop alike: status line and headers (1xx interim answers skipped), then a
    ``Content-Length`` body, a chunked one, or (neither) everything up to the end of the stream."""

    __slots__ = ("method", "buf", "_pos", "_status", "_headers", "_length", "_chunked", "_close", "_parts",
                 "_total", "_chunk")

    def __init__(self, method: str) -> None:
        self.method = method
        self.buf = bytearray()
        self._pos = 0  # bytes of buf consumed by the head and the chunks read so far
        self._status = 0  # 0 until the head is read
        self._headers: list[tuple[str, str]] = []
        self._length: int | None = None
        self._chunked = self._close = False
        self._parts: list[bytes] = []
        self._total = 0
        self._chunk = -1  # chunked: size of the chunk being read; -1 = its size line next; -2 = trailers

    def feed(self, data: bytes) -> tuple[Answer, bool] | None:
        """Add ``data`` (``b""`` = the stream ended); the answer and whether the connection may be
        reused, once the whole answer is there; None while more is needed. Raises ValueError for an
        answer that is not HTTP/1.x or too long, ConnectionError for a stream that ended too soon."""
        if data:
            self.buf += data
            return self._advance()
        done = self._advance()
        if done is not None:
            return done
        if self._status and self._length is None and not self._chunked:
            # No length given: the body is everything up to the end of the stream.
            return Answer(self._status, self._headers, bytes(self.buf[self._pos:])), False
        raise ConnectionError("the exchange closed the connection")

    def _bodyless(self) -> bool:
        return self.method == "HEAD" or self._status in (204, 304)

    def _advance(self) -> tuple[Answer, bool] | None:
        buf = self.buf
        while not self._status:
            end = buf.find(b"\r\n\r\n", self._pos, self._pos + MAX_HEAD + 4)
            if end < 0:
                if len(buf) - self._pos > MAX_HEAD:
                    raise ValueError("an answer's head is too long")
                return None
            head = bytes(buf[self._pos:end]).decode("latin-1")
            self._pos = end + 4
            self._read_head(head)
        if self._bodyless():
            return self._done(b"")
        if self._chunked:
            return self._read_chunks()
        if self._length is not None:
            if len(buf) - self._pos < self._length:
                return None
            body = bytes(buf[self._pos:self._pos + self._length])
            self._pos += self._length
            return self._done(body)
        if len(buf) - self._pos > MAX_ANSWER:
            raise ValueError("the answer is too long")
        return None  # read to the end of the stream (feed(b""))

    def _read_head(self, head: str) -> None:
        status_line, _, rest = head.partition("\r\n")
        version, _, tail = status_line.partition(" ")
        if not version.startswith("HTTP/1."):
            raise ValueError("the answer is not HTTP/1.x")
        status = int(tail[:3])
        if status < 200 and status != 101:
            return  # 1xx interim answers (100 Continue) are skipped
        raw_headers: list[tuple[str, str]] = []
        length: int | None = None
        for line in rest.split("\r\n") if rest else []:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError("a malformed header line")
            value = value.strip()
            lower = name.strip().lower()
            if lower == "content-length":
                if length is not None and length != int(value):
                    raise ValueError("conflicting Content-Length headers")
                length = int(value)
                if not 0 <= length <= MAX_ANSWER:
                    raise ValueError("a bad Content-Length")
            elif lower == "transfer-encoding":
                self._chunked = "chunked" in value.lower()
            elif lower == "connection":
                self._close = "close" in value.lower()
            if lower not in HOP_BY_HOP:
                raw_headers.append((name.strip(), value))
        if version == "HTTP/1.0":
            self._close = True
        self._status, self._headers, self._length = status, raw_headers, length

    def _read_chunks(self) -> tuple[Answer, bool] | None:
        buf = self.buf
        while True:
            if self._chunk == -1:  # the next chunk's size line
                end = buf.find(b"\r\n", self._pos, self._pos + 1024)
                if end < 0:
                    if len(buf) - self._pos > 1024:
                        raise ValueError("a chunk's size line is too long")
                    return None
                size = int(bytes(buf[self._pos:end]).split(b";", 1)[0].strip(), 16)
                if size < 0:
                    raise ValueError("a bad chunk size")
                self._pos = end + 2
                self._total += size
                if self._total > MAX_ANSWER:
                    raise ValueError("the answer is too long")
                self._chunk = size if size else -2
            elif self._chunk == -2:  # trailers, up to the empty line
                end = buf.find(b"\r\n", self._pos, self._pos + MAX_HEAD)
                if end < 0:
                    if len(buf) - self._pos > MAX_HEAD:
                        raise ValueError("an answer's trailers are too long")
                    return None
                empty = end == self._pos
                self._pos = end + 2
                if empty:
                    return self._done(b"".join(self._parts))
            else:
                if len(buf) - self._pos < self._chunk + 2:
                    return None
                self._parts.append(bytes(buf[self._pos:self._pos + self._chunk]))
                self._pos += self._chunk + 2
                self._chunk = -1

    def _done(self, body: bytes) -> tuple[Answer, bool]:
        # Bytes past the answer were not asked for: the connection is not reused.
        reuse = not self._close and self._pos == len(self.buf)
        return Answer(self._status, self._headers, body), reuse


class _Conn:
    """One kept-alive (blocking) connection of the pool."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read_answer(self, method: str) -> tuple[Answer, bool]:
        reader = AnswerReader(method)
        while True:
            done = reader.feed(self.sock.recv(65536))
            if done is not None:
                return done

    def dropped(self) -> bool:
        """True when an idle connection was closed by the other end (or has unexpected bytes)."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Upstream:
    """One exchange base URL: its kept-alive connections and its clock offset (ms)."""

    def __init__(self, name: str, base_url: str, time_path: str, *, timeout: float = 10.0,
                 pool_size: int = 16, ca_file: str | None = None) -> None:
        self.name = name
        self.base_url = base_url
        self.time_path = time_path
        self.offset_ms = 0
        self.synced = False
        self._lock = threading.Lock()
        parts = urlsplit(base_url)
        self._host = parts.hostname or ""
        self._tls = parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        self._host_header = parts.netloc.encode("idna")
        self._connect_timeout = min(timeout, 5.0)
        self._read_timeout = timeout
        self._pool_size = pool_size
        self._idle: list[_Conn] = []
        self._ctx: ssl.SSLContext | None = None
        if self._tls:
            # certifi's bundle when present (what requests trusts), else the system's default store.
            ca_certs: str | None = ca_file
            if ca_certs is None:
                try:
                    import certifi

                    ca_certs = certifi.where()
                except ImportError:
                    pass
            self._ctx = ssl.create_default_context(cafile=ca_certs)  # verifies the chain and the host name

    def _connection(self) -> _Conn:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.dropped():
                    return conn
                conn.close()
        return _Conn(self.connect())

    def connect(self) -> socket.socket:
        """A new connection to the exchange (TLS established), with the read timeout set. Blocking."""
        sock = socket.create_connection((self._host, self._port), timeout=self._connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ctx is not None:
                sock = self._ctx.wrap_socket(sock, server_hostname=self._host)
            sock.settimeout(self._read_timeout)
        except (OSError, ssl.SSLError):
            sock.close()
            raise
        return sock

    @property
    def read_timeout(self) -> float:
        return self._read_timeout

    def _put_back(self, conn: _Conn) -> None:
        with self._lock:
            if len(self._idle) < self._pool_size:
                self._idle.append(conn)
                return
        conn.close()

    def encode_request(self, method: str, target: str, body: bytes | None, headers: Mapping[str, str]) -> bytes:
        """The request as written on the wire: one buffer, one send."""
        lines = [f"{method} {target} HTTP/1.1".encode("latin-1"), b"Host: " + self._host_header]
        for name, value in headers.items():
            lines.append(f"{name}: {value}".encode("latin-1"))
        if body is None and method in ("POST", "PUT"):
            lines.append(b"Content-Length: 0")
        if "Accept-Encoding" not in headers:
            lines.append(b"Accept-Encoding: identity")
        return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")

    def failure(self, exc: BaseException) -> UpstreamError:
        """What the bot is told when the exchange cannot be reached or answers garbage (no detail of
        the request: the message names the base URL and the kind of error)."""
        kind = "SSLError" if isinstance(exc, ssl.SSLError) else type(exc).__name__
        return UpstreamError(f"cannot reach the exchange at {self.base_url}: {kind}",
                             "check the network and the profile's [proxy] base URLs")

    def request(self, method: str, target: str, body: bytes | None, headers: Mapping[str, str]) -> Answer:
        """Send one request (``target`` = path?query) and read the whole answer, not decoded."""
        return self.request_raw(method, self.encode_request(method, target, body, headers))

    def request_raw(self, method: str, data: bytes) -> Answer:
        """Send a request already encoded (``encode_request``) and read the whole answer. Blocking."""
        conn: _Conn | None = None
        try:
            conn = self._connection()
            conn.sock.sendall(data)
            answer, reuse = conn.read_answer(method)
        except (OSError, ValueError, ssl.SSLError) as exc:
            if conn is not None:
                conn.close()
            raise self.failure(exc) from None
        if reuse:
            self._put_back(conn)
        else:
            conn.close()
        return answer

    def now_ms(self) -> int:
        """The exchange's time as this host best knows it (ms)."""
        return int(time.time() * 1000) + self.offset_ms

    def sync_clock(self) -> int:
        """Learn the offset from the exchange's time endpoint; returns it (ms). Raises UpstreamError."""
        t0 = time.time()
        answer = self.request("GET", self.time_path, None, {"Accept": "application/json"})
        t1 = time.time()
        try:
            server_time = json.loads(answer.body)["serverTime"]
        except (ValueError, KeyError, TypeError):
            server_time = None
        if answer.status != 200 or isinstance(server_time, bool) or not isinstance(server_time, int):
            raise UpstreamError(f"the exchange at {self.base_url} did not tell its time "
                                f"(GET {self.time_path}: HTTP {answer.status})",
                                "check the profile's [proxy] base URLs")
        # The server read its clock somewhere between t0 and t1: take the midpoint.
        offset = server_time - int((t0 + t1) / 2 * 1000)
        with self._lock:
            self.offset_ms, self.synced = offset, True
        return offset

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def make_upstreams(settings: Any, *, timeout: float = 10.0) -> dict[str, Upstream]:
    """One ``Upstream`` per configured base URL (``ProxySettings``)."""
    from .settings import TIME_PATHS

    return {name: Upstream(name, settings.base_url(name), TIME_PATHS[name], timeout=timeout,
                           ca_file=settings.ca_file)
            for name in ("spot", "futures")}
