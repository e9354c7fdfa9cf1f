"""KV v2 calls: each one hvac call inside ``session.mapped``, so every answer of Vault is either the
plain response (a dict) or a ``VaultError`` with a remedy. Callers outside ``broker.vault`` call these
functions, never the hvac client's ``secrets.kv``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .session import Secretish, mapped
from .settings import VaultSettings
from .token import token_check


def read_version(client: Any, settings: VaultSettings, mount: str, path: str, version: int | None, *,
                 action: str = "read", shown: str | None = None, raise_on_deleted: bool = True) -> Any:
    """Vault's answer to reading ``version`` (None: the latest) of ``mount``/``path``."""
    with mapped(settings, action, shown or f"{mount}/data/{path}", client, token_valid=token_check(client)):
        return client.secrets.kv.v2.read_secret_version(
            path=path, version=version, mount_point=mount, raise_on_deleted_version=raise_on_deleted
        )


def read_metadata(client: Any, settings: VaultSettings, mount: str, path: str, *,
                  action: str = "read metadata of") -> Any:
    """Vault's answer to reading the metadata of ``mount``/``path``."""
    with mapped(settings, action, f"{mount}/metadata/{path}", client, token_valid=token_check(client)):
        return client.secrets.kv.v2.read_secret_metadata(path=path, mount_point=mount)


def write(client: Any, settings: VaultSettings, mount: str, path: str, data: dict[str, Any], *,
          cas: int | None = None, action: str = "write", secrets: Iterable[Secretish] = ()) -> Any:
    """Vault's answer to writing ``data`` as a new version of ``mount``/``path`` (check-and-set ``cas``)."""
    with mapped(settings, action, f"{mount}/data/{path}", client, token_valid=token_check(client),
                secrets=secrets):
        return client.secrets.kv.v2.create_or_update_secret(path=path, secret=data, mount_point=mount, cas=cas)


def list_keys(client: Any, settings: VaultSettings, mount: str, folder: str, *, action: str = "list") -> Any:
    """Vault's answer to listing the keys under ``mount``/``folder``."""
    with mapped(settings, action, f"{mount}/metadata/{folder}", client, token_valid=token_check(client)):
        return client.secrets.kv.v2.list_secrets(path=folder, mount_point=mount)
