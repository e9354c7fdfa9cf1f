"""The shared shape of the local asymmetric signers (Ed25519, RSA): a private key from PEM.

A kind is a subclass naming itself and calling its pure signing function
from ``core``; loading, closing and the public key are the same for both.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from ..errors import SigningError
from ..secret import Secret
from . import core
from .base import Signer


class PemKeySigner(Signer):
    """Signs with a private key loaded from PEM; ``_sign_with_key`` is the kind's algorithm."""

    def __init__(self, api_key: Secret | str | None, private_key: Secret | Any,
                 passphrase: Secret | None = None, **kwargs: Any) -> None:
        super().__init__(api_key, **kwargs)
        self._key: Any = load_key(private_key, passphrase, self.kind)

    def _live_key(self) -> Any:
        if self._key is None:
            raise SigningError("this signer has been closed", "get a new one with get_signer()")
        return self._key

    @abstractmethod
    def _sign_with_key(self, key: Any, payload: bytes) -> str:
        """The kind's signature of ``payload`` (a pure function in ``core``)."""

    def _sign_bytes(self, payload: bytes) -> str:
        return self._sign_with_key(self._live_key(), payload)

    def public_key_pem(self) -> str:
        """The SubjectPublicKeyInfo PEM to register with Binance."""
        return core.public_key_pem(self._live_key())

    def close(self) -> None:
        self._key = None


def load_key(private_key: Secret | Any, passphrase: Secret | None, want: str) -> Any:
    """A key object from a Secret holding PEM (or an already-loaded key object) of kind ``want``."""
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
