"""A small Binance-style WebSocket API server that checks signatures the way Binance documents.

Rules (spot WebSocket API docs, "Request security", "SIGNED request security",
"Timing security", "Session Authentication"; the USDⓈ-M futures WebSocket API
states the same):

- requests are JSON text frames ``{"id", "method", "params"}``; answers
  ``{"id", "status", "result"}`` or ``{"id", "status", "error": {"code", "msg"}}``;
- a signed request's payload is every parameter but ``signature``, sorted by
  name, ``name=value`` joined by ``&``, no percent-encoding; ``apiKey`` must be
  a registered key (else 401 -2015); HMAC: hex HMAC-SHA256; Ed25519 / RSA: base64
  signature verified with the registered public key (else 400 -1022);
- ``timestamp < serverTime + 1000`` and ``serverTime - timestamp <= recvWindow``
  (default 5000), else 400 -1021;
- ``session.logon`` only with an Ed25519 key; afterwards requests may omit
  ``apiKey`` and ``signature`` (not ``timestamp``);
- ``userDataStream.subscribe`` needs a logged-on session; it answers
  ``{"subscriptionId": 0}`` and then pushes one event
  (``{"subscriptionId": 0, "event": {...}}``) on the same connection.

Written for these tests only (never a real exchange).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

PUBLIC = {"ping", "time", "depth", "exchangeInfo", "ticker.price", "session.status"}
#: Session methods that take no parameters (spot docs: userDataStream.subscribe "Parameters: NONE").
NO_TIMESTAMP = {"userDataStream.subscribe", "userDataStream.unsubscribe", "session.logout"}


@dataclass
class Seen:
    """One request the fake answered: its method, params and the answer's status/code."""

    method: str
    params: dict[str, Any]
    status: int
    code: int | None = None


@dataclass
class FakeBinanceWs:
    hmac_keys: dict[str, bytes] = field(default_factory=dict)
    public_keys: dict[str, Any] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    #: The REQUEST_WEIGHT count its answers report (the IP's weight used, other processes' included);
    #: None: the number of requests seen.
    used_weight: int | None = None
    #: Seconds: while set, every request is answered 429 -1003 with error.data.retryAfter, as Binance does.
    limited: int | None = None
    _server: Any = None
    _thread: threading.Thread | None = None

    def add_hmac(self, api_key: str, secret: str) -> None:
        self.hmac_keys[api_key] = secret.encode()

    def add_public_key(self, api_key: str, pem: str | bytes) -> None:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        self.public_keys[api_key] = load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._server.socket.getsockname()[1]}"

    def start(self) -> FakeBinanceWs:
        from websockets.sync.server import serve

        self._server = serve(self._handle, "127.0.0.1", 0)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- the protocol -----------------------------------------------------------------------
    def _handle(self, conn: Any) -> None:
        session: dict[str, Any] = {"key": None}
        for message in conn:
            request = json.loads(message)
            rid, method, params = request.get("id"), request["method"], request.get("params") or {}
            if self.limited is not None:
                now = int(time.time() * 1000)
                status, body, extra = 429, {"code": -1003, "msg": "Too much request weight used; current limit is "
                                            "6000 request weight per 1 MINUTE.",
                                            "data": {"serverTime": now, "retryAfter": now + self.limited * 1000}}, []
            else:
                status, body, extra = self.answer(method, params, session)
            code = body.get("code") if status != 200 else None
            self.seen.append(Seen(method, dict(params), status, code))
            out: dict[str, Any] = {"id": rid, "status": status}
            out["result" if status == 200 else "error"] = body
            # Binance adds the rate limits to every answer unless returnRateLimits=false.
            out["rateLimits"] = [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1,
                                  "limit": 2400,
                                  "count": len(self.seen) if self.used_weight is None else self.used_weight}]
            conn.send(json.dumps(out))
            for event in extra:
                conn.send(json.dumps(event))

    def answer(self, method: str, params: dict[str, Any], session: dict[str, Any]
               ) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
        if method in PUBLIC:
            if method == "session.status":
                return 200, {"apiKey": session["key"]}, []
            return 200, {"serverTime": int(time.time() * 1000)}, []
        if "signature" in params:
            key = params.get("apiKey")
            if key not in self.hmac_keys and key not in self.public_keys:
                return 401, {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}, []
            payload = "&".join(f"{k}={_value(v)}" for k, v in sorted(params.items()) if k != "signature").encode()
            if not self._verify(key, payload, params["signature"]):
                return 400, {"code": -1022, "msg": "Signature for this request is not valid."}, []
            acting = key
        elif session["key"] is not None:
            acting = session["key"]
        else:
            return 401, {"code": -1002, "msg": "You are not authorized to execute this request."}, []
        timing = None if method in NO_TIMESTAMP else self._timing(params)
        if timing is not None:
            return 400, timing, []
        if method == "session.logon":
            if acting not in self.public_keys or type(self.public_keys[acting]).__name__.lower().find("ed25519") < 0:
                return 400, {"code": -4056, "msg": "HMAC_SHA256 API key is not supported."}, []
            session["key"] = acting
            return 200, {"apiKey": acting, "authorizedSince": int(time.time() * 1000)}, []
        if method == "session.logout":
            session["key"] = None
            return 200, {"apiKey": None}, []
        if method == "userDataStream.subscribe":
            if session["key"] is None:
                return 401, {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}, []
            event = {"subscriptionId": 0, "event": {"e": "outboundAccountPosition", "E": int(time.time() * 1000),
                                                    "B": [{"a": "USDT", "f": "100.0", "l": "0.0"}]}}
            return 200, {"subscriptionId": 0}, [event]
        if method == "order.place":
            return 200, {"symbol": params.get("symbol"), "orderId": len(self.seen) + 1,
                         "clientOrderId": params.get("newClientOrderId"), "status": "NEW"}, []
        return 200, {"method": method}, []

    def _verify(self, key: str, payload: bytes, signature: Any) -> bool:
        if not isinstance(signature, str):
            return False
        if key in self.hmac_keys:
            expected = hmac.new(self.hmac_keys[key], payload, hashlib.sha256).hexdigest()
            return hmac.compare_digest(expected, signature.lower())
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, rsa

        public = self.public_keys[key]
        try:
            raw = base64.b64decode(signature, validate=True)
            if isinstance(public, rsa.RSAPublicKey):
                public.verify(raw, payload, padding.PKCS1v15(), hashes.SHA256())
            else:
                public.verify(raw, payload)
        except (InvalidSignature, ValueError):
            return False
        return True

    @staticmethod
    def _timing(params: dict[str, Any]) -> dict[str, Any] | None:
        if "timestamp" not in params:
            return {"code": -1102, "msg": "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed."}
        server_time = int(time.time() * 1000)
        window = float(params.get("recvWindow", 5000))
        stamp = int(params["timestamp"])
        if not (stamp < server_time + 1000 and server_time - stamp <= window):
            return {"code": -1021, "msg": "Timestamp for this request is outside of the recvWindow."}
        return None


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def main() -> None:
    """Run as a process (``python tests/helpers/fake_binance_ws.py API_KEY=SECRET``): print the URL, serve until killed."""
    import sys

    fake = FakeBinanceWs().start()
    for arg in sys.argv[1:]:
        key, _, secret = arg.partition("=")
        fake.add_hmac(key, secret)
    print(fake.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
