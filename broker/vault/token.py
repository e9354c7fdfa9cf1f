"""Token calls (the broker's own token and the child's scoped signing token): each one hvac call inside
``session.mapped``, answering Vault's plain response (a dict) or raising a ``VaultError`` with a remedy.
Callers outside ``broker.vault`` call these functions, never the hvac client's ``auth.token``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .session import mapped
from .settings import VaultSettings


def lookup_self(client: Any, settings: VaultSettings, *, action: str = "look up the token at",
                check_token: bool = True) -> Any:
    """Vault's answer to ``auth/token/lookup-self``."""
    with mapped(settings, action, "auth/token/lookup-self", client, check_token=check_token):
        return client.auth.token.lookup_self()


def renew_self(client: Any, settings: VaultSettings, *, action: str = "renew the token at") -> Any:
    """Vault's answer to ``auth/token/renew-self``."""
    with mapped(settings, action, "auth/token/renew-self", client):
        return client.auth.token.renew_self()


def revoke_self(client: Any, settings: VaultSettings, *, action: str = "revoke the token at") -> None:
    """Revoke the client's own token (``auth/token/revoke-self``)."""
    with mapped(settings, action, "auth/token/revoke-self", client):
        client.auth.token.revoke_self()


def create(client: Any, settings: VaultSettings, *, policies: list[str], ttl: str, renewable: bool,
           display_name: str, meta: Mapping[str, str], role: str | None = None,
           action: str = "create a token at") -> Any:
    """Vault's answer to creating a child token (``auth/token/create[/<role>]``)."""
    path = f"auth/token/create/{role}" if role else "auth/token/create"
    with mapped(settings, action, path, client):
        return client.auth.token.create(policies=policies, ttl=ttl, renewable=renewable, display_name=display_name,
                                        meta=dict(meta), role_name=role)


def write_policy(client: Any, settings: VaultSettings, name: str, hcl: str, *, action: str = "write policy") -> None:
    """Write ACL policy ``name`` (``sys/policies/acl/<name>``)."""
    with mapped(settings, action, f"sys/policies/acl/{name}", client):
        client.sys.create_or_update_acl_policy(name=name, policy=hcl)
