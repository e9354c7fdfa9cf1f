"""Transit engine calls: each one hvac call inside ``session.mapped``, answering Vault's plain response
(a dict) or raising a ``VaultError`` with a remedy. Callers outside ``broker.vault`` call these functions,
never the hvac client's ``secrets.transit``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .session import Secretish, mapped
from .settings import VaultSettings
from .token import token_check


def read_key(client: Any, settings: VaultSettings, mount: str, key: str, *,
             action: str = "read the transit key") -> Any:
    """Vault's description of transit key ``mount``/``key`` (``GET <mount>/keys/<key>``)."""
    with mapped(settings, action, f"{mount}/keys/{key}", client, token_valid=token_check(client)):
        return client.secrets.transit.read_key(name=key, mount_point=mount)


def sign(client: Any, settings: VaultSettings, mount: str, key: str, b64_input: str, *,
         key_version: int | None = None) -> Any:
    """Vault's answer to signing base64 ``b64_input`` with ``mount``/``key`` (``POST <mount>/sign/<key>``)."""
    with mapped(settings, "sign with", f"{mount}/sign/{key}", client, token_valid=token_check(client)):
        return client.secrets.transit.sign_data(name=key, hash_input=b64_input, key_version=key_version,
                                                mount_point=mount)


def decrypt(client: Any, settings: VaultSettings, mount: str, key: str, ciphertext: str, *,
            secrets: Iterable[Secretish] = ()) -> Any:
    """Vault's answer to decrypting ``ciphertext`` with ``mount``/``key`` (``POST <mount>/decrypt/<key>``)."""
    with mapped(settings, "decrypt with", f"{mount}/decrypt/{key}", client, token_valid=token_check(client),
                secrets=secrets):
        return client.secrets.transit.decrypt_data(name=key, ciphertext=ciphertext, mount_point=mount)
