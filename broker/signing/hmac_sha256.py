"""HMAC-SHA256 signer: Binance's classic API key (the secret is shared with Binance)."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from ..errors import SigningError
from ..secret import Secret, wipe_buffer
from .base import Signer


class HmacSigner(Signer):
    """Signs with HMAC-SHA256 and returns the lower-case hex digest."""

    kind = "hmac"

    def __init__(self, api_key: Secret | str | None, secret: Secret, **kwargs: Any) -> None:
        super().__init__(api_key, **kwargs)
        # A buffer wiped right after keying: an immutable bytes copy would stay in freed
        # memory (a long-running agent would collect one per rotated key).
        key = secret.reveal_buffer()
        try:
            if not key or key.isspace():
                raise SigningError("the HMAC secret is empty", "store the secret key Binance gave you in api_secret")
            # Keyed once: the HMAC state (OpenSSL's) is copied per signature, which is
            # cheaper than re-keying and keeps ``sign`` near bare ``hmac.new`` speed.
            mac = hmac.new(key, digestmod=hashlib.sha256)
            # OpenSSL's HMAC object itself when the hmac module wraps one: its copy/update/hexdigest
            # are C calls, without the module's Python wrapper around each (the agent's hot path).
            self._mac: Any = getattr(mac, "_hmac", None) or mac
        finally:
            wipe_buffer(key)

    def _sign_bytes(self, payload: bytes) -> str:
        mac = self._mac
        if mac is None:
            raise SigningError("this signer has been closed", "get a new one with get_signer()")
        m = mac.copy()
        m.update(payload)
        return str(m.hexdigest())

    def close(self) -> None:
        self._mac = None
