"""The Signer interface: one class per signer kind, all built on this base.

A subclass implements ``_sign_bytes(payload) -> str`` (and, when asymmetric,
``public_key_pem()``); everything Binance-specific lives here and in
``binance.py``, so every kind signs requests the same way.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from hmac import compare_digest
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit
from urllib.parse import urljoin as requests_urljoin

from ..errors import SigningError
from ..events import Recorder
from ..secret import Secret, mask_id
from . import binance
from .failures import SignatureFailure, report_response


class ApiKey(str):
    """The exchange API key: a plain ``str`` for headers, masked in ``repr``.

    The API key is not the signing secret, but Binance calls it sensitive, so it
    never shows up whole in a repr, a log line built with ``%r``, or a traceback.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"ApiKey({mask_id(str(self))!r})"


class Signer(ABC):
    """Signs Binance requests. Usable as ``requests`` auth: ``requests.get(url, params=p, auth=signer)``."""

    #: "hmac" | "ed25519" | "rsa" | "transit"
    kind: ClassVar[str]

    def __init__(
        self,
        api_key: Secret | str | None,
        *,
        recv_window: int | None = binance.DEFAULT_RECV_WINDOW,
        profile: str | None = None,
        audit_config: Mapping[str, Any] | None = None,
        record_failures: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(api_key, Secret):
            api_key = api_key.reveal_str()
        if api_key is not None:
            api_key = api_key.strip()
            if not api_key or any(c.isspace() or not c.isprintable() for c in api_key):
                raise SigningError("the API key is empty or contains spaces or control characters",
                                   "check the api_key field stored for this profile")
        self._api_key = ApiKey(api_key) if api_key is not None else None
        self.recv_window = binance.check_recv_window(recv_window) if recv_window is not None else None
        self.profile = profile
        self._audit_config = audit_config
        self._record_failures = record_failures
        self._clock = clock
        #: The last signature failure seen through ``check_response`` (or the requests hook).
        self.last_failure: SignatureFailure | None = None
        #: The exchange's clock minus this host's, in ms (``sync_clock``); added to every timestamp.
        self.clock_offset_ms = 0

    # -- identity ----------------------------------------------------------------------
    @property
    def api_key(self) -> ApiKey:
        """The API key sent in ``X-MBX-APIKEY`` (a ``str``; masked in ``repr``)."""
        if self._api_key is None:
            raise SigningError(
                f"no API key for profile {self.profile or '?'}",
                "store it in the profile's api_key field and map it, e.g. BINANCE_API_KEY = \"api_key\"",
            )
        return self._api_key

    def __repr__(self) -> str:
        key = mask_id(str(self._api_key)) if self._api_key is not None else None
        return f"{type(self).__name__}(kind={self.kind!r}, profile={self.profile!r}, api_key={key!r})"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a Signer cannot be pickled")

    def public_key_pem(self) -> str:
        """The public key to register with the exchange (asymmetric kinds only)."""
        raise SigningError(f"a {self.kind} signer has no public key", "HMAC keys are shared secrets")

    def close(self) -> None:
        """Forget the key material held by this signer. Idempotent."""

    def refresh(self) -> bool:
        """Switch to a rotated key; only signers from ``get_signer(profile=...)`` can."""
        raise SigningError(
            f"this {self.kind} signer cannot fetch a rotated key itself (it was built from what "
            "`credbroker run` injected)",
            "run the bot with `credbroker run --on-rotate restart` (or --agent), or use get_signer(profile=...)",
        )

    def __enter__(self) -> Signer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- signing -----------------------------------------------------------------------
    @abstractmethod
    def _sign_bytes(self, payload: bytes) -> str:
        """The signature of ``payload`` in the kind's text form (hex or base64)."""

    def sign(self, payload: str | bytes) -> str:
        """Sign exactly ``payload`` (Binance's totalParams) and return the signature text."""
        if type(payload) is str:  # the hot path: a query string
            return self._sign_bytes(payload.encode("utf-8"))
        if isinstance(payload, (bytes, bytearray, memoryview)):
            return self._sign_bytes(bytes(payload))
        if isinstance(payload, str):
            return self._sign_bytes(str(payload).encode("utf-8"))
        raise SigningError(f"cannot sign a {type(payload).__name__}", "pass the query string (str or bytes)")

    def _sign_request(self, query: str, body: str, path: str, method: str | None) -> str:
        """Sign one request's totalParams; the signing agent's client also passes the parts and the path on."""
        return self.sign(binance.total_params(query, body))

    def timestamp(self) -> int:
        """The exchange's current time in milliseconds (Binance's ``timestamp``), as far as ``sync_clock`` knows."""
        return binance.timestamp_ms(self._clock) + self.clock_offset_ms

    def sync_clock(self, base_url: str, *, timeout: float = 5.0) -> int:
        """Learn the exchange's clock offset from its time endpoint; returns it (ms). Raises SigningError.

        ``base_url`` is the exchange's (``https://fapi.binance.com``) or any URL
        on it: futures paths ask ``/fapi/v1/time``, others ``/api/v3/time``.
        ``get_signer()`` calls it at start when ``[signer] exchange_url`` is set,
        and the ``requests`` hook calls it after a -1021 answer.
        """
        self.clock_offset_ms = binance.clock_offset_ms(base_url, clock=self._clock, timeout=timeout)
        return self.clock_offset_ms

    def _timing(self, existing: set[str], timestamp: int | None, recv_window: int | None | bool
                ) -> list[tuple[str, str]]:
        extra: list[tuple[str, str]] = []
        window = self.recv_window if recv_window is True else recv_window
        if window is not None and window is not False and "recvWindow" not in existing:
            extra.append(("recvWindow", str(binance.check_recv_window(window))))
        if "timestamp" not in existing:
            extra.append(("timestamp", str(self.timestamp() if timestamp is None else int(timestamp))))
        return extra

    def sign_params(self, params: binance.Params | None = None, *, timestamp: int | None = None,
                    recv_window: int | None | bool = True) -> str:
        """The full signed query string: params, ``recvWindow``, ``timestamp``, ``signature``.

        Order is kept as given; ``recvWindow`` (the signer's default unless
        given or ``recv_window=None``) and ``timestamp`` (now, in ms) are added
        when absent. Send the result as the query string (GET/DELETE) or as the
        form body (POST/PUT), unchanged.
        """
        items = binance.param_items(params)
        items += self._timing({k for k, _ in items}, timestamp, recv_window)
        query = binance.encode(items)
        return f"{query}&signature={binance.quote_signature(self.sign(query))}"

    #: DESIGN.md's name for the same call.
    sign_query = sign_params

    # -- WebSocket API -------------------------------------------------------------------
    def ws_params(self, params: Mapping[str, Any] | None = None, *, timestamp: int | None = None
                  ) -> dict[str, Any]:
        """``params`` ready to sign for the WebSocket API: ``apiKey`` and ``timestamp`` added when absent.

        Raises SigningError when ``params`` already hold a ``signature`` or an
        ``apiKey`` that is not this signer's. ``timestamp`` is the exchange's time
        (``sync_clock``'s offset applied, as for REST); null values are dropped.
        """
        out = {str(k): v for k, v in (params or {}).items() if v is not None}
        if "signature" in out:
            raise SigningError("the parameters already contain a signature", "pass the parameters unsigned")
        api_key = str(self.api_key)
        given = out.get("apiKey")
        if given is None:
            out["apiKey"] = api_key
        elif not isinstance(given, str) or not compare_digest(given.encode(), api_key.encode()):
            raise SigningError("the parameters carry another apiKey than this signer's",
                               "leave apiKey out: the signer adds its own")
        if "timestamp" not in out:
            out["timestamp"] = self.timestamp() if timestamp is None else int(timestamp)
        return out

    def sign_ws_params(self, params: Mapping[str, Any] | None = None, *, method: str | None = None,
                       timestamp: int | None = None, api: str = "spot") -> dict[str, Any]:
        """Sign a WebSocket API request's ``params`` as Binance documents; returns them with ``signature``.

        The payload is every parameter but ``signature``, sorted by name,
        ``name=value`` joined by ``&``, not percent-encoded
        (``binance.ws_payload``); ``apiKey`` and ``timestamp`` are added when
        absent. HMAC signatures are lower-case hex, Ed25519 and RSA base64.
        ``method`` (e.g. ``"order.place"``) is checked: ``session.logon``
        needs an Ed25519 key, as Binance accepts no other for it. ``api``
        ("spot" or "futures") and ``method`` tell the signing agent's policy
        which REST endpoint the request stands for.
        """
        out = self.ws_params(params, timestamp=timestamp)
        if method is not None and binance.ws_base_method(method) == binance.WS_LOGON:
            self.check_ws_logon()
        out["signature"] = self._sign_ws(binance.ws_payload(out), out, method, api)
        return out

    def ws_logon(self, *, request_id: str | int | None = None, timestamp: int | None = None,
                 recv_window: int | None = None) -> dict[str, Any]:
        """A signed ``session.logon`` request (the whole JSON object to send); Ed25519 keys only."""
        params: dict[str, Any] = {}
        if recv_window is not None:
            params["recvWindow"] = binance.check_recv_window(recv_window)
        signed = self.sign_ws_params(params, method=binance.WS_LOGON, timestamp=timestamp)
        return {"id": request_id if request_id is not None else f"logon-{signed['timestamp']}",
                "method": binance.WS_LOGON, "params": signed}

    def ws_logon_kind(self) -> str:
        """The key kind Binance sees at ``session.logon`` (transit keys are Ed25519 inside Vault)."""
        return "ed25519" if self.kind == "transit" else self.kind

    def check_ws_logon(self) -> None:
        """Raise SigningError unless this signer's key may log on a WebSocket session (Ed25519 only)."""
        kind = self.ws_logon_kind()
        if kind != "ed25519":
            raise SigningError(
                f"session.logon needs an Ed25519 key; this profile's key is {kind}",
                "sign each WebSocket API request instead (sign_ws_params), or register an Ed25519 key with "
                "Binance for this profile",
            )

    def _sign_ws(self, payload: str, params: Mapping[str, Any], method: str | None, api: str) -> str:
        """Sign one WebSocket API payload; the signing agent's client passes the params on instead."""
        return self.sign(payload)

    def headers(self) -> dict[str, str]:
        """The headers a signed Binance request needs: ``{"X-MBX-APIKEY": api_key}``."""
        return {binance.API_KEY_HEADER: str(self.api_key)}

    # -- requests integration --------------------------------------------------------------
    def __call__(self, request: Any) -> Any:
        """``requests`` auth hook: add timing params, sign query + body as sent, set the header.

        Placement follows Binance's examples: with a form body, ``recvWindow``,
        ``timestamp`` and ``signature`` go at the end of the body (example 3);
        otherwise at the end of the query string (example 2). The signature
        covers the query string followed by the body, byte for byte.
        """
        parts = urlsplit(request.url)
        query = parts.query
        body = request.body
        if body is None or body == b"" or body == "":
            body_text = ""
        elif isinstance(body, (bytes, str)):
            try:
                body_text = body.decode("utf-8") if isinstance(body, bytes) else body
            except UnicodeDecodeError:
                raise SigningError("cannot sign a request body that is not UTF-8 text",
                                   "pass the parameters as a dict") from None
            ctype = str(request.headers.get("Content-Type", ""))
            if ctype and "application/x-www-form-urlencoded" not in ctype:
                raise SigningError(
                    f"cannot sign a {ctype.split(';')[0]} body: Binance signs query strings and form bodies",
                    "pass the parameters with params= or data= (a dict), not json=",
                )
        else:
            raise SigningError("cannot sign a streamed request body", "pass the parameters as a dict")
        existing = {k for k, _ in parse_qsl(query, keep_blank_values=True)}
        existing |= {k for k, _ in parse_qsl(body_text, keep_blank_values=True)}
        if "signature" in existing:
            raise SigningError("the request is already signed", "do not pass signature= yourself")
        extra = binance.encode(self._timing(existing, None, True))
        if body_text:
            body_text = f"{body_text}&{extra}" if extra else body_text
        else:
            query = f"{query}&{extra}" if query and extra else (query or extra)
        signature = binance.quote_signature(self._sign_request(query, body_text, parts.path, request.method))
        if body_text:
            body_text = f"{body_text}&signature={signature}"
            request.body = body_text.encode("utf-8") if isinstance(body, bytes) else body_text
            request.headers["Content-Length"] = str(len(body_text.encode("utf-8")))
        else:
            query = f"{query}&signature={signature}" if query else f"signature={signature}"
        request.url = urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
        request.headers[binance.API_KEY_HEADER] = str(self.api_key)
        request.register_hook("response", self._response_hook)
        return request

    def _response_hook(self, response: Any, *args: Any, **kwargs: Any) -> Any:
        if response.status_code >= 400:
            if self._record_failures:
                self.check_response(response, raise_on_audit_error=False)
            if binance.parse_error(getattr(response, "content", None))[0] == -1021:
                # The host's clock and the exchange's disagree: learn the offset for the next requests.
                try:
                    self.sync_clock(str(response.request.url))
                except SigningError:
                    pass  # the -1021 itself reaches the bot; a later one tries again
        elif getattr(response, "is_redirect", False):
            # requests would follow it carrying X-MBX-APIKEY (it strips only Authorization):
            # never hand the API key to another origin (STYLE.md: redirects and custom headers).
            location = response.headers.get("Location", "")
            here = urlsplit(response.request.url)
            there = urlsplit(requests_urljoin(response.request.url, location))
            if (there.scheme, there.netloc) != (here.scheme, here.netloc):
                raise SigningError(
                    f"refusing to follow a redirect from {here.scheme}://{here.netloc} to another host "
                    f"({there.scheme}://{there.netloc}) with the API key",
                    "check the base URL of the exchange",
                )
        return response

    def check_response(self, response: Any, *, raise_on_audit_error: bool = True) -> SignatureFailure | None:
        """Record a requests-like response in the audit log if it means key trouble."""
        status = getattr(response, "status_code", None)
        if status is None or status < 400:
            return None
        req = getattr(response, "request", None)
        url = getattr(req, "url", None) or getattr(response, "url", "") or ""
        failure = report_response(
            status,
            getattr(response, "content", None),
            url,
            method=getattr(req, "method", None),
            profile=self.profile,
            api_key=str(self._api_key) if self._api_key is not None else None,
            audit_config=self._audit_config,
            raise_on_audit_error=raise_on_audit_error,
        )
        if failure is not None:
            self.last_failure = failure
        return failure

    def audit_recorder(self) -> Recorder:
        """``record(event, fields)`` into the audit log this signer reports to (the relay inside `run`)."""
        audit_config = self._audit_config

        def record(event: str, fields: dict[str, Any]) -> None:
            from .audit_bridge import record_event

            record_event(event, fields, audit_config=audit_config)

        return record

    # -- listenKey upkeep (USDⓈ-M futures user data streams) ------------------------------
    def listen_key_keeper(self, base_url: str, **options: Any) -> Any:
        """A ``ListenKeyKeeper`` for this signer's API key at ``base_url`` (not started: ``start()`` or ``with``).

        The signer remembers it, so ``report_stream_error`` recreates its key. Options: see
        ``broker.signing.listenkey.ListenKeyKeeper``.
        """
        from .listenkey import ListenKeyKeeper

        options.setdefault("profile", self.profile)
        options.setdefault("record", self.audit_recorder())
        keeper = ListenKeyKeeper(self, base_url, **options)
        self._listen_key_keeper = keeper
        return keeper

    def report_stream_error(self, message: Any) -> str | bool | None:
        """Report a user-data-stream message such as ``{"e": "error", "m": "Invalid listenKey"}``.

        With a keeper from ``listen_key_keeper``: recorded, the key recreated, and the new key returned
        (None when the message is not trouble). Without one: recorded as ``listen_key_failed``; True when
        it was trouble, False otherwise.
        """
        keeper = getattr(self, "_listen_key_keeper", None)
        if keeper is not None:
            new_key: str | None = keeper.report_stream_event(message)
            return new_key
        from .listenkey import report_stream_error

        return report_stream_error(message, profile=self.profile,
                                   api_key=str(self._api_key) if self._api_key is not None else None,
                                   record=self.audit_recorder())

    def report(self, status: int | None, body: Any, endpoint: str, *, method: str | None = None
               ) -> SignatureFailure | None:
        """``report_response`` with this signer's profile, API key and audit settings."""
        failure = report_response(status, body, endpoint, method=method, profile=self.profile,
                                  api_key=str(self._api_key) if self._api_key is not None else None,
                                  audit_config=self._audit_config)
        if failure is not None:
            self.last_failure = failure
        return failure
