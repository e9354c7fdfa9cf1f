"""A small Binance-style HTTP server that checks signatures the way Binance documents.

Used by the signing tests and the end-to-end test (never a real exchange).

Rules (Binance spot/futures REST docs, "SIGNED Endpoint security"):
- the API key comes in ``X-MBX-APIKEY``; missing or malformed -> -2014,
  unknown -> HTTP 401 -2015;
- ``totalParams`` = query string + request body (no separator), each with its
  ``signature`` parameter taken out;
- HMAC keys: hex HMAC-SHA256, compared case-insensitively in constant time;
  Ed25519 / RSA keys: base64 signature verified with the registered public key;
- ``timestamp`` must satisfy ``timestamp < serverTime + 1000`` and
  ``serverTime - timestamp <= recvWindow`` (default 5000) -> else -1021;
- a bad signature -> HTTP 400 ``{"code": -1022, "msg": "Signature for this request is not valid."}``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit


def _strip_signature(raw: str) -> tuple[str, str | None]:
    """(raw without its signature parameter, the signature) keeping every other byte as sent."""
    parts = raw.split("&") if raw else []
    kept: list[str] = []
    signature: str | None = None
    for part in parts:
        if part.startswith("signature="):
            signature = unquote(part[len("signature="):])
        else:
            kept.append(part)
    return "&".join(kept), signature


@dataclass
class Seen:
    method: str
    path: str
    status: int
    code: int | None
    total_params: str
    api_key: str | None


@dataclass
class BinanceVerifier:
    """Register keys with ``add_hmac``/``add_public_key``; ``url`` is the base URL."""

    keys: dict[str, tuple[str, Any]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    clock_offset_ms: int = 0

    def add_hmac(self, api_key: str, secret: str) -> None:
        self.keys[api_key] = ("hmac", secret.encode())

    def add_public_key(self, api_key: str, pem: str | bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric import ed25519
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        pub = load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
        self.keys[api_key] = ("ed25519" if isinstance(pub, ed25519.Ed25519PublicKey) else "rsa", pub)

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def check(self, method: str, target: str, headers: Any, body: str) -> tuple[int, dict[str, Any]]:
        parts = urlsplit(target)
        query, q_sig = _strip_signature(parts.query)
        body_rest, b_sig = _strip_signature(body)
        signature = b_sig if b_sig is not None else q_sig
        total = query + body_rest
        api_key = headers.get("X-MBX-APIKEY")
        if not api_key or len(api_key) < 8:
            return 401, {"code": -2014, "msg": "API-key format invalid."}
        if api_key not in self.keys:
            return 401, {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}
        params = dict(parse_qsl(query, keep_blank_values=True))
        params.update(dict(parse_qsl(body_rest, keep_blank_values=True)))  # query wins, per the docs
        params.update(dict(parse_qsl(query, keep_blank_values=True)))
        if signature is None:
            return 400, {"code": -1102, "msg": "Mandatory parameter 'signature' was not sent, was empty/null, or malformed."}
        try:
            ts = int(params["timestamp"])
            window = int(params.get("recvWindow", "5000"))
        except (KeyError, ValueError):
            return 400, {"code": -1102, "msg": "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed."}
        server_time = int(time.time() * 1000) + self.clock_offset_ms
        if not (ts < server_time + 1000 and server_time - ts <= window):
            return 400, {"code": -1021, "msg": "Timestamp for this request is outside of the recvWindow."}
        kind, key = self.keys[api_key]
        ok = False
        if kind == "hmac":
            expected = hmac.new(key, total.encode(), hashlib.sha256).hexdigest()
            ok = hmac.compare_digest(expected, signature.lower())
        else:
            try:
                raw = base64.b64decode(signature, validate=True)
                if kind == "ed25519":
                    key.verify(raw, total.encode())
                else:
                    from cryptography.hazmat.primitives import hashes
                    from cryptography.hazmat.primitives.asymmetric import padding

                    key.verify(raw, total.encode(), padding.PKCS1v15(), hashes.SHA256())
                ok = True
            except Exception:  # noqa: BLE001 - any failure is a bad signature
                ok = False
        if not ok:
            return 400, {"code": -1022, "msg": "Signature for this request is not valid."}
        return 200, {"ok": True, "path": parts.path, "params": params}

    def start(self) -> BinanceVerifier:
        verifier = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                if self.path.startswith("/redirect"):  # for the redirect tests: 302 to ?to=URL
                    target = dict(parse_qsl(urlsplit(self.path).query)).get("to", "/")
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                status, payload = verifier.check(self.command, self.path, self.headers, body)
                query, _ = _strip_signature(urlsplit(self.path).query)
                verifier.seen.append(Seen(self.command, urlsplit(self.path).path, status, payload.get("code"),
                                          query + _strip_signature(body)[0], self.headers.get("X-MBX-APIKEY")))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PUT = _handle

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
