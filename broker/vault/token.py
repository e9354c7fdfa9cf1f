"""Every token operation: logging in (the token, or an AppRole login), logging in again, looking up,
renewing and revoking the broker's own token, telling a dead token from a policy that denies, and the
child's scoped signing token. Each Vault call is one hvac call inside ``session.mapped``, answering
Vault's plain response (a dict) or raising a ``VaultError`` with a remedy. Callers outside
``broker.vault`` call these functions, never the hvac client's ``auth.token`` or ``auth.approle``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import VaultAuthError, VaultBadResponse, VaultPermissionDenied
from .session import mapped, new_client
from .settings import VaultSettings

if TYPE_CHECKING:  # pragma: no cover
    import hvac


# -- logging in ----------------------------------------------------------------------------------
def open_client(settings: VaultSettings) -> hvac.Client:
    """An authenticated hvac client: the token, or an AppRole login. Raises a VaultError."""
    client = new_client(settings)
    if settings.auth == "approle":
        _approle_login(client, settings)
    else:
        if settings.token is None:
            raise VaultAuthError(
                f"no Vault token for {settings.addr}",
                "set VAULT_TOKEN, run `vault login` (writes ~/.vault-token), or configure AppRole",
            )
        client.token = settings.token.reveal_str()
    return client


def has_approle(settings: VaultSettings) -> bool:
    """True when ``settings`` hold the AppRole credentials a fresh login needs."""
    return settings.role_id is not None and settings.secret_id is not None


def relogin(settings: VaultSettings) -> hvac.Client:
    """A client logged in afresh with AppRole, whatever token ``settings`` also hold (it expired or was
    revoked: asking with it again would fail the same way). Raises a VaultError."""
    return open_client(replace(settings, auth="approle", token=None, token_source=None))


def _approle_login(client: Any, settings: VaultSettings) -> None:
    from .transport import RedirectRefused

    if settings.role_id is None or settings.secret_id is None:
        raise VaultAuthError(
            "Vault auth is approle but no role_id/secret_id is set",
            "set VAULT_ROLE_ID and VAULT_SECRET_ID, or role_id_file/secret_id_file in [vault]",
        )
    login_path = f"auth/{settings.approle_mount}/login"
    try:
        with mapped(settings, "log in at", login_path, client):
            resp = client.auth.approle.login(
                role_id=settings.role_id.reveal_str(),
                secret_id=settings.secret_id.reveal_str(),
                mount_point=settings.approle_mount,
                use_token=True,
            )
    except (VaultBadResponse, VaultPermissionDenied) as exc:
        if isinstance(exc.__cause__, RedirectRefused):
            raise  # its remedy (the cluster's addresses) is the right one, not the role_id's
        raise VaultAuthError(
            f"AppRole login at {settings.addr}/v1/{login_path} failed: {exc.message}",
            "check the role_id, and issue a new secret_id (they expire and may be single-use)",
        ) from exc
    if not isinstance(resp, dict) or not isinstance(resp.get("auth"), dict):
        raise VaultBadResponse(f"AppRole login at {login_path} returned no token", "check the server")


# -- is the token still good? --------------------------------------------------------------------
def token_check(client: Any) -> Callable[[], bool]:
    """A function telling whether the client's token is still valid (for a 403's remedy).

    Only Vault's own refusals (403, 401) say "invalid"; any other failure to ask is "unknown", reported
    as valid so the 403 reads as a policy denial. A bug of ours (a ``TypeError``...) is raised."""

    def check() -> bool:
        import hvac.exceptions as hx
        import requests

        try:
            client.auth.token.lookup_self()
            return True
        except (hx.Forbidden, hx.Unauthorized):
            return False
        except (hx.VaultError, requests.exceptions.RequestException, ValueError):
            return True  # unknown: assume the token is fine and report the 403 as a policy denial

    return check


# -- the broker's own token ----------------------------------------------------------------------
def lookup_self(client: Any, settings: VaultSettings, *, action: str = "look up the token at",
                check_token: bool = True) -> Any:
    """Vault's answer to ``auth/token/lookup-self``."""
    with mapped(settings, action, "auth/token/lookup-self", client,
                token_valid=token_check(client) if check_token else None):
        return client.auth.token.lookup_self()


def renew_self(client: Any, settings: VaultSettings, *, action: str = "renew the token at") -> Any:
    """Vault's answer to ``auth/token/renew-self``."""
    with mapped(settings, action, "auth/token/renew-self", client, token_valid=token_check(client)):
        return client.auth.token.renew_self()


def revoke_self(client: Any, settings: VaultSettings, *, action: str = "revoke the token at") -> None:
    """Revoke the client's own token (``auth/token/revoke-self``)."""
    with mapped(settings, action, "auth/token/revoke-self", client, token_valid=token_check(client)):
        client.auth.token.revoke_self()


# -- the child's scoped signing token ------------------------------------------------------------
def create(client: Any, settings: VaultSettings, *, policies: list[str], ttl: str, renewable: bool,
           display_name: str, meta: Mapping[str, str], role: str | None = None,
           action: str = "create a token at") -> Any:
    """Vault's answer to creating a child token (``auth/token/create[/<role>]``)."""
    path = f"auth/token/create/{role}" if role else "auth/token/create"
    with mapped(settings, action, path, client, token_valid=token_check(client)):
        return client.auth.token.create(policies=policies, ttl=ttl, renewable=renewable, display_name=display_name,
                                        meta=dict(meta), role_name=role)


def write_policy(client: Any, settings: VaultSettings, name: str, hcl: str, *, action: str = "write policy") -> None:
    """Write ACL policy ``name`` (``sys/policies/acl/<name>``): the scoped token's policy."""
    with mapped(settings, action, f"sys/policies/acl/{name}", client, token_valid=token_check(client)):
        client.sys.create_or_update_acl_policy(name=name, policy=hcl)
