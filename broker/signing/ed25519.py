"""Ed25519 signer with a local private key (the key type Binance recommends; base64 signatures)."""

from __future__ import annotations

from typing import Any

from . import core
from .pem import PemKeySigner


class Ed25519Signer(PemKeySigner):
    """Signs with an Ed25519 private key (PEM) and returns base64."""

    kind = "ed25519"

    def _sign_with_key(self, key: Any, payload: bytes) -> str:
        return core.ed25519_sign_b64(key, payload)
