"""RSA signer with a local private key (RSASSA-PKCS1-v1_5, SHA-256, base64)."""

from __future__ import annotations

from typing import Any

from ..errors import SigningError
from ..secret import Secret
from . import core
from .base import Signer
from .ed25519 import _load


class RsaSigner(Signer):
    """Signs with an RSA private key (PEM, 2048 bits or more) and returns base64."""

    kind = "rsa"

    def __init__(self, api_key: Secret | str | None, private_key: Secret | Any,
                 passphrase: Secret | None = None, **kwargs: Any) -> None:
        super().__init__(api_key, **kwargs)
        self._key: Any = _load(private_key, passphrase, "rsa")

    def _sign_bytes(self, payload: bytes) -> str:
        if self._key is None:
            raise SigningError("this signer has been closed", "get a new one with get_signer()")
        return core.rsa_sign_b64(self._key, payload)

    def public_key_pem(self) -> str:
        """The SubjectPublicKeyInfo PEM to register with Binance."""
        if self._key is None:
            raise SigningError("this signer has been closed", "get a new one with get_signer()")
        return core.public_key_pem(self._key)

    def close(self) -> None:
        self._key = None
