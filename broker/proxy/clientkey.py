"""The per-run proxy secret: what the bot signs with instead of the real key.

It has the same kind as the real key (an HMAC secret, an Ed25519 or an RSA
PEM key, encrypted with a per-run passphrase when the real one is), so the
bot's client library takes it in the same constructor argument and signs as
it always does. It is made fresh for each run, lives in the broker's memory
and the bot's environment only, and is worth nothing outside this proxy: the
exchange has never heard of it.

Verification follows Binance's rules (``broker.signing.binance``): HMAC-SHA256
lower-case hex compared in constant time; Ed25519 and RSA PKCS#1 v1.5 SHA-256
signatures in base64.
"""

from __future__ import annotations

import base64
import hmac
import secrets
import string
from typing import Any

from ..secret import Secret
from ..signing import core

_ALNUM = string.ascii_letters + string.digits


class ClientKey:
    """One run's proxy secret: ``secret`` (what the bot gets), ``passphrase`` (for an encrypted PEM)."""

    def __init__(self, kind: str, *, encrypted: bool = False) -> None:
        self.kind = kind
        self._public: Any = None
        self.passphrase: Secret | None = None
        if kind == "hmac":
            # Shaped like Binance's HMAC secrets (64 letters and digits), so clients that check it accept it.
            self.secret = Secret("".join(secrets.choice(_ALNUM) for _ in range(64)))
            return
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

        key: Any = ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else \
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._public = key.public_key()
        encryption: Any = serialization.NoEncryption()
        if encrypted:
            self.passphrase = Secret(secrets.token_urlsafe(24))
            encryption = serialization.BestAvailableEncryption(self.passphrase.reveal())
        self.secret = Secret(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               encryption))

    def verify(self, payload: bytes, signature: str) -> bool:
        """True when ``signature`` is this key's signature of ``payload`` (Binance's text forms)."""
        if self.kind == "hmac":
            expected = core.hmac_sha256_hex(self.secret.reveal(), payload)
            return hmac.compare_digest(expected.encode(), signature.lower().encode("ascii", "replace"))
        from cryptography.exceptions import InvalidSignature

        try:
            raw = base64.b64decode(signature, validate=True)
        except ValueError:
            return False
        try:
            if self.kind == "ed25519":
                self._public.verify(raw, payload)
            else:
                from cryptography.hazmat.primitives import hashes
                from cryptography.hazmat.primitives.asymmetric import padding

                self._public.verify(raw, payload, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return False
        return True

    def wipe(self) -> None:
        """Forget the secret (idempotent)."""
        self.secret.wipe()
        if self.passphrase is not None:
            self.passphrase.wipe()

    def __repr__(self) -> str:
        return f"ClientKey(kind={self.kind!r})"
