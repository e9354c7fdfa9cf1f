"""The signing proxy's HTTP server: Binance's REST API on loopback, for the bot only.

Per request, in this order (each step refuses with a Binance-shaped JSON error
and an audit record):

1. the connection belongs to the bot's process tree (``peer.peer_in_tree``,
   checked once per connection);
2. the path is canonical and served (``/api/``, ``/sapi/`` -> spot,
   ``/fapi/`` -> USDⓈ-M futures), and not a denied endpoint;
3. for a signed request (one with a ``signature`` parameter): the signature
   is the proxy secret's over the request as sent (``ClientKey.verify``), its
   ``timestamp`` is fresh and its ``recvWindow`` at most 60,000 ms; the
   profile's signing policy accepts the real method, path and parameters;
   then the client's signature is dropped, ``timestamp`` re-stamped with the
   exchange's clock, and the request signed with the real key over exactly
   the bytes that are sent (so a client that signs one encoding and sends
   another, like python-binance with a ``/`` in a value, gets through);
4. the request goes to the exchange over a kept-alive pool; its answer comes
   back unchanged (status, headers but hop-by-hop ones, body bytes).

Audit: ``proxy_request`` before a request leaves (method, endpoint, parameter
names, the order's public fields), ``proxy_answer`` for an answer that is not
2xx, ``signature_failure`` (with Binance's code) for key trouble,
``policy_refused`` / ``proxy_refused`` for refusals. Records are queued in
memory (request threads never wait for the log's lock, which a group commit
holds across its fsync) and written and fsynced by a thread at most
``FLUSH_INTERVAL`` seconds later, and at stop; a log that cannot be written
makes every later request fail (fail closed).
"""

from __future__ import annotations

import hmac
import json
from collections import deque
import re
import threading
import time
from collections.abc import Callable, Mapping
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

from ..agent import AuditSink
from ..errors import BrokerError, PolicyRefused, UpstreamError
from ..signing import binance
from ..signing.failures import classify
from ..signing_policy import KINDS, SigningPolicy, SignRequest
from .clientkey import ClientKey
from .peer import peer_in_tree
from .settings import ProxySettings
from .upstream import Answer, Upstream
from ..events import Event

FLUSH_INTERVAL = 0.2  # seconds: the longest a queued audit record waits for its fsync
MAX_BODY = 1 << 20
#: A path the exchange reads the same way we do: no "//", no dot segments, no percent-escapes.
_CANONICAL = re.compile(r"^(/[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*)+/?$")
#: Request headers passed on to the exchange; every other one stays here.
_FORWARDED_HEADERS = ("Content-Type", "Accept", "Accept-Encoding", "User-Agent")
_RESYNC_AFTER = 1.0  # seconds between two clock syncs triggered by -1021

# Audit event names written here.
PROXY_REQUEST = Event.PROXY_REQUEST
PROXY_ANSWER = Event.PROXY_ANSWER
PROXY_REFUSED = Event.PROXY_REFUSED
POLICY_REFUSED = Event.POLICY_REFUSED
SIGNATURE_FAILURE = Event.SIGNATURE_FAILURE


class Refusal(NamedTuple):
    """A refusal: HTTP status, Binance code, message (no secret), and the rule for the audit record."""

    status: int
    code: int
    message: str
    rule: str


def _json_answer(status: int, code: int, message: str) -> Answer:
    body = json.dumps({"code": code, "msg": message}).encode()
    return Answer(status, [("Content-Type", "application/json;charset=UTF-8")], body)


def _strip_signature(raw: str) -> tuple[str, str | None, int]:
    """(raw without its signature items, the last signature, how many there were), other bytes as sent."""
    kept: list[str] = []
    signature: str | None = None
    count = 0
    for part in raw.split("&") if raw else []:
        if part.startswith("signature="):
            from urllib.parse import unquote

            signature = unquote(part[len("signature="):])
            count += 1
        else:
            kept.append(part)
    return "&".join(kept), signature, count


def _restamp(raw: str, stamp: str) -> tuple[str, bool]:
    """``raw`` with its ``timestamp`` value replaced by ``stamp``; (text, found)."""
    parts = raw.split("&") if raw else []
    found = False
    for i, part in enumerate(parts):
        if part.startswith("timestamp="):
            parts[i] = f"timestamp={stamp}"
            found = True
    return "&".join(parts), found


class SigningProxy:
    """The proxy's logic (``handle``) and its threads (``start``/``stop``). See the module docstring."""

    def __init__(
        self,
        signer: Any,
        client_key: ClientKey,
        settings: ProxySettings,
        upstreams: Mapping[str, Upstream],
        policy: SigningPolicy,
        audit: AuditSink,
        *,
        profile: str,
        root_pid: int,
        allow_root: bool = False,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.signer = signer
        self.client_key = client_key
        self.settings = settings
        self.upstreams = dict(upstreams)
        self.policy = policy
        self.audit = audit
        self.profile = profile
        self.root_pid = root_pid
        self.allow_root = allow_root
        self._say = say
        self._api_key = str(signer.api_key)
        self._httpd: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._audit_failed: BrokerError | None = None
        # Request threads queue their records here (deque.append is atomic): they never wait for the
        # audit log's lock, which its group commit holds across an fsync. The flusher thread writes them.
        self._queue: deque[tuple[str, dict[str, Any]]] = deque()
        self._drain_lock = threading.Lock()
        self._last_sync: dict[str, float] = {}
        self._sync_lock = threading.Lock()
        self.forwarded = 0
        self.refused = 0

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The base URL the bot's client points at."""
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> str:
        """Listen on 127.0.0.1 (a free port), serve in threads; returns the base URL."""
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.proxy = self
        serve = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                 name="credbroker-proxy", daemon=True)
        flusher = threading.Thread(target=self._flush_loop, name="credbroker-proxy-audit", daemon=True)
        self._threads = [serve, flusher]
        for t in self._threads:
            t.start()
        return self.url

    def stop(self) -> None:
        """Stop serving, commit the last audit records, close the pools, forget the keys. Idempotent."""
        httpd, self._httpd = self._httpd, None
        self._stop.set()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        for t in self._threads:
            t.join(timeout=5.0)
        self._threads = []
        try:
            self.drain()
        except BrokerError:
            pass  # reported by the run's own records; nothing more can be done here
        for upstream in self.upstreams.values():
            upstream.close()
        close = getattr(self.signer, "close", None)
        if close is not None:
            close()
        self.client_key.wipe()

    def _flush_loop(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            try:
                self.drain()
            except BrokerError as exc:
                self._audit_failed = exc

    def drain(self) -> None:
        """Write every queued record and commit them (one fsync). Raises the log's BrokerError."""
        with self._drain_lock:
            queue = self._queue
            while queue:
                event, fields = queue.popleft()
                self.audit.record(event, fields, durable=False)
            self.audit.flush()

    # -- peers ------------------------------------------------------------------------------
    def check_peer(self, client: tuple[str, int], server: tuple[str, int]) -> tuple[int | None, str | None]:
        """(pid, None) for a connection from the bot's tree, else (None, reason) (recorded)."""
        pid, reason = peer_in_tree(client, server, self.root_pid, allow_root=self.allow_root)
        if reason is not None:
            self.refused += 1
            self._record(PROXY_REFUSED, {"profile": self.profile, "reason": reason, "rule": "peer",
                                         "client_port": client[1]})
        return pid, reason

    # -- requests ---------------------------------------------------------------------------
    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes, pid: int | None
               ) -> Answer:
        """Check, re-sign and forward one request; the answer to give the bot."""
        if self._audit_failed is not None:
            return _json_answer(500, -1000, f"credbroker proxy: the audit log cannot be written "
                                            f"({self._audit_failed.message}); nothing is forwarded")
        path, _, query = target.partition("?")
        summary: dict[str, Any] = {"endpoint": path[:200], "method": method}
        refusal = self._check_target(method, path, headers)
        if refusal is not None:
            return self._refuse(refusal, pid, summary)
        upstream = self.upstreams[self.settings.upstream_for(path) or ""]
        try:
            body_text = body.decode("utf-8")
        except UnicodeDecodeError:
            return self._refuse(Refusal(400, -1100, "the request body is not UTF-8 text", "malformed"), pid, summary)
        q_rest, q_sig, q_count = _strip_signature(query)
        b_rest, b_sig, b_count = _strip_signature(body_text)
        signed = q_count + b_count > 0
        out_query, out_body = query, body_text
        if signed:
            ctype = headers.get("Content-Type", "")
            if body_text and ctype and not ctype.lower().startswith("application/x-www-form-urlencoded"):
                # Binance reads a form body only; a body it ignores must not be what the policy approved.
                return self._refuse(Refusal(400, -1000, "a signed request's body must be "
                                                        "application/x-www-form-urlencoded", "content_type"),
                                    pid, summary)
            if q_count + b_count > 1:
                return self._refuse(Refusal(400, -1101, "more than one signature parameter", "malformed"),
                                    pid, summary)
            try:
                req = SignRequest.from_parts(q_rest, b_rest, path, method)
            except PolicyRefused as exc:
                return self._policy_refused(exc, pid, summary)
            summary = req.summary()
            refusal = self._check_client_signature(q_rest, b_rest, req, q_sig or b_sig or "")
            if refusal is not None:
                return self._refuse(refusal, pid, summary)
            try:
                self.policy.check(req)
            except PolicyRefused as exc:
                return self._policy_refused(exc, pid, summary)
            try:
                out_query, out_body = self._resign(q_rest, b_rest, upstream)
            except BrokerError as exc:
                return self._refuse(Refusal(500, -1000, f"signing failed: {exc.message}", "signing"), pid, summary)
        record = {"profile": self.profile, "pid": pid, "signed": signed, "upstream": upstream.name, **summary}
        if not self._record(PROXY_REQUEST, record):
            return _json_answer(500, -1000, "credbroker proxy: the audit log cannot be written; nothing is forwarded")
        out_headers = {k: v for k in _FORWARDED_HEADERS if (v := headers.get(k)) is not None}
        if headers.get(binance.API_KEY_HEADER) is not None:
            out_headers[binance.API_KEY_HEADER] = self._api_key
        target_out = path + (f"?{out_query}" if out_query else "")
        payload = out_body.encode("utf-8") if out_body else None
        if payload is not None:
            out_headers["Content-Length"] = str(len(payload))
        try:
            answer = upstream.request(method, target_out, payload, out_headers)
        except UpstreamError as exc:
            self._record(PROXY_ANSWER, {"profile": self.profile, "pid": pid, "endpoint": path[:200],
                                        "method": method, "status": 502, "error": exc.message})
            return _json_answer(502, -1000, f"credbroker proxy: {exc.message}")
        self.forwarded += 1
        if answer.status >= 400:
            self._after_error(answer, upstream, path, method, pid)
        return answer

    def _check_target(self, method: str, path: str, headers: Mapping[str, str]) -> Refusal | None:
        if method not in ("GET", "POST", "PUT", "DELETE"):
            return Refusal(405, -1000, f"method {method[:16]} is not served", "method")
        if not _CANONICAL.match(path):
            return Refusal(400, -1000, "the path is not in canonical form (no //, dot segments or escapes)", "path")
        if self.settings.upstream_for(path) is None:
            return Refusal(404, -1000, f"{path[:80]} is not a Binance REST path the proxy serves "
                                       "(/api/, /sapi/, /fapi/)", "path")
        # The exchange may read paths without regard to case: so does the endpoint denial.
        lowered = path.lower()
        for pattern in self.policy.deny_endpoints:
            if fnmatchcase(lowered, pattern.lower()):
                rule = next((f"deny_kinds:{kind}" for kind in self.policy.deny_kinds if pattern in KINDS[kind][0]),
                            "deny_endpoints")
                return Refusal(403, -1002, f"credbroker proxy: {path[:80]} is a denied endpoint", rule)
        key = headers.get(binance.API_KEY_HEADER)
        if key is not None and not hmac.compare_digest(key.encode("utf-8", "replace"), self._api_key.encode()):
            return Refusal(401, -2015, "the X-MBX-APIKEY header is not this profile's API key", "api_key")
        return None

    def _check_client_signature(self, query: str, body: str, req: SignRequest, signature: str) -> Refusal | None:
        # Exactly as sent first (Binance's rule); then the decoded parameters joined plainly, which is
        # what clients that sign unencoded values but send them encoded (python-binance) signed. Both
        # forms name the same parameters, the ones the policy checks and the exchange receives.
        if not self.client_key.verify((query + body).encode("utf-8"), signature):
            plain = "&".join(f"{k}={v}" for k, v in req.params)
            if not self.client_key.verify(plain.encode("utf-8"), signature):
                return Refusal(400, -1022, "Signature for this request is not valid. (credbroker proxy: sign "
                                           "with the proxy secret credbroker gave the bot)", "client_signature")
        values = dict(req.params)
        try:
            window = int(values.get("recvWindow", binance.DEFAULT_RECV_WINDOW))
            stamp = int(values["timestamp"])
        except KeyError:
            return Refusal(400, -1102, "Mandatory parameter 'timestamp' was not sent, was empty/null, or "
                                       "malformed.", "timestamp")
        except ValueError:
            return Refusal(400, -1100, "timestamp or recvWindow is not a whole number", "timestamp")
        if window > binance.MAX_RECV_WINDOW or window <= 0:
            return Refusal(400, -1131, "recvWindow must be less than 60000.", "recv_window")
        # The bot's clock is this host's; a client that corrected itself with the exchange's
        # time (through us) is judged against the exchange's clock.
        nows = [int(time.time() * 1000)] + [u.now_ms() for u in self.upstreams.values()]
        if not any(stamp < now + 1000 and now - stamp <= window for now in nows):
            return Refusal(400, -1021, "Timestamp for this request is outside of the recvWindow.", "timestamp")
        return None

    def _resign(self, query: str, body: str, upstream: Upstream) -> tuple[str, str]:
        stamp = str(upstream.now_ms())
        query, in_query = _restamp(query, stamp)
        body, in_body = _restamp(body, stamp)
        total = binance.total_params(query, body)
        signature = binance.quote_signature(self.signer.sign(total))
        # Binance reads the signature from the query or the body; last, after every signed parameter.
        if body:
            return query, f"{body}&signature={signature}"
        return (f"{query}&signature={signature}" if query else f"signature={signature}"), body

    def _after_error(self, answer: Answer, upstream: Upstream, path: str, method: str, pid: int | None) -> None:
        code, _msg = binance.parse_error(answer.body)
        self._record(PROXY_ANSWER, {"profile": self.profile, "pid": pid, "endpoint": path[:200], "method": method,
                                    "status": answer.status, "code": code})
        failure = classify(answer.status, answer.body, upstream.base_url + path, method=method,
                           profile=self.profile, api_key=self._api_key)
        if failure is not None:
            self._record(SIGNATURE_FAILURE, {**failure.to_dict(), "by": "proxy", "pid": pid})
        if code == -1021:
            self._resync(upstream)

    def _resync(self, upstream: Upstream) -> None:
        with self._sync_lock:
            now = time.monotonic()
            if now - self._last_sync.get(upstream.name, -_RESYNC_AFTER) < _RESYNC_AFTER:
                return
            self._last_sync[upstream.name] = now
        try:
            offset = upstream.sync_clock()
        except UpstreamError as exc:
            self._record(PROXY_ANSWER, {"profile": self.profile, "endpoint": upstream.time_path, "method": "GET",
                                        "status": 502, "error": exc.message})
            return
        self._record(Event.PROXY_CLOCK_SYNCED, {"profile": self.profile, "upstream": upstream.name,
                                                "offset_ms": offset, "reason": "-1021"})

    # -- refusals and records ------------------------------------------------------------------
    def _refuse(self, refusal: Refusal, pid: int | None, summary: Mapping[str, Any]) -> Answer:
        self.refused += 1
        self._record(PROXY_REFUSED, {"profile": self.profile, "pid": pid, "rule": refusal.rule,
                                     "reason": refusal.message, **summary})
        return _json_answer(refusal.status, refusal.code, refusal.message)

    def _policy_refused(self, exc: PolicyRefused, pid: int | None, summary: Mapping[str, Any]) -> Answer:
        self.refused += 1
        self._record(POLICY_REFUSED, {"profile": self.profile, "pid": pid, "rule": exc.rule, "reason": exc.message,
                                      "by": "proxy", **summary})
        return _json_answer(403, -1002, f"credbroker proxy: {exc.message}")

    def _record(self, event: str, fields: dict[str, Any]) -> bool:
        if self._audit_failed is not None:
            return False
        self._queue.append((event, fields))
        return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: SigningProxy


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; every request goes to ``SigningProxy.handle``."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK hold the body back ~40 ms on every kept-alive request.
    disable_nagle_algorithm = True
    server: _Server
    _peer: tuple[int | None, str | None] | None = None

    def _serve(self) -> None:
        proxy = self.server.proxy
        if self._peer is None:  # once per connection
            client = (str(self.client_address[0]), int(self.client_address[1]))
            self._peer = proxy.check_peer(client, ("127.0.0.1", int(self.server.server_address[1])))
        pid, reason = self._peer
        if reason is not None:
            self.close_connection = True
            self._send(_json_answer(403, -1002, f"credbroker proxy: this process may not use the proxy: {reason}; "
                                                "only the bot `credbroker run --proxy` started (and its children) "
                                                "may"))
            return
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._send(_json_answer(411, -1000, "credbroker proxy: send the body with a Content-Length"))
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            self._send(_json_answer(400, -1000, "credbroker proxy: bad Content-Length"))
            return
        body = self.rfile.read(length) if length else b""
        # Header names are case-insensitive: normalise the ones the proxy reads.
        lookup = {k.lower(): v for k, v in self.headers.items()}
        wanted = {name: lookup[name.lower()] for name in (*_FORWARDED_HEADERS, binance.API_KEY_HEADER)
                  if name.lower() in lookup}
        self._send(proxy.handle(self.command, self.path, wanted, body, pid))

    def _send(self, answer: Answer) -> None:
        self.send_response_only(answer.status)
        for name, value in answer.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(answer.body)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # the audit log is the record, not stderr
        pass
