"""RSA signer with a local private key (RSASSA-PKCS1-v1_5, SHA-256, base64)."""

from __future__ import annotations

from typing import Any

from . import core
from .pem import PemKeySigner


class RsaSigner(PemKeySigner):
    """Signs with an RSA private key (PEM, 2048 bits or more) and returns base64."""

    kind = "rsa"

    def _sign_with_key(self, key: Any, payload: bytes) -> str:
        return core.rsa_sign_b64(key, payload)
