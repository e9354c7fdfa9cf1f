"""listenKey upkeep for Binance USDⓈ-M futures user data streams.

Binance's futures docs ("User Data Streams", "Start / Keepalive / Close User
Data Stream"):

- ``POST /fapi/v1/listenKey`` starts a stream and answers ``{"listenKey": ...}``;
  only the ``X-MBX-APIKEY`` header, no signature (USER_STREAM security). If the
  account already has an active listenKey, that one is returned and extended.
- A listenKey is valid for 60 minutes after creation or its last keepalive;
  ``PUT /fapi/v1/listenKey`` (no parameters) extends it by 60 minutes, and
  Binance recommends sending it about every 60 minutes.
- ``-1125`` "This listenKey does not exist." means it expired or was closed:
  a new one must be created (and the bot must reconnect its stream with it).
- On the stream itself the bot may receive ``{"e": "listenKeyExpired"}`` or an
  error such as ``{"e": "error", "m": "Invalid listenKey"}``.

``ListenKeyKeeper`` creates the key, keeps it alive on a daemon thread every
``interval`` seconds (30 minutes by default, well inside the 60; each wait is
shortened by up to ``jitter`` of it at random so bots started together do not
call at the same instant), recreates it on -1125, and records each step in the
audit log: ``listen_key_created``, ``listen_key_kept_alive``,
``listen_key_recreated``, ``listen_key_failed``. A bot reports a stream error
with ``keeper.report_stream_event(message)``: it is recorded (the weekly
review shows it beside signature failures: a listenKey that another process
closed or replaced can mean someone else holds the API key) and the key is
recreated. The listenKey itself is a bearer token for the account's private
stream: it is recorded masked to its last 4 characters, never whole.

::

    signer = get_signer()
    with signer.listen_key_keeper("https://fapi.binance.com") as keeper:
        ws = connect(f"wss://fstream.binance.com/ws/{keeper.listen_key}")
        for message in ws:
            if keeper.report_stream_event(message):   # an error or expiry: reconnect
                ws = connect(f"wss://fstream.binance.com/ws/{keeper.listen_key}")

Time is injectable (``wait``, ``rand``) so tests drive the loop without
sleeping; the HTTP calls go through ``transport`` (the standard library's
``http.client`` by default; the signing proxy passes its own pool).
"""

from __future__ import annotations

import json
import random
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from .. import units
from ..errors import BrokerError, ConfigError, ListenKeyError
from ..events import Recorder
from ..secret import mask_id
from . import binance
from .failures import clean_message

PATH = "/fapi/v1/listenKey"
#: Binance: a listenKey lives 60 minutes after its creation or last keepalive.
VALIDITY = 3600.0
DEFAULT_INTERVAL = 1800.0
#: The longest interval accepted: a keepalive must land well inside the 60 minutes.
MAX_INTERVAL = 3000.0
DEFAULT_JITTER = 0.1
#: After a failed call, retry after this long, doubling up to RETRY_MAX (never past the interval).
RETRY_FIRST = 60.0
RETRY_MAX = 300.0
NOT_FOUND = -1125

CREATED = "listen_key_created"
KEPT_ALIVE = "listen_key_kept_alive"
RECREATED = "listen_key_recreated"
FAILED = "listen_key_failed"
EVENTS = (CREATED, KEPT_ALIVE, RECREATED, FAILED)

_LOOPBACK = {"127.0.0.1", "::1", "localhost"}

#: transport(method, path, headers) -> (HTTP status, body bytes); OSError when the exchange is unreachable.
Transport = Callable[[str, str, Mapping[str, str]], tuple[int, bytes]]


def check_base_url(url: str) -> str:
    """The base URL without a trailing slash; https anywhere, http only to a loopback host (ConfigError)."""
    parts = units.split_url(url)
    if parts is None or parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"listenKey base URL {url[:80]!r} is not an http(s) URL", "e.g. https://fapi.binance.com")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        raise ConfigError(f"listenKey base URL {url[:80]!r} would send the API key unencrypted",
                          "use https (plain http is accepted for a loopback test server only)")
    if parts.query or parts.fragment or parts.path.strip("/"):
        raise ConfigError(f"listenKey base URL {url[:80]!r} has a path, query or fragment",
                          "give the base URL only, e.g. https://fapi.binance.com")
    return url.rstrip("/")


def http_transport(base_url: str, *, timeout: float = 10.0) -> Transport:
    """A transport over the standard library (one connection per call: one call every 30 minutes)."""
    import http.client
    import ssl

    parts = urlsplit(check_base_url(base_url))
    host, port = parts.hostname or "", parts.port

    def send(method: str, path: str, headers: Mapping[str, str]) -> tuple[int, bytes]:
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request(method, path, headers={**headers, "Content-Length": "0"})
            response = conn.getresponse()
            return response.status, response.read(1 << 16)
        except http.client.HTTPException as exc:
            raise OSError(type(exc).__name__) from None
        finally:
            conn.close()

    return send


def _why(exc: OSError) -> str:
    import socket

    if isinstance(exc, socket.gaierror):
        return "name not resolved"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.strerror or (str(exc.args[0]) if exc.args else type(exc).__name__)


class ListenKeyKeeper:
    """Creates the futures listenKey, keeps it alive on a daemon thread, recreates it when it is gone."""

    def __init__(
        self,
        api_key: Any,
        base_url: str,
        *,
        interval: float = DEFAULT_INTERVAL,
        jitter: float = DEFAULT_JITTER,
        record: Recorder | None = None,
        profile: str | None = None,
        transport: Transport | None = None,
        wait: Callable[[float], bool] | None = None,
        rand: Callable[[], float] = random.random,
        on_new_key: Callable[[str], Any] | None = None,
        listen_key: str | None = None,
        by: str = "keeper",
    ) -> None:
        """``api_key``: a Signer (its ``api_key`` is read at each call, so a rotated key is followed) or the
        key itself. ``record(event, fields)`` writes the audit log (a Signer's own log by default).
        ``wait(seconds) -> stop?`` replaces the stop event's wait in tests. ``listen_key``: adopt a key the
        bot already created (the signing proxy does) instead of creating one at ``start()``."""
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 < interval <= MAX_INTERVAL:
            raise ConfigError(f"listenKey keepalive interval must be more than 0 and at most {MAX_INTERVAL:.0f} "
                              f"seconds, got {interval!r}", "Binance's listenKey lives 60 minutes: 1800 is usual")
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter < 1:
            raise ConfigError(f"listenKey jitter must be from 0 to below 1, got {jitter!r}", "e.g. 0.1")
        self.base_url = check_base_url(base_url)
        self.interval = float(interval)
        self.jitter = float(jitter)
        self.profile = profile if profile is not None else getattr(api_key, "profile", None)
        self.by = by
        self._key_source = api_key
        self._record_to = record if record is not None else _default_recorder(api_key)
        self._send = transport if transport is not None else http_transport(self.base_url)
        self._stop = threading.Event()
        self._wait = wait if wait is not None else self._stop.wait
        self._rand = rand
        self._on_new_key = on_new_key
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._listen_key: str | None = listen_key
        self.failures = 0  # consecutive failed calls (the retry delay doubles with it)
        self.keepalives = 0

    # -- state ------------------------------------------------------------------------------
    @property
    def listen_key(self) -> str:
        """The current listenKey (the stream's path: ``wss://fstream.binance.com/ws/<listenKey>``).

        Read without the lock: the lock serialises the exchange calls, and a bot reconnecting its stream must
        not wait behind a keepalive in flight (up to the transport's timeout). One attribute read is atomic."""
        key = self._listen_key
        if key is None:
            raise ListenKeyError("there is no listenKey yet", "call keeper.start() first")
        return key

    def __repr__(self) -> str:
        key = mask_id(self._listen_key) if self._listen_key else None
        return f"ListenKeyKeeper(base_url={self.base_url!r}, profile={self.profile!r}, listen_key={key!r})"

    def _api_key(self) -> str:
        key = getattr(self._key_source, "api_key", self._key_source)
        return str(key)

    # -- the exchange calls ---------------------------------------------------------------------
    def _call(self, method: str) -> tuple[int, Any]:
        status, body = self._send(method, PATH, {binance.API_KEY_HEADER: self._api_key(),
                                                 "Accept": "application/json",
                                                 "User-Agent": "credbroker-listenkey"})
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            data = None
        return status, data

    def _fields(self, **extra: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {"profile": self.profile, "endpoint": self.base_url + PATH, "by": self.by}
        try:
            fields["api_key"] = mask_id(self._api_key())
        except BrokerError:
            pass
        if self._listen_key:
            fields["listen_key"] = mask_id(self._listen_key)
        fields.update(extra)
        return fields

    def _record(self, event: str, fields: dict[str, Any]) -> None:
        try:
            self._record_to(event, fields)
        except BrokerError as exc:  # the keeper keeps the bot's stream alive even when the log fails
            print(f"credbroker: could not record {event} in the audit log: {exc.message}", file=sys.stderr,
                  flush=True)

    def _failed(self, action: str, status: int | None, data: Any, *, source: str = "exchange",
                error: str | None = None) -> ListenKeyError:
        code, msg = binance.parse_error(data)
        reason = error or clean_message(msg) or (f"HTTP {status}" if status else "no answer")
        self.failures += 1
        self._record(FAILED, self._fields(action=action, status=status, code=code, message=reason, source=source))
        detail = f"{code} {reason}" if code is not None else reason
        return ListenKeyError(f"listenKey {action} failed: {detail}",
                              "check the network, the API key's futures permission and the base URL")

    def _create(self, event: str, **extra: Any) -> str:
        """POST: a new listenKey (or the account's active one, extended). Records ``event``."""
        try:
            status, data = self._call("POST")
        except OSError as exc:
            raise self._failed("create", None, None, error=_why(exc)) from None
        key = data.get("listenKey") if isinstance(data, dict) else None
        if status != 200 or not isinstance(key, str) or not key:
            raise self._failed("create", status, data)
        with self._lock:
            previous, self._listen_key = self._listen_key, key
        self.failures = 0
        self._record(event, self._fields(**({"previous": mask_id(previous)} if previous and previous != key else {}),
                                         **extra))
        if self._on_new_key is not None and key != previous:
            self._on_new_key(key)
        return key

    def adopt(self, key: str, *, by: str) -> None:
        """Take over a listenKey someone else created (the bot, through the signing proxy): recorded as
        ``listen_key_created`` with ``by``; nothing when it is the key already kept."""
        with self._lock:
            if key == self._listen_key:
                return
            previous, self._listen_key = self._listen_key, key
            self.failures = 0
            self._record(CREATED, self._fields(by=by, **({"previous": mask_id(previous)} if previous else {})))

    def create(self) -> str:
        """Create the listenKey now (``listen_key_created``); returns it. Raises ListenKeyError."""
        with self._lock:
            return self._create(CREATED)

    def recreate(self, reason: str) -> str:
        """Create a new listenKey because the old one is gone (``listen_key_recreated`` with ``reason``)."""
        with self._lock:
            return self._create(RECREATED, reason=clean_message(reason))

    def keepalive(self) -> str:
        """One PUT; on -1125 the key is recreated. Returns the current listenKey. Raises ListenKeyError."""
        with self._lock:
            if self._listen_key is None:
                return self._create(CREATED)
            try:
                status, data = self._call("PUT")
            except OSError as exc:
                raise self._failed("keepalive", None, None, error=_why(exc)) from None
            code, msg = binance.parse_error(data)
            if status == 200 and code is None:
                self.failures = 0
                self.keepalives += 1
                # Binance's newer answers carry the key; a different one means it was replaced.
                key = data.get("listenKey") if isinstance(data, dict) else None
                if isinstance(key, str) and key and key != self._listen_key:
                    return self._create(RECREATED, reason="the keepalive answered another listenKey")
                self._record(KEPT_ALIVE, self._fields())
                return self._listen_key
            if code == NOT_FOUND:
                self._failed("keepalive", status, data)
                return self._create(RECREATED, reason=f"{NOT_FOUND} {clean_message(msg) or 'listenKey not found'}")
            raise self._failed("keepalive", status, data)

    # -- the stream's own reports -------------------------------------------------------------
    def report_stream_event(self, message: Any) -> str | None:
        """Handle one user-data-stream message; for an error or expiry, record it, recreate the key and return
        the new one (reconnect with it). Any other message: None, nothing recorded.

        ``message``: the decoded JSON object or its text, e.g. ``{"e": "error", "m": "Invalid listenKey"}``
        or ``{"e": "listenKeyExpired", ...}``.
        """
        kind, text = stream_trouble(message)
        if kind is None:
            return None
        with self._lock:
            self._record(FAILED, self._fields(action="stream", source="stream", stream_event=kind, message=text))
            self.failures += 1
            try:
                return self._create(RECREATED, reason=f"stream: {text}")
            except ListenKeyError:
                return None  # recorded; the keeper's loop retries

    # -- the thread ---------------------------------------------------------------------------
    def next_delay(self) -> float:
        """Seconds until the next call: the interval shortened by up to ``jitter`` of it; after failures,
        ``RETRY_FIRST`` doubling up to ``RETRY_MAX`` (never longer than the interval)."""
        if self.failures:
            return min(self.interval, RETRY_FIRST * 2.0 ** min(self.failures - 1, 16), RETRY_MAX)
        return self.interval * (1.0 - self.jitter * self._rand())

    def start(self) -> str:
        """Create the listenKey (unless one was adopted) and start the keepalive thread; returns the key."""
        with self._lock:
            key = self._listen_key if self._listen_key is not None else self._create(CREATED)
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._loop, name="credbroker-listenkey", daemon=True)
                self._thread.start()
            return key

    def _loop(self) -> None:
        while not self._wait(self.next_delay()):
            if self._stop.is_set():
                break
            try:
                self.keepalive()
            except ListenKeyError:
                pass  # recorded as listen_key_failed; retried sooner

    def stop(self, *, timeout: float = 5.0) -> None:
        """Stop the keepalive thread (the listenKey is left to expire; the bot may still read it). Idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> ListenKeyKeeper:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stream_trouble(message: Any) -> tuple[str | None, str]:
    """(kind, message) for a user-data-stream message that means the listenKey is gone, else (None, "").

    ``{"e": "error", "m": "..."}`` -> ("error", m); ``{"e": "listenKeyExpired"}`` -> ("listenKeyExpired", ...).
    """
    data = message
    if isinstance(message, (bytes, bytearray, str)):
        try:
            data = json.loads(message)
        except ValueError:
            return None, ""
    if not isinstance(data, Mapping):
        return None, ""
    kind = data.get("e")
    if kind == "error":
        return "error", clean_message(str(data.get("m") or data.get("msg") or "stream error"))
    if kind == "listenKeyExpired":
        return "listenKeyExpired", "listenKey expired"
    return None, ""


def _default_recorder(source: Any) -> Recorder:
    """The signer's own audit log (``Signer.audit_recorder``), else the default one (the relay inside `run`)."""
    recorder = getattr(source, "audit_recorder", None)
    if recorder is not None:
        made: Recorder = recorder()
        return made

    def record(event: str, fields: dict[str, Any]) -> None:
        from .audit_bridge import record_event

        record_event(event, fields)

    return record


def report_stream_error(message: Any, *, profile: str | None = None, api_key: str | None = None,
                        record: Recorder | None = None, audit_config: Mapping[str, Any] | None = None) -> bool:
    """Record a stream error or expiry reported by a bot that keeps its listenKey itself
    (``listen_key_failed``, source ``stream``); True when ``message`` was one."""
    kind, text = stream_trouble(message)
    if kind is None:
        return False
    fields: dict[str, Any] = {"profile": profile, "action": "stream", "source": "stream", "stream_event": kind,
                              "message": text, "by": "bot"}
    if api_key:
        fields["api_key"] = mask_id(api_key)
    if record is not None:
        record(FAILED, fields)
    else:
        from .audit_bridge import record_event

        record_event(FAILED, fields, audit_config=audit_config)
    return True
