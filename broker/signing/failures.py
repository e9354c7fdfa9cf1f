"""Signature failures: Binance answers that mean key trouble, recorded in the audit log.

A bot that uses the signer as ``requests`` auth gets this for free (a response
hook). Any other client calls one function with what it got back::

    from broker.signing import report_response
    report_response(status_code, body_or_error_dict, "/fapi/v1/order")

What is recorded: the HTTP status, Binance's error code and message, the method
and endpoint (scheme, host and path: never the query string, which holds the
signature), the profile, and the API key masked to its last 4 characters.
Never the secret, never the signature.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..events import Event
from ..errors import BrokerError
from ..secret import mask_id
from . import binance

EVENT = Event.SIGNATURE_FAILURE
_MAX_MESSAGE = 200
# Anything long enough to be a signature, key or token (hex, base64, url-encoded base64).
_LONG_TOKEN = re.compile(r"[A-Za-z0-9+/=%_-]{40,}")


@dataclass(frozen=True)
class SignatureFailure:
    """One key-trouble answer from the exchange. Holds no secret and no signature."""

    status: int | None
    code: int | None
    message: str
    endpoint: str
    method: str | None = None
    profile: str | None = None
    api_key: str | None = None  # masked to the last 4 characters

    @property
    def reason(self) -> str:
        """What the code means, from Binance's errors.md (or "HTTP 401")."""
        if self.code is not None and self.code in binance.KEY_TROUBLE_CODES:
            return binance.KEY_TROUBLE_CODES[self.code]
        return f"HTTP {self.status}"

    def to_dict(self) -> dict[str, object]:
        """The audit record's fields."""
        return {
            "code": self.code,
            "message": self.message,
            "endpoint": self.endpoint,
            "method": self.method,
            "status": self.status,
            "reason": self.reason,
            "profile": self.profile,
            "api_key": self.api_key,
        }


def clean_endpoint(url: str) -> str:
    """Scheme, host and path of a URL: the query (with its signature), fragment and userinfo go."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable endpoint>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", "")) or "/"


def clean_message(message: str | None) -> str:
    """One line, bounded, with anything that looks like a key or signature redacted."""
    text = " ".join(str(message or "").split())
    text = _LONG_TOKEN.sub("<redacted>", text)
    return text[:_MAX_MESSAGE] + ("..." if len(text) > _MAX_MESSAGE else "")


def classify(status: int | None, body: Any, endpoint: str, *, method: str | None = None,
             profile: str | None = None, api_key: str | None = None) -> SignatureFailure | None:
    """A SignatureFailure when (status, body) means key trouble, else None. Pure."""
    code, msg = binance.parse_error(body)
    if not binance.is_key_trouble(status, code):
        return None
    return SignatureFailure(
        status=status,
        code=code,
        message=clean_message(msg if msg is not None else (f"HTTP {status}" if status else "")),
        endpoint=clean_endpoint(endpoint),
        method=method.upper() if method else None,
        profile=profile,
        api_key=mask_id(api_key) if api_key else None,
    )


def record(failure: SignatureFailure, *, audit_config: Mapping[str, Any] | None = None) -> None:
    """Append a ``signature_failure`` event to the audit log (raises AuditError on failure)."""
    from .audit_bridge import record_event

    record_event(EVENT, failure.to_dict(), audit_config=audit_config)


def report_response(status: int | None, body: Any, endpoint: str, *, method: str | None = None,
                    profile: str | None = None, api_key: str | None = None,
                    audit_config: Mapping[str, Any] | None = None, raise_on_audit_error: bool = True,
                    ) -> SignatureFailure | None:
    """Record a Binance answer in the audit log if it means key trouble; return what was recorded.

    ``body`` may be the raw response body (bytes/str), its parsed JSON, or a
    ``{"code": ..., "msg": ...}`` mapping built from a client library's error
    (binance-connector: ``{"code": e.error_code, "msg": e.error_message}`` with
    ``e.status_code``). ``endpoint`` may be a full URL: only scheme, host and
    path are kept. Answers that are not key trouble are ignored (None).
    """
    failure = classify(status, body, endpoint, method=method, profile=profile, api_key=api_key)
    if failure is None:
        return None
    try:
        record(failure, audit_config=audit_config)
    except BrokerError as exc:
        if raise_on_audit_error:
            raise
        # From inside an HTTP response hook: the bot's request has happened; say so loudly.
        print(f"credbroker: could not record a signature failure in the audit log: {exc}", file=sys.stderr)
    return failure
