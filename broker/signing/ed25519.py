"""Ed25519 signer with a local private key (the key type Binance recommends)."""

from __future__ import annotations

from typing import Any

from ..errors import SigningError
from ..secret import Secret
from . import core
from .base import Signer


class Ed25519Signer(Signer):
    """Signs with an Ed25519 private key (PEM) and returns base64."""

    kind = "ed25519"

    def __init__(self, api_key: Secret | str | None, private_key: Secret | Any,
                 passphrase: Secret | None = None, **kwargs: Any) -> None:
        super().__init__(api_key, **kwargs)
        self._key: Any = _load(private_key, passphrase, "ed25519")

    def _sign_bytes(self, payload: bytes) -> str:
        if self._key is None:
            raise SigningError("this signer has been closed", "get a new one with get_signer()")
        return core.ed25519_sign_b64(self._key, payload)

    def public_key_pem(self) -> str:
        """The SubjectPublicKeyInfo PEM to register with Binance."""
        if self._key is None:
            raise SigningError("this signer has been closed", "get a new one with get_signer()")
        return core.public_key_pem(self._key)

    def close(self) -> None:
        self._key = None


def _load(private_key: Secret | Any, passphrase: Secret | None, want: str) -> Any:
    """A key object from a Secret holding PEM (or an already-loaded key object)."""
    kind: str
    if isinstance(private_key, Secret):
        kind, key = core.load_private_key(private_key.reveal(), passphrase.reveal() if passphrase else None)
    else:
        key = private_key
        name = type(key).__name__.lower()
        kind = "ed25519" if "ed25519" in name else "rsa" if "rsa" in name else name
    if kind != want:
        raise SigningError(f"the stored private key is {kind}, not {want}",
                           f"fix [signer] type, or store an {want} key")
    return key
