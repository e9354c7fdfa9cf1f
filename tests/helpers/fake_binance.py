"""A fake Binance REST server on loopback for the proxy and client tests (never a real exchange).

Signatures are verified by ``tests.signing_verifier.BinanceVerifier.check``,
which follows Binance's "SIGNED Endpoint security" rules: totalParams is the
query string followed by the body with no separator, ``signature`` taken out;
HMAC-SHA256 hex (case-insensitive), RSA PKCS#1 v1.5 SHA-256 and Ed25519 in
base64 (percent-encoded on the wire); the API key in ``X-MBX-APIKEY``;
``timestamp < serverTime + 1000`` and ``serverTime - timestamp <= recvWindow``.
Answers as Binance does: -1022 (bad signature), -1021 (timestamp), -2014 /
-2015 (API key), -1131 (recvWindow above 60000).

Endpoints, spot and USDⓈ-M futures: ``time``; order (POST, DELETE);
``batchOrders``; balance and account; the listenKey calls (POST, PUT, DELETE;
API key only, no signature). HTTP/1.1 with keep-alive, like the exchange.
"""

from __future__ import annotations

import itertools
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.helpers.signing_verifier import BinanceVerifier

TIME_PATHS = ("/api/v3/time", "/fapi/v1/time")
LISTEN_KEY_PATHS = ("/api/v3/userDataStream", "/fapi/v1/listenKey")
#: The key preflight's endpoint (credbroker asks it before starting the bot, not the bot).
RESTRICTIONS_PATH = "/sapi/v1/account/apiRestrictions"


@dataclass
class Request:
    """What the fake exchange received: the decoded parameters and the answer's status and code."""

    method: str
    path: str
    params: dict[str, str]
    status: int
    code: int | None
    api_key: str | None
    raw_query: str
    raw_body: str
    client_port: int = 0


@dataclass
class FakeBinance:
    """Register keys through ``verifier``; ``url`` is the base URL (spot and futures paths alike)."""

    verifier: BinanceVerifier = field(default_factory=BinanceVerifier)
    requests: list[Request] = field(default_factory=list)
    listen_keys: set[str] = field(default_factory=set)
    server: ThreadingHTTPServer | None = None
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    scheme: str = "http"
    #: Headers sent with every signed answer, e.g. {"X-MBX-USED-WEIGHT-1M": "2390"} (default: weight 1).
    weight_headers: dict[str, str] = field(default_factory=lambda: {"X-MBX-USED-WEIGHT-1M": "1"})
    #: (status, Retry-After) answered to every signed request while set: the exchange's 429 or 418.
    limited: tuple[int, str] | None = None
    #: exchangeInfo's rateLimits (GET /fapi/v1/exchangeInfo, /api/v3/exchangeInfo).
    rate_limits: list[dict[str, Any]] = field(default_factory=list)
    #: GET /sapi/v1/account/apiRestrictions (signed): a safe trading key's rights unless a test changes them.
    restrictions: dict[str, Any] = field(default_factory=lambda: {
        "ipRestrict": True, "enableReading": True, "enableWithdrawals": False, "enableMargin": False,
        "enableSpotAndMarginTrading": True, "enableFutures": True, "enableInternalTransfer": False,
        "permitsUniversalTransfer": False})

    @property
    def clock_offset_ms(self) -> int:
        """How far the exchange's clock is ahead of this host's (ms)."""
        return self.verifier.clock_offset_ms

    @clock_offset_ms.setter
    def clock_offset_ms(self, value: int) -> None:
        self.verifier.clock_offset_ms = value

    def add_hmac(self, api_key: str, secret: str) -> None:
        self.verifier.add_hmac(api_key, secret)

    def add_public_key(self, api_key: str, pem: str | bytes) -> None:
        self.verifier.add_public_key(api_key, pem)

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

    def signed(self) -> list[Request]:
        """The requests that reached a signed endpoint."""
        return [r for r in self.requests
                if r.path not in TIME_PATHS and r.path not in LISTEN_KEY_PATHS and r.path != RESTRICTIONS_PATH]

    def preflights(self) -> list[Request]:
        """The key preflight's requests (GET apiRestrictions)."""
        return [r for r in self.requests if r.path == RESTRICTIONS_PATH]

    # -- answers -----------------------------------------------------------------------------
    def answer(self, method: str, target: str, headers: Any, body: str) -> tuple[int, Any, dict[str, str]]:
        parts = urlsplit(target)
        path = parts.path
        if path in TIME_PATHS:
            return 200, {"serverTime": int(time.time() * 1000) + self.clock_offset_ms}, {}
        if path.endswith("/exchangeInfo"):
            return 200, {"timezone": "UTC", "rateLimits": self.rate_limits, "symbols": []}, {}
        if path in LISTEN_KEY_PATHS:
            return self._listen_key(method, headers, {**dict(parse_qsl(body)), **dict(parse_qsl(parts.query))})
        params = {**dict(parse_qsl(body, keep_blank_values=True)), **dict(parse_qsl(parts.query, keep_blank_values=True))}
        window = params.get("recvWindow")
        if window is not None and window.isdigit() and int(window) > 60000:
            return 400, {"code": -1131, "msg": "recvWindow must be less than 60000."}, {}
        status, payload = self.verifier.check(method, target, headers, body)
        if status != 200:
            return status, payload, {}
        params = payload["params"]
        if self.limited is not None:
            status, retry = self.limited
            return status, {"code": -1003, "msg": "Way too many requests; IP banned until later."}, \
                {"Retry-After": retry}
        weight = dict(self.weight_headers)
        if path == RESTRICTIONS_PATH and method == "GET":
            return 200, dict(self.restrictions), weight
        if path.endswith("/batchOrders") and method == "POST":
            orders = json.loads(params["batchOrders"])
            return 200, [self._order(o) for o in orders], weight
        if path.endswith("/order") and method in ("POST", "DELETE"):
            order = self._order(params)
            if method == "DELETE":
                order["status"] = "CANCELED"
            return 200, order, weight
        if path.endswith("/balance"):
            return 200, [{"accountAlias": "x", "asset": "USDT", "balance": "1000.00000000",
                          "availableBalance": "1000.00000000"}], weight
        if path.endswith("/account"):
            return 200, {"balances": [{"asset": "USDT", "free": "1000.00000000", "locked": "0.00000000"}],
                         "assets": [{"asset": "USDT", "walletBalance": "1000.00000000"}]}, weight
        return 200, {"ok": True, "path": path, "params": params}, weight

    def _order(self, params: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            order_id = next(self._ids)
        return {"orderId": params.get("orderId") and int(params["orderId"]) or order_id,
                "symbol": params.get("symbol"), "side": params.get("side"), "type": params.get("type"),
                "origQty": params.get("quantity"), "price": params.get("price", "0"),
                "clientOrderId": params.get("newClientOrderId") or params.get("origClientOrderId") or f"x-{order_id}",
                "status": "NEW"}

    def _listen_key(self, method: str, headers: Any, params: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        api_key = headers.get("X-MBX-APIKEY")
        if not api_key:
            return 401, {"code": -2014, "msg": "API-key format invalid."}, {}
        if api_key not in self.verifier.keys:
            return 401, {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}, {}
        if method == "POST":
            key = secrets.token_urlsafe(48)
            with self._lock:
                self.listen_keys.add(key)
            return 200, {"listenKey": key}, {}
        if method in ("PUT", "DELETE"):
            key = params.get("listenKey", "")
            with self._lock:
                known = key in self.listen_keys or not key  # futures PUT/DELETE take no listenKey
                if method == "DELETE":
                    self.listen_keys.discard(key)
            if not known:
                return 400, {"code": -1125, "msg": "This listenKey does not exist."}, {}
            return 200, {}, {}
        return 405, {"code": -1000, "msg": "method"}, {}

    # -- server ------------------------------------------------------------------------------
    def start(self, tls: Any = None) -> FakeBinance:
        """Serve on a free loopback port; ``tls``: an ``ssl.SSLContext`` to serve HTTPS."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as a real server: no 40 ms Nagle/delayed-ACK stall per answer

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                status, payload, extra = fake.answer(self.command, self.path, self.headers, body)
                parts = urlsplit(self.path)
                params = {**dict(parse_qsl(body, keep_blank_values=True)),
                          **dict(parse_qsl(parts.query, keep_blank_values=True))}
                code = payload.get("code") if isinstance(payload, dict) else None
                with fake._lock:
                    fake.requests.append(Request(self.command, parts.path, params, status, code,
                                                 self.headers.get("X-MBX-APIKEY"), parts.query, body,
                                                 self.client_address[1]))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PUT = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


if __name__ == "__main__":  # a fake exchange for a manual try: prints its URL, serves until killed
    import sys

    fake = FakeBinance().start()
    import os

    # API_KEY=SECRET pairs from argv, or (keeping secrets out of /proc/PID/cmdline) from $FAKE_BINANCE_KEYS.
    for arg in sys.argv[1:] + [a for a in os.environ.get("FAKE_BINANCE_KEYS", "").split(",") if a]:
        name, _, secret = arg.partition("=")
        fake.add_hmac(name, secret)
    print(fake.url, flush=True)
    threading.Event().wait()
