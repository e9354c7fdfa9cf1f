"""The signing proxy's WebSocket API endpoint: Binance's WebSocket API on loopback, for the bot only.

Binance's WebSocket API (spot ``wss://ws-api.binance.com:443/ws-api/v3``,
USDⓈ-M futures ``wss://ws-fapi.binance.com/ws-fapi/v1``) takes signed
requests as JSON text frames: ``{"id", "method", "params"}``, the signature
over every parameter but ``signature``, sorted by name, not percent-encoded
(``binance.ws_payload``). Under ``credbroker run --proxy`` the bot's client
connects to ``ws://127.0.0.1:PORT/ws-api/v3`` (or ``/ws-fapi/v1``; the base
is in ``CREDBROKER_PROXY_WS_URL``) and signs with the proxy secret as usual.
Per connection the proxy opens one connection to the exchange (the same path's
upstream) and relays every frame the exchange sends (answers, user data
events) unchanged. Per request from the bot, in this order:

1. the connection belongs to the bot's process tree (checked at the
   handshake, as the REST proxy checks a connection);
2. a request with a ``signature``: it is the proxy secret's over the payload
   (``ClientKey.verify``), ``apiKey`` is the profile's, ``timestamp`` is fresh
   and ``recvWindow`` at most 60,000 ms;
3. every request that is not public market data (signed, ``apiKey``-only, or
   authorized by a logged-on session) passes the profile's signing policy,
   read against the real parameter values and the REST endpoint the method
   stands for (``binance.ws_method_endpoint``: ``order.place`` is
   ``POST /api/v3/order``), so ``deny_endpoints``, ``deny_kinds``, symbols,
   quantities, notionals and the rate limit hold as they do for REST;
4. ``timestamp`` is re-stamped with the exchange's clock (the REST upstream's
   offset) and a signed request re-signed with the real key (HMAC, Ed25519,
   RSA, or inside Vault with transit), then sent on.

``session.logon``: when the bot logs on with the proxy key, the proxy logs on
upstream with the real key (which must be Ed25519, or transit: Binance takes
no other key for a session); the session's later unsigned requests are each
still checked against the policy. ``session.logout`` ends it. Spot user data
(``userDataStream.subscribe`` in a logged-on session, or
``userDataStream.subscribe.signature``) works through it: the events come back
on the same connection.

Request weight and order rate: every request the proxy would forward (public
ones too) first takes its weight and order count from the REST proxy's limiter
of the same upstream (``broker.proxy.weight``, ``SigningProxy.limiters``), as
Binance counts WebSocket API requests against the same IP weight and account
order limits as REST ("Rate limits" in the WebSocket API docs). The weight is
the REST endpoint's the method stands for (``order.place`` as
``POST /api/v3/order``), else ``WS_DEFAULT_WEIGHT``. Over a limit, or while the
exchange's 429/418 ``Retry-After`` lasts, the bot gets Binance's WebSocket
answer itself, never forwarded: ``status`` 429, ``error.code`` -1003 (weight)
or -1015 (orders), ``error.data.retryAfter`` (epoch ms) and the ``rateLimits``
array with the counts the proxy holds. The ``rateLimits`` of the exchange's
own answers (its counts, other processes on the IP included) and its 429/418
feed the same limiter.

Refusals answer like Binance (``{"id", "status", "error": {"code", "msg"}}``)
and are recorded (``proxy_refused``, ``policy_refused``); each forwarded
request is recorded (``proxy_request`` with ``ws_method``); an exchange answer
with a key-trouble code is recorded as ``signature_failure``.

The ``websockets`` library (``pip install credbroker[ws]``) is imported here
only, and only when a proxy run starts this endpoint: the core never needs it.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import units
from ..errors import BrokerError, ConfigError, PolicyRefused, SigningError
from ..signing import binance
from ..signing.failures import classify
from ..signing_policy import SigningPolicy, SignRequest

#: The local paths, as Binance's: which upstream each one reaches.
PATHS = {"/ws-api/v3": "spot", "/ws-fapi/v1": "futures"}
#: Public market data and session queries: forwarded as they are (nothing of the key is used).
PUBLIC_METHODS = frozenset({
    "ping", "time", "exchangeInfo", "depth", "trades.recent", "trades.historical", "trades.aggregate", "klines",
    "uiKlines", "avgPrice", "ticker.24hr", "ticker.tradingDay", "ticker", "ticker.price", "ticker.book",
    "session.status",
})
MAX_MESSAGE = 1 << 20
#: The weight of a method with no REST endpoint in the limiter's table (session.*, userDataStream.subscribe...).
WS_DEFAULT_WEIGHT = 2
#: Public methods whose weight is their REST endpoint's (spot paths; the limiter's table knows them).
_PUBLIC_ENDPOINTS = {"ping": "/api/v3/ping", "time": "/api/v3/time", "exchangeInfo": "/api/v3/exchangeInfo",
                     "depth": "/api/v3/depth", "klines": "/api/v3/klines", "uiKlines": "/api/v3/klines",
                     "avgPrice": "/api/v3/avgPrice", "ticker.price": "/api/v3/ticker/price",
                     "ticker.book": "/api/v3/ticker/bookTicker", "ticker.24hr": "/api/v3/ticker/24hr"}
#: The HTTP verb a method's last word stands for (the limiter's table is per verb and path).
_VERBS = {"place": "POST", "test": "POST", "cancelReplace": "POST", "start": "POST", "modify": "PUT", "ping": "PUT",
          "cancel": "DELETE", "cancelAll": "DELETE", "stop": "DELETE"}
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})

# Audit event names (the REST proxy's, so the weekly review reads both the same way).
PROXY_REQUEST = "proxy_request"
PROXY_REFUSED = "proxy_refused"
POLICY_REFUSED = "policy_refused"
SIGNATURE_FAILURE = "signature_failure"


def available() -> bool:
    """True when the optional ``websockets`` library (``credbroker[ws]``) is installed."""
    import importlib.util

    return importlib.util.find_spec("websockets") is not None


def upstream_urls(table: Mapping[str, Any] | None, where: str) -> dict[str, str]:
    """The exchange's WebSocket API URL per upstream, from the profile's ``[proxy]`` table.

    ``ws_spot`` and ``ws_futures`` override Binance's (the testnet's with
    ``testnet = true``). They must be ``wss://``; ``ws://`` only on loopback
    with ``unsafe_plain_http_loopback = true`` (a fake exchange in tests).
    """
    table = table or {}
    defaults = binance.WS_API_TESTNET_URLS if table.get("testnet") is True else binance.WS_API_URLS
    plain_ok = table.get("unsafe_plain_http_loopback") is True
    urls: dict[str, str] = {}
    for name in ("spot", "futures"):
        raw = table.get(f"ws_{name}", defaults[name])
        parts = units.split_url(raw) if isinstance(raw, str) else None
        if parts is None or parts.scheme not in ("wss", "ws") or not parts.hostname or parts.query:
            raise ConfigError(f"{where}.ws_{name}: expected a wss:// URL, got {raw!r}",
                              f'e.g. ws_{name} = "{binance.WS_API_URLS[name]}"')
        if parts.scheme == "ws" and not (plain_ok and parts.hostname in _LOOPBACK):
            raise ConfigError(f"{where}.ws_{name}: {raw!r} is plain ws://", "use wss:// (ws:// only for a fake "
                              "exchange on loopback in tests, with unsafe_plain_http_loopback = true)")
        urls[name] = raw.rstrip("/")
    return urls


@dataclass
class Session:
    """One bot connection: which API it speaks and whether the proxy logged it on upstream."""

    api: str
    pid: int | None
    logged_on: bool = False
    #: request id -> the limiter's ticket, handed back with the exchange's answer (its rateLimits counts)
    tickets: dict[Any, Any] = field(default_factory=dict)
    #: sends to the bot, from the relay thread and the request thread alike
    lock: threading.Lock = field(default_factory=threading.Lock)


class Reply(Exception):
    """A refusal answered to the bot in Binance's shape (never sent upstream)."""

    def __init__(self, status: int, code: int, message: str, rule: str, extra: Mapping[str, Any] | None = None
                 ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.rule = status, code, message, rule
        #: more of Binance's answer: ``data`` (in ``error``) and ``rateLimits`` for a rate-limit refusal
        self.extra = dict(extra or {})


class WsProxy:
    """The WebSocket API endpoint of one proxy run (see the module docstring)."""

    def __init__(
        self,
        signer: Any,
        client_key: Any,
        policy: SigningPolicy,
        urls: Mapping[str, str],
        *,
        profile: str,
        record: Callable[[str, dict[str, Any]], bool],
        check_peer: Callable[[tuple[str, int], tuple[str, int]], tuple[int | None, str | None]],
        now_ms: Mapping[str, Callable[[], int]] | None = None,
        ca_file: str | None = None,
        open_timeout: float = 10.0,
        limiters: Mapping[str, Any] | None = None,
    ) -> None:
        self.signer = signer
        self.client_key = client_key
        self.policy = policy
        self.urls = dict(urls)
        self.profile = profile
        self._record = record
        self._check_peer = check_peer
        self._now_ms = dict(now_ms or {})
        self._ca_file = ca_file
        self._open_timeout = open_timeout
        #: upstream name -> ``broker.proxy.weight.Limiter``: the REST proxy's own, shared (none: no limit)
        self.limiters = dict(limiters or {})
        self._api_key = str(signer.api_key)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.forwarded = 0
        self.refused = 0

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The base URL for the bot (``ws://127.0.0.1:PORT``); add ``/ws-api/v3`` or ``/ws-fapi/v1``."""
        assert self._server is not None
        return f"ws://127.0.0.1:{self._server.socket.getsockname()[1]}"

    def start(self) -> str:
        """Listen on 127.0.0.1 (a free port) in a thread; returns the base URL."""
        from websockets.sync.server import serve

        self._server = serve(self._handle, "127.0.0.1", 0, process_request=self._handshake, max_size=MAX_MESSAGE,
                             compression=None)
        self._thread = threading.Thread(target=self._server.serve_forever, name="credbroker-proxy-ws", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop listening and close every connection. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    # -- connections --------------------------------------------------------------------------
    def _handshake(self, conn: Any, request: Any) -> Any:
        """Refuse, before the upgrade, a process outside the bot's tree or a path not served."""
        client, server = conn.remote_address, conn.local_address
        pid, reason = self._check_peer((str(client[0]), int(client[1])), (str(server[0]), int(server[1])))
        if reason is not None:
            return conn.respond(403, f"credbroker proxy: this process may not use the proxy: {reason}\n")
        if request.path.split("?", 1)[0] not in PATHS:
            return conn.respond(404, f"credbroker proxy: serves {' and '.join(PATHS)} (Binance's WebSocket API "
                                     "paths)\n")
        conn.credbroker_pid = pid
        return None

    def _handle(self, conn: Any) -> None:
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        path, _, query = conn.request.path.partition("?")
        session = Session(api=PATHS[path], pid=getattr(conn, "credbroker_pid", None))
        target = self.urls[session.api] + (f"?{query}" if query else "")
        try:
            with connect(target, ssl=self._ssl(target), open_timeout=self._open_timeout, max_size=MAX_MESSAGE,
                         compression=None) as upstream:
                self._serve(conn, upstream, session)
        except (OSError, WebSocketException, TimeoutError) as exc:
            self._record(PROXY_REFUSED, {"profile": self.profile, "pid": session.pid, "rule": "upstream",
                                         "reason": f"cannot reach {self.urls[session.api]}: {type(exc).__name__}"})
            conn.close(1011, "credbroker proxy: cannot reach the exchange's WebSocket API")

    def _serve(self, conn: Any, upstream: Any, session: Session) -> None:
        """Relay the exchange to the bot in a thread; check, re-sign and forward the bot's requests here."""
        from websockets.exceptions import WebSocketException

        relay = threading.Thread(target=self._relay, args=(upstream, conn, session), daemon=True,
                                 name="credbroker-proxy-ws-relay")
        relay.start()
        try:
            for message in conn:
                if not isinstance(message, str):
                    self._send(conn, session, _answer(None, Reply(400, -1000, "credbroker proxy: requests are "
                                                                              "JSON text frames", "malformed")))
                    continue
                out, answer = self.handle(message, session)
                if answer is not None:
                    self._send(conn, session, answer)
                if out is not None:
                    upstream.send(out)
        except WebSocketException:
            pass  # the bot or the exchange went away: both ends are closed below
        finally:
            upstream.close()
            conn.close()
            relay.join(timeout=5.0)

    def _relay(self, upstream: Any, conn: Any, session: Session) -> None:
        """Every frame of the exchange to the bot, unchanged; key trouble recorded."""
        from websockets.exceptions import WebSocketException

        try:
            for message in upstream:
                if isinstance(message, str) and '"error"' in message:
                    self._after_error(message, session)
                if isinstance(message, str) and '"rateLimits"' in message:
                    self._observe(message, session)
                self._send(conn, session, message)
        except WebSocketException:
            pass
        finally:
            code = upstream.close_code
            conn.close(code if code in (1000, 1001, 1008, 1011) else 1011, "credbroker proxy: the exchange closed")

    def _send(self, conn: Any, session: Session, message: str | bytes) -> None:
        with session.lock:
            conn.send(message)

    def _ssl(self, url: str) -> Any:
        if not url.startswith("wss://"):
            return None
        import ssl

        cafile = self._ca_file
        if cafile is None:
            try:
                import certifi

                cafile = certifi.where()
            except ImportError:
                pass
        return ssl.create_default_context(cafile=cafile)

    # -- requests -----------------------------------------------------------------------------
    def handle(self, raw: str, session: Session) -> tuple[str | None, str | None]:
        """One frame from the bot: (what goes to the exchange, what goes back to the bot); one is None."""
        request_id: Any = None
        summary: dict[str, Any] = {}
        try:
            try:
                request = json.loads(raw)
            except ValueError:
                raise Reply(400, -1000, "credbroker proxy: the request is not JSON", "malformed") from None
            if not isinstance(request, dict) or not isinstance(request.get("method"), str):
                raise Reply(400, -1000, "credbroker proxy: a request is {id, method, params}", "malformed")
            request_id = request.get("id")
            method = request["method"][:128]
            params = request.get("params", {})
            if not isinstance(params, dict):
                raise Reply(400, -1000, "credbroker proxy: params must be an object", "malformed")
            base = binance.ws_base_method(method)
            summary = {"ws_method": method, "endpoint": binance.ws_method_endpoint(method, session.api)}
            uses_key = "signature" in params or "apiKey" in params or (session.logged_on
                                                                       and base not in PUBLIC_METHODS)
            if not uses_key:
                # Public data, or a request that carries no authority: the exchange reads it as anonymous.
                self._admit(method, params, session, request_id)
                return raw, None
            out = self._authorized(request, method, params, session, summary)
        except Reply as refusal:
            self.refused += 1
            event = POLICY_REFUSED if refusal.rule.startswith("policy:") else PROXY_REFUSED
            rule = refusal.rule.removeprefix("policy:")
            more = {"retry_after": refusal.extra["retry_after"]} if "retry_after" in refusal.extra else {}
            self._record(event, {"profile": self.profile, "pid": session.pid, "rule": rule, "reason": refusal.message,
                                 "by": "proxy", **more, **summary})
            return None, _answer(request_id, refusal)
        return out, None

    def _authorized(self, request: dict[str, Any], method: str, params: dict[str, Any], session: Session,
                    summary: dict[str, Any]) -> str:
        """Check and re-sign a request that uses the key (signed, apiKey-only, or in a logged-on session)."""
        base = binance.ws_base_method(method)
        signed = "signature" in params
        if signed:
            self._check_client_signature(params)
        elif base == binance.WS_LOGON:
            raise Reply(400, -1102, "Mandatory parameter 'signature' was not sent, was empty/null, or malformed.",
                        "client_signature")
        given_key = params.get("apiKey")
        if given_key is not None and not (isinstance(given_key, str) and hmac.compare_digest(
                given_key.encode("utf-8", "replace"), self._api_key.encode())):
            raise Reply(401, -2015, "the apiKey is not this profile's API key", "api_key")
        body = {k: v for k, v in params.items() if k != "signature" and v is not None}
        try:
            req = SignRequest(params=[(k, binance.ws_value(k, v)) for k, v in sorted(body.items())],
                              endpoint=summary["endpoint"], method=None)
        except SigningError as exc:
            raise Reply(400, -1100, f"credbroker proxy: {exc.message}", "malformed") from None
        summary.update(req.summary())
        summary["ws_method"] = method
        if base == binance.WS_LOGON:
            try:
                self.signer.check_ws_logon()
            except SigningError as exc:
                raise Reply(400, -1002, f"credbroker proxy: {exc.message}", "logon_key") from None
        try:
            self.policy.check(req)
        except PolicyRefused as exc:
            raise Reply(403, -1002, f"credbroker proxy: {exc.message}", f"policy:{exc.rule}") from None
        now = self._now_ms.get(session.api)
        if "timestamp" in body or signed:
            body["timestamp"] = now() if now is not None else int(time.time() * 1000)
        if signed:
            try:
                body = self.signer.sign_ws_params(body, method=method)
            except BrokerError as exc:
                raise Reply(500, -1000, f"credbroker proxy: signing failed: {exc.message}", "signing") from None
        self._admit(method, body, session, request.get("id"))
        if not self._record(PROXY_REQUEST, {"profile": self.profile, "pid": session.pid, "signed": signed,
                                            "upstream": f"ws:{session.api}", **summary}):
            raise Reply(500, -1000, "credbroker proxy: the audit log cannot be written; nothing is forwarded",
                        "audit")
        if base == binance.WS_LOGON:
            session.logged_on = True
        elif base == "session.logout":
            session.logged_on = False
        self.forwarded += 1
        out = dict(request)
        out["params"] = body
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False)

    def _admit(self, method: str, params: Mapping[str, Any], session: Session, request_id: Any) -> None:
        """Take the request's weight and orders from the upstream's limiter, or raise Binance's 429 Reply."""
        limiter = self.limiters.get(session.api)
        if limiter is None:
            return
        from .weight import Verdict

        weight, orders = ws_cost(method, session.api, params)
        now = self._now_ms.get(session.api)
        now_ms = now() if now is not None else int(time.time() * 1000)
        verdict = limiter.acquire(weight, orders, now_ms)
        if isinstance(verdict, Verdict):
            # Binance's WebSocket API answer to a request over a limit: error.data.retryAfter is when
            # requests are accepted again (epoch ms), rateLimits the counts per limit.
            raise Reply(verdict.status, verdict.code, verdict.message, verdict.rule,
                        {"data": {"serverTime": now_ms, "retryAfter": now_ms + verdict.retry_after * 1000},
                         "rateLimits": limiter.rate_limits(), "retry_after": verdict.retry_after})
        if isinstance(request_id, (str, int)) and len(session.tickets) < 1024:  # bounded: ids a bot never reuses
            session.tickets[request_id] = verdict

    def _observe(self, message: str, session: Session) -> None:
        """The exchange's ``rateLimits`` counts (and a 429/418 with its ``retryAfter``) into the limiter."""
        limiter = self.limiters.get(session.api)
        if limiter is None:
            return
        try:
            data = json.loads(message)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        from .weight import headers_from_rate_limits

        headers = headers_from_rate_limits(data.get("rateLimits"))
        status = data.get("status") if isinstance(data.get("status"), int) else 200
        error = data.get("error")
        extra = error.get("data") if isinstance(error, dict) else None
        if status in (418, 429) and isinstance(extra, dict):
            until, server_now = extra.get("retryAfter"), extra.get("serverTime")
            if isinstance(until, int) and isinstance(server_now, int):
                headers.append(("Retry-After", str(max(1, -(-(until - server_now) // 1000)))))
        rid = data.get("id")
        ticket = session.tickets.pop(rid, None) if isinstance(rid, (str, int)) else None
        limiter.observe(ticket, status, headers)

    def _check_client_signature(self, params: Mapping[str, Any]) -> None:
        signature = params.get("signature")
        try:
            payload = binance.ws_payload(params)
        except SigningError as exc:
            raise Reply(400, -1100, f"credbroker proxy: {exc.message}", "malformed") from None
        if not isinstance(signature, str) or not (
                self.client_key.verify(payload.encode("utf-8"), signature)
                # python-binance signs the sorted parameters percent-encoded (urlencode) against the
                # docs' rule; both forms name the same parameters, the ones the policy checks and
                # the exchange receives, re-signed by the rule.
                or self.client_key.verify(_urlencoded(params).encode("ascii"), signature)):
            raise Reply(400, -1022, "Signature for this request is not valid. (credbroker proxy: sign with the "
                                    "proxy secret credbroker gave the bot)", "client_signature")
        try:
            window = float(params.get("recvWindow", binance.DEFAULT_RECV_WINDOW))
            stamp = int(params["timestamp"])
        except KeyError:
            raise Reply(400, -1102, "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed.",
                        "timestamp") from None
        except (TypeError, ValueError):
            raise Reply(400, -1100, "timestamp or recvWindow is not a number", "timestamp") from None
        if not 0 < window <= binance.MAX_RECV_WINDOW:
            raise Reply(400, -1131, "recvWindow must be less than 60000.", "recv_window")
        # The bot's clock is this host's; a client that corrected itself with the exchange's time
        # is judged against the exchange's clock.
        nows = [int(time.time() * 1000)] + [now() for now in self._now_ms.values()]
        if not any(stamp < now + 1000 and now - stamp <= window for now in nows):
            raise Reply(400, -1021, "Timestamp for this request is outside of the recvWindow.", "timestamp")

    def _after_error(self, message: str, session: Session) -> None:
        try:
            data = json.loads(message)
        except ValueError:
            return
        if not isinstance(data, dict) or not isinstance(data.get("status"), int):
            return
        error = data.get("error")
        failure = classify(data["status"], error, f"{self.urls[session.api]}", method=None,
                           profile=self.profile, api_key=self._api_key)
        if failure is not None:
            self._record(SIGNATURE_FAILURE, {**failure.to_dict(), "by": "proxy", "pid": session.pid})


def _urlencoded(params: Mapping[str, Any]) -> str:
    """The sorted parameters as ``urllib.parse.urlencode`` writes them (what python-binance signs)."""
    from urllib.parse import urlencode

    return urlencode([(k, binance.ws_value(k, v)) for k, v in sorted(params.items())
                      if k != "signature" and v is not None])


def ws_cost(method: str, api: str, params: Mapping[str, Any]) -> tuple[int, int]:
    """(request weight, orders) of one WebSocket API request: its REST endpoint's, else ``WS_DEFAULT_WEIGHT``."""
    from .weight import orders_of, weight_of

    base = binance.ws_base_method(method)
    try:
        path = binance.ws_method_endpoint(method, api)
    except SigningError:
        path = None
    if path is None and base in _PUBLIC_ENDPOINTS:
        path = _PUBLIC_ENDPOINTS[base] if api == "spot" else _PUBLIC_ENDPOINTS[base].replace("/api/v3/", "/fapi/v1/")
    if path is None or not path.startswith("/"):
        return WS_DEFAULT_WEIGHT, 0
    verb = _VERBS.get(base.rsplit(".", 1)[-1], "GET")
    values: dict[str, str] = {}
    for name, value in params.items():
        try:
            values[name] = binance.ws_value(name, value)
        except SigningError:
            continue  # a value no request could carry: it weighs nothing (the exchange refuses the request)
    return weight_of(api, verb, path, values), orders_of(verb, path, values)


def _answer(request_id: Any, refusal: Reply) -> str:
    """A refusal in the shape of Binance's failed response (with ``data`` and ``rateLimits`` when over a limit)."""
    error: dict[str, Any] = {"code": refusal.code, "msg": refusal.message}
    if "data" in refusal.extra:
        error["data"] = refusal.extra["data"]
    out: dict[str, Any] = {"id": request_id, "status": refusal.status, "error": error}
    if "rateLimits" in refusal.extra:
        out["rateLimits"] = refusal.extra["rateLimits"]
    return json.dumps(out, ensure_ascii=False)
