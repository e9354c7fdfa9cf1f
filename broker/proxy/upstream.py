"""The way out: a kept-alive connection pool per exchange base URL, and the exchange's clock.

urllib3 (already installed: ``requests`` is built on it, and ``broker.sources``
uses ``requests``) gives thread-safe pools of kept-alive HTTP/1.1 connections
with certificate verification on by default, total timeouts, and switches to
turn off what a proxy must not do by itself: no retries (an order must never
be sent twice because a read timed out) and no redirects (the API key would
follow them). The standard library's ``http.client`` has no pool, and
``requests`` adds sessions, cookies and hooks this path does not want.

Clock offset: Binance accepts a request when ``timestamp < serverTime + 1000``
and ``serverTime - timestamp <= recvWindow`` ("Timing security"). The proxy
learns ``serverTime - localTime`` from the upstream's unsigned time endpoint
(``GET /api/v3/time`` or ``/fapi/v1/time``) when it starts and again after the
exchange answers -1021, and stamps each request with its own clock plus that
offset, so a host whose clock is seconds off still sends valid timestamps.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from ..errors import UpstreamError

#: Headers a response must not carry back through the proxy as they are (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade", "content-length"})


class Answer(NamedTuple):
    """The exchange's answer, byte for byte (body not decoded)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


class Upstream:
    """One exchange base URL: its connection pool and its clock offset (ms)."""

    def __init__(self, name: str, base_url: str, time_path: str, *, timeout: float = 10.0,
                 pool_size: int = 16, ca_file: str | None = None) -> None:
        import urllib3

        self.name = name
        self.base_url = base_url
        self.time_path = time_path
        self.offset_ms = 0
        self.synced = False
        self._lock = threading.Lock()
        self._timeout = urllib3.Timeout(connect=min(timeout, 5.0), read=timeout)
        # certifi's bundle when present (what requests trusts), else the system's default store.
        ca_certs: str | None = ca_file
        if ca_certs is None:
            try:
                import certifi

                ca_certs = certifi.where()
            except ImportError:
                pass
        self._pool = urllib3.connection_from_url(
            base_url, maxsize=pool_size, block=False, retries=False, timeout=self._timeout,
            **({"cert_reqs": "CERT_REQUIRED", "ca_certs": ca_certs} if base_url.startswith("https://") else {}),
        )

    def request(self, method: str, target: str, body: bytes | None, headers: Mapping[str, str]) -> Answer:
        """Send one request (``target`` = path?query) and read the whole answer, not decoded."""
        import urllib3

        try:
            resp = self._pool.urlopen(method, target, body=body, headers=dict(headers), redirect=False,
                                      retries=False, preload_content=False, decode_content=False,
                                      assert_same_host=True)
            try:
                data = resp.read(decode_content=False)
            finally:
                resp.release_conn()
        except urllib3.exceptions.HTTPError as exc:
            raise UpstreamError(f"cannot reach the exchange at {self.base_url}: {type(exc).__name__}",
                                "check the network and the profile's [proxy] base URLs") from None
        headers_out = [(k, v) for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP]
        return Answer(resp.status, headers_out, data)

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
        self._pool.close()


def make_upstreams(settings: Any, *, timeout: float = 10.0) -> dict[str, Upstream]:
    """One ``Upstream`` per configured base URL (``ProxySettings``)."""
    from .settings import TIME_PATHS

    return {name: Upstream(name, settings.base_url(name), TIME_PATHS[name], timeout=timeout,
                           ca_file=settings.ca_file)
            for name in ("spot", "futures")}
