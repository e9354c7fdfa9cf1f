"""Pure signing functions of (key, payload): no I/O, no state, no Binance rules.

These are what the published test vectors check (tests/integration/test_signing_vectors.py):

- HMAC-SHA256, hex digest: Binance's classic API key. The docs' rule: "Use your
  secretKey as the key and totalParams as the value for the HMAC operation";
  the signature is the lower-case hex digest and is not case sensitive.
- Ed25519 (RFC 8032, pure EdDSA over the payload bytes), base64: the key type
  Binance recommends ("SIGNED request example (Ed25519)" in the spot API docs:
  ``base64.b64encode(private_key.sign(payload.encode('ASCII')))``).
- RSASSA-PKCS1-v1_5 with SHA-256, base64 ("SIGNED request example (RSA)":
  ``openssl dgst -sha256 -sign key.pem | openssl enc -base64 -A``).

cryptography is imported lazily: a bot that signs with HMAC never loads it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import TYPE_CHECKING, Any, Literal

from ..errors import SigningError

if TYPE_CHECKING:  # pragma: no cover
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

KeyKind = Literal["hmac", "ed25519", "rsa"]

_PEM_BEGIN = b"-----BEGIN "


def hmac_sha256_hex(key: bytes, payload: bytes) -> str:
    """HMAC-SHA256 of ``payload`` under ``key``, as lower-case hex (Binance HMAC keys)."""
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def ed25519_sign_b64(private_key: Ed25519PrivateKey, payload: bytes) -> str:
    """Ed25519 signature of ``payload``, base64 with padding (Binance Ed25519 keys)."""
    return base64.b64encode(private_key.sign(payload)).decode("ascii")


def rsa_sign_b64(private_key: RSAPrivateKey, payload: bytes) -> str:
    """RSASSA-PKCS1-v1_5 / SHA-256 signature of ``payload``, base64 (Binance RSA keys)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    return base64.b64encode(private_key.sign(payload, padding.PKCS1v15(), hashes.SHA256())).decode("ascii")


def looks_like_pem(secret: bytes) -> bool:
    """True when the stored secret is a PEM block (an asymmetric key), not an HMAC secret."""
    return secret.lstrip().startswith(_PEM_BEGIN)


def detect_kind(secret: bytes) -> KeyKind:
    """The signer kind a stored secret calls for: PEM -> Ed25519 or RSA; a plain string -> HMAC."""
    if not looks_like_pem(secret):
        return "hmac"
    kind, _ = load_private_key(secret)
    return kind


def load_private_key(pem: bytes, passphrase: bytes | None = None) -> tuple[KeyKind, Any]:
    """Parse a PEM private key (PKCS#8 or traditional) into (kind, key object).

    Raises SigningError naming what is wrong; never the key's bytes.
    """
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem.strip(), password=passphrase or None)
    except TypeError:
        if passphrase:
            raise SigningError(
                "the private key is not encrypted but a passphrase was given",
                "remove the private_key_passphrase field",
            ) from None
        raise SigningError(
            "the private key is encrypted and no passphrase was given",
            "store its passphrase in the private_key_passphrase field, or store the key unencrypted in Vault",
        ) from None
    except ValueError:
        # Message of cryptography's error may quote structure details: keep ours generic.
        raise SigningError(
            "the stored private key is not a valid PEM private key (or the passphrase is wrong)",
            "store a PKCS#8 PEM key: `openssl genpkey -algorithm ed25519`",
        ) from None
    except Exception:  # noqa: BLE001 - e.g. UnsupportedAlgorithm: never a traceback with key material
        raise SigningError("the stored private key uses an unsupported algorithm", "use an Ed25519 or RSA key") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519", key
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise SigningError(
                f"the RSA key has {key.key_size} bits; Binance accepts 2048 or 4096",
                "generate a 2048-bit or larger key (or better, an Ed25519 key)",
            )
        return "rsa", key
    raise SigningError(
        f"unsupported private key type {type(key).__name__}",
        "Binance accepts Ed25519, RSA or HMAC keys",
    )


def public_key_pem(private_key: Any) -> str:
    """The SubjectPublicKeyInfo PEM of a private key: what you register with the exchange."""
    from cryptography.hazmat.primitives import serialization

    data: bytes = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data.decode("ascii")


def ed25519_raw_public_to_pem(raw_b64: str) -> str:
    """Vault transit reports an Ed25519 public key as base64 of its 32 raw bytes; return PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        raw = base64.b64decode(raw_b64, validate=True)
        pub = Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise SigningError("Vault returned a malformed Ed25519 public key", "check the transit key's type") from None
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def strip_transit_prefix(signature: str) -> tuple[int, str]:
    """``vault:v3:BASE64`` -> (3, "BASE64"): Vault prefixes transit signatures with the key version."""
    parts = signature.split(":", 2)
    if len(parts) != 3 or parts[0] != "vault" or not parts[1].startswith("v") or not (parts[1][1:].isascii() and parts[1][1:].isdigit()):
        raise SigningError("Vault returned a signature in an unexpected format", "check the transit mount and key")
    return int(parts[1][1:]), parts[2]
