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
4. the upstream's request weight and order rate have room for it
   (``weight.Limiter``: else Binance's own 429, answered here);
5. the request goes to the exchange over a kept-alive connection; its answer
   comes back unchanged (status, headers but hop-by-hop ones, body bytes), and
   its weight headers (and an exchangeInfo's ``rateLimits``) feed the limiter.

Audit: ``proxy_request`` before a request leaves (method, endpoint, parameter
names, the order's public fields), ``proxy_answer`` for an answer that is not
2xx, ``signature_failure`` (with Binance's code) for key trouble,
``policy_refused`` / ``proxy_refused`` for refusals (peer refusals counted: one
record per reason per 10 s window, with its ``count``). Records are queued in
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
from fnmatch import fnmatchcase, translate
from typing import Any, NamedTuple, cast

from ..agent.peer import RefusalTally
from ..agent.server import AuditSink
from ..errors import BrokerError, PolicyRefused
from ..signing import binance
from ..signing.failures import classify
from ..signing_policy import KINDS, SigningPolicy, SignRequest
from .clientkey import ClientKey
from .listenkeys import STREAM_EVENT_PATH, ProxyListenKeys
from ..signing.listenkey import PATH as LISTEN_KEY_PATH
from .http11 import Request
from .loop import Forward, LoopServer
from .peer import peer_in_tree
from .settings import ProxySettings
from ..errors import UpstreamError
from .upstream import Answer, Upstream
from .weight import Limiter, Ticket, Verdict, cost
from ..events import Event

FLUSH_INTERVAL = 0.2  # seconds: the longest a queued audit record waits for its fsync
#: A path the exchange reads the same way we do: no "//", no dot segments, no percent-escapes.
_CANONICAL = re.compile(r"^(/[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*)+/?\Z")
#: Request headers passed on to the exchange; every other one stays here.
_FORWARDED_HEADERS = ("Content-Type", "Accept", "Accept-Encoding", "User-Agent")
_WANTED = tuple((name, name.lower()) for name in (*_FORWARDED_HEADERS, binance.API_KEY_HEADER))
_SIGNER_GRACE = 60.0  # seconds a replaced signer stays open: longer than any upstream request's timeout
_RESYNC_AFTER = 1.0  # seconds between two clock syncs triggered by -1021
#: Signers whose key is in this process: signing never waits (the event loop may call them).
_LOCAL_KINDS = frozenset({"hmac", "ed25519", "rsa"})

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


def _json_answer(status: int, code: int, message: str, extra: tuple[tuple[str, str], ...] = ()) -> Answer:
    body = json.dumps({"code": code, "msg": message}).encode()
    return Answer(status, [("Content-Type", "application/json;charset=UTF-8"), *extra], body)


def _is_param(part: str, name: str) -> bool:
    """Is ``part`` (NAME=VALUE as sent) the parameter ``name``, as the exchange reads names: percent-
    decoded, so that ``%73ignature=`` is a signature here too and never goes on unnoticed."""
    if part.startswith(name + "="):
        return True
    raw_name = part.partition("=")[0]
    if "%" not in raw_name and "+" not in raw_name:
        return False
    from urllib.parse import unquote_plus

    return unquote_plus(raw_name) == name


def _strip_signature(raw: str) -> tuple[str, str | None, int]:
    """(raw without its signature items, the last signature, how many there were), other bytes as sent."""
    kept: list[str] = []
    signature: str | None = None
    count = 0
    for part in raw.split("&") if raw else []:
        if _is_param(part, "signature"):
            from urllib.parse import unquote

            signature = unquote(part.partition("=")[2])
            count += 1
        else:
            kept.append(part)
    return "&".join(kept), signature, count


def _restamp(raw: str, stamp: str) -> tuple[str, bool]:
    """``raw`` with its ``timestamp`` value replaced by ``stamp``; (text, found)."""
    parts = raw.split("&") if raw else []
    found = False
    for i, part in enumerate(parts):
        if _is_param(part, "timestamp"):
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
        self._api_key = str(signer.api_key)  # the real key's API key, sent to the exchange
        self._bot_api_key = self._api_key  # the one the bot was given (a rotation may change the real one)
        self._old_signers: list[tuple[float, Any]] = []  # (monotonic time replaced, signer)
        #: Called with the new signer at every swap (the WebSocket API endpoint follows the REST proxy's key).
        self.signer_followers: list[Callable[[Any], None]] = []
        self._httpd: LoopServer | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._audit_failed: BrokerError | None = None
        # Request threads queue their records here (deque.append is atomic): they never wait for the
        # audit log's lock, which its group commit holds across an fsync. The flusher thread writes them.
        self._queue: deque[tuple[str, dict[str, Any]]] = deque()
        self._drain_lock = threading.Lock()
        self._refusals = RefusalTally()
        self._refusals_lock = threading.Lock()
        self._last_sync: dict[str, float] = {}
        self._sync_lock = threading.Lock()
        self.forwarded = 0
        self.refused = 0
        # The bot's futures listenKey, kept alive by the proxy (listenkeys.py).
        self.listen_keys = ProxyListenKeys(self._api_key, profile, self._record)
        #: Request weight and order rate per upstream (``weight``); the profile's limits win.
        self.limiters = {name: Limiter(name, fixed=settings.rate_limits.get(name)) for name in self.upstreams}
        patterns = [translate(p.lower()) for p in policy.deny_endpoints]
        self._deny = re.compile("|".join(f"(?:{p})" for p in patterns) if patterns else "(?!)")

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The base URL the bot's client points at."""
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.port}"

    def start(self) -> str:
        """Listen on 127.0.0.1 (a free port), serve in an event loop; returns the base URL."""
        self._httpd = LoopServer(self.check_peer, self._step_http, self._serve_http,
                                 refused=lambda peer: peer[1] is not None)
        self._httpd.start()
        flusher = threading.Thread(target=self._flush_loop, name="credbroker-proxy-audit", daemon=True)
        self._threads = [flusher]
        flusher.start()
        return self.url

    def stop(self) -> None:
        """Stop serving, commit the last audit records, close the pools, forget the keys. Idempotent."""
        httpd, self._httpd = self._httpd, None
        self._stop.set()
        self.listen_keys.stop()
        if httpd is not None:
            httpd.stop()
        for t in self._threads:
            t.join(timeout=5.0)
        self._threads = []
        try:
            self.drain()
        except BrokerError:
            pass  # reported by the run's own records; nothing more can be done here
        for upstream in self.upstreams.values():
            upstream.close()
        for signer in (*(old for _, old in self._old_signers), self.signer):
            close = getattr(signer, "close", None)
            if close is not None:
                close()
        self._old_signers = []
        self.client_key.wipe()

    def swap_signer(self, signer: Any) -> None:
        """Sign with ``signer`` from now on (a rotated key). The one it replaces may still be signing a
        request in flight: it is closed at a later swap once no request can still use it (longer ago
        than an upstream timeout), or at ``stop``."""
        old, self.signer = self.signer, signer
        self._api_key = str(signer.api_key)
        for follow in self.signer_followers:  # the WebSocket API endpoint signs with the same key
            follow(signer)
        now = time.monotonic()
        keep = []
        for since, previous in self._old_signers:
            if now - since < _SIGNER_GRACE:
                keep.append((since, previous))
            elif (close := getattr(previous, "close", None)) is not None:
                close()
        self._old_signers = [*keep, (now, old)]

    def _flush_loop(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            try:
                self.drain(refusals=False)
            except BrokerError as exc:
                self._audit_failed = exc

    def drain(self, *, refusals: bool = True) -> None:
        """Write every queued record and commit them (one fsync); ``refusals``: the peer refusals counted
        so far too, before their window ends. Raises the log's BrokerError."""
        self._queue_refusals(now=refusals)
        with self._drain_lock:
            queue = self._queue
            while queue:
                event, fields = queue.popleft()
                self.audit.record(event, fields, durable=False)
            self.audit.flush()

    # -- peers ------------------------------------------------------------------------------
    def check_peer(self, client: tuple[str, int], server: tuple[str, int]) -> tuple[int | None, str | None]:
        """(pid, None) for a connection from the bot's tree, else (None, reason) (counted: one
        ``proxy_refused`` record per reason per window, as the agent records its refusals, so a flood of
        connections from outside the tree writes a few records, not one each)."""
        pid, reason = peer_in_tree(client, server, self.root_pid, allow_root=self.allow_root)
        if reason is not None:
            with self._refusals_lock:
                self.refused += 1
                self._refusals.add(None, None, reason, time.monotonic())
        return pid, reason

    def _queue_refusals(self, *, now: bool) -> None:
        """The window's peer refusals as records (``now``: whether or not the window is over)."""
        with self._refusals_lock:
            at = time.monotonic()
            if not (now or self._refusals.due(at)) or self._refusals.started is None:
                return
            records = self._refusals.drain(self.profile, at)
        for fields in records:
            self._record(PROXY_REFUSED, {**fields, "rule": "peer"})

    # -- requests ---------------------------------------------------------------------------
    def _serve_http(self, peer: object, request: Request) -> tuple[Answer, bool]:
        """One request, the blocking way (on a worker thread): (answer, close the connection after it)."""
        step = self._step_http(peer, request, blocking=True)
        assert step is not None and not isinstance(step, Forward)
        return step

    def _step_http(self, peer: object, request: Request, *, blocking: bool = False
                   ) -> tuple[Answer, bool] | Forward | None:
        """One request from the event loop: (answer, close after it), where to forward it, or None when
        it must be served on a worker thread (``blocking``: it is on one)."""
        pid, reason = cast("tuple[int | None, str | None]", peer)  # what check_peer returned for this connection
        if reason is not None:
            return _json_answer(403, -1002, f"credbroker proxy: this process may not use the proxy: {reason}; "
                                            "only the bot `credbroker run --proxy` started (and its children) "
                                            "may"), True
        # Header names are case-insensitive: the loop lower-cased them; handle() reads these names.
        lookup = request.headers
        wanted = {name: lookup[low] for name, low in _WANTED if low in lookup}
        if blocking:
            return self.handle(request.method, request.target, wanted, request.body, pid), False
        step = self.prepare(request.method, request.target, wanted, request.body, pid)
        return step if step is None or isinstance(step, Forward) else (step, False)

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes, pid: int | None
               ) -> Answer:
        """Check, re-sign and forward one request; the answer to give the bot (blocking)."""
        step = self.prepare(method, target, headers, body, pid, blocking=True)
        if not isinstance(step, Forward):
            assert step is not None
            return step
        try:
            answer: Answer | UpstreamError = step.upstream.request_raw(step.method, step.data)
        except UpstreamError as exc:
            answer = exc
        return step.done(answer)

    def prepare(self, method: str, target: str, headers: Mapping[str, str], body: bytes, pid: int | None,
                *, blocking: bool = False) -> Answer | Forward | None:
        """Check and re-sign one request: the answer (a refusal), or the request to send on and what
        turns the exchange's answer into the bot's. None (only when not ``blocking``): this request
        needs calls that block (Vault's transit engine signs; the listenKey keeper), so ask again on a
        worker thread with ``blocking=True``."""
        if self._audit_failed is not None:
            return _json_answer(500, -1000, f"credbroker proxy: the audit log cannot be written "
                                            f"({self._audit_failed.message}); nothing is forwarded")
        path, _, query = target.partition("?")
        if path == STREAM_EVENT_PATH:  # the bot reports a user-data-stream error (listenkeys.py)
            if not blocking:
                return None
            return self.listen_keys.stream_event(method, body)
        signer = self.signer
        if not blocking and getattr(signer, "kind", None) not in _LOCAL_KINDS:
            return None  # the key is elsewhere (Vault): signing waits on the network
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
                out_query, out_body = self._resign(q_rest, b_rest, upstream, signer)
            except BrokerError as exc:
                return self._refuse(Refusal(500, -1000, f"signing failed: {exc.message}", "signing"), pid, summary)
        limiter = self.limiters[upstream.name]
        weight, orders = cost(upstream.name, method, path, out_query, out_body)
        ticket = limiter.acquire(weight, orders, upstream.now_ms())
        if isinstance(ticket, Verdict):
            return self._rate_limited(ticket, pid, summary)
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

        def done(answer: Answer | UpstreamError) -> Answer:
            if isinstance(answer, UpstreamError):
                self._record(PROXY_ANSWER, {"profile": self.profile, "pid": pid, "endpoint": path[:200],
                                            "method": method, "status": 502, "error": answer.message})
                return _json_answer(502, -1000, f"credbroker proxy: {answer.message}")
            self.forwarded += 1
            self._observe(limiter, ticket, answer, path)
            if answer.status >= 400:
                self._after_error(answer, upstream, path, method, pid)
            self.listen_keys.after_answer(method, path, answer, upstream)
            return answer

        def quick(answer: Answer) -> bool:
            # What may block: a -1021 makes the proxy ask the exchange's clock; a listenKey answer starts
            # the keeper; an exchangeInfo is megabytes of JSON to read for its rate limits.
            return answer.status < 400 and path != LISTEN_KEY_PATH and not path.endswith("/exchangeInfo")

        return Forward(upstream, method, upstream.encode_request(method, target_out, payload, out_headers),
                       done, quick)

    def _observe(self, limiter: Limiter, ticket: Ticket, answer: Answer, path: str) -> None:
        """Feed the answer's weight headers (and an exchangeInfo's rateLimits) to the upstream's limiter."""
        limiter.observe(ticket, answer.status, answer.headers)
        if answer.status == 200 and path.endswith("/exchangeInfo") and limiter.learn_exchange_info(answer.body):
            self._record(Event.PROXY_RATE_LIMITS, {"profile": self.profile, "upstream": limiter.upstream,
                                               "limits": limiter.limits(), "from": "exchangeInfo"})

    def _check_target(self, method: str, path: str, headers: Mapping[str, str]) -> Refusal | None:
        if method not in ("GET", "POST", "PUT", "DELETE"):
            return Refusal(405, -1000, f"method {method[:16]} is not served", "method")
        if not _CANONICAL.match(path):
            return Refusal(400, -1000, "the path is not in canonical form (no //, dot segments or escapes)", "path")
        if self.settings.upstream_for(path) is None:
            return Refusal(404, -1000, f"{path[:80]} is not a Binance REST path the proxy serves "
                                       "(/api/, /sapi/, /fapi/)", "path")
        # The exchange may read paths without regard to case: so does the endpoint denial. One regex
        # of every pattern first (the common case: no match); then which pattern, for the record.
        lowered = path.lower()
        if self._deny.match(lowered):
            for pattern in self.policy.deny_endpoints:
                if fnmatchcase(lowered, pattern.lower()):
                    rule = next((f"deny_kinds:{kind}" for kind in self.policy.deny_kinds
                                 if pattern in KINDS[kind][0]), "deny_endpoints")
                    return Refusal(403, -1002, f"credbroker proxy: {path[:80]} is a denied endpoint", rule)
        key = headers.get(binance.API_KEY_HEADER)
        if key is not None and not hmac.compare_digest(key.encode("utf-8", "replace"), self._bot_api_key.encode()):
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

    def _resign(self, query: str, body: str, upstream: Upstream, signer: Any) -> tuple[str, str]:
        stamp = str(upstream.now_ms())
        query, in_query = _restamp(query, stamp)
        body, in_body = _restamp(body, stamp)
        total = binance.total_params(query, body)
        signature = binance.quote_signature(signer.sign(total))
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

    def _rate_limited(self, verdict: Verdict, pid: int | None, summary: Mapping[str, Any]) -> Answer:
        self.refused += 1
        self._record(PROXY_REFUSED, {"profile": self.profile, "pid": pid, "rule": verdict.rule,
                                     "reason": verdict.message, "retry_after": verdict.retry_after, **summary})
        return _json_answer(verdict.status, verdict.code, verdict.message,
                            (("Retry-After", str(verdict.retry_after)),))

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
