"""Vault/OpenBao transit signer: the Ed25519 private key never leaves Vault.

Vault API (transit secrets engine):
- ``POST <mount>/sign/<key>`` with ``input`` = base64 of the payload; for an
  ``ed25519`` key Vault signs the input itself (pure Ed25519, as Binance
  expects) and answers ``vault:v<N>:<base64 signature>``.
- ``GET <mount>/keys/<key>`` gives ``type``, ``exportable`` and, per version,
  ``public_key`` (for ed25519: base64 of the 32 raw bytes).

Inside a child of ``credbroker run`` the bot never gets the broker's token:
``child_token`` creates a separate, short-lived token whose only policy
allows ``update`` on ``<mount>/sign/<key>`` and ``read`` on
``<mount>/keys/<key>``; the child renews it while it runs.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from typing import Any

from ..errors import SigningError, VaultBadResponse, VaultPermissionDenied
from ..secret import Secret
from . import core
from .base import Signer

_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def policy_name(mount: str, key: str) -> str:
    """The name of the narrow policy that may only sign with ``key`` (and read its public key)."""
    return "credbroker-sign-" + _NAME_CHARS.sub("-", f"{mount.strip('/')}-{key}").strip("-")


def policy_hcl(mount: str, key: str) -> str:
    """HCL of that policy. The sign path alone: no export, no rotate, no other key."""
    m = mount.strip("/")
    return (
        f'# Written by credbroker: sign with transit key "{key}" and read its public key, nothing else.\n'
        f'path "{m}/sign/{key}" {{\n  capabilities = ["update"]\n}}\n'
        f'path "{m}/keys/{key}" {{\n  capabilities = ["read"]\n}}\n'
    )


def describe_key(client: Any, settings: Any, *, mount: str, key: str, where: str = "signer.transit_key"
                 ) -> dict[str, Any]:
    """Vault's description of transit key ``mount``/``key``, checked: it exists, it is Ed25519 (Binance's
    self-generated key type), and its private half cannot leave Vault. ``where`` names the setting for
    errors. The broker calls this before any bot starts, so a typo in the key's name fails closed."""
    from ..errors import VaultNotFound
    from ..vault import transit

    path = f"{mount}/keys/{key}"
    try:
        resp = transit.read_key(client, settings, mount, key)
    except VaultNotFound:
        raise SigningError(f"transit key {path} does not exist ({where})",
                           f"check the key's name in {where}, or create it: scripts/transit-key {key}") from None
    data = resp.get("data") if isinstance(resp, dict) else None
    if not isinstance(data, dict):
        raise SigningError(f"Vault returned no description of transit key {path}", "check the mount and key name")
    if data.get("type") != "ed25519":
        from ..vault.session import in_hand, server_text

        shown = server_text(repr(data.get("type")), in_hand(settings, client), limit=40)
        raise SigningError(
            f"transit key {path} is of type {shown}, not ed25519",
            "create an Ed25519 key: scripts/transit-key NAME",
        )
    if data.get("exportable") or data.get("allow_plaintext_backup"):
        raise SigningError(
            f"transit key {path} is exportable: its private key can leave Vault",
            "create a new non-exportable key with scripts/transit-key and register its public key",
        )
    return data


class TransitSigner(Signer):
    """Signs through Vault's transit engine with a non-exportable Ed25519 key; returns base64."""

    kind = "transit"

    def __init__(
        self,
        api_key: Secret | str | None,
        client: Any,
        settings: Any,
        *,
        key: str,
        mount: str = "transit",
        token_ttl: float | None = None,
        key_version: int | None = None,
        check_key: bool = True,
        monotonic: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        super().__init__(api_key, **kwargs)
        from ..vault.paths import PathKind, problem

        if not key or problem(key, PathKind.NAME) or problem(mount, PathKind.MOUNT):
            raise SigningError(f"invalid transit key name {key!r} or mount {mount!r}",
                               "set signer.transit_key to the key's name (one segment, no '..' or '%')")
        self._client: Any = client
        if settings is None:  # for messages only: where the server is, which token
            from ..vault.settings import VaultSettings

            settings = VaultSettings(addr=str(getattr(client, "url", "Vault")), token_source="the signer's token")
        self._settings = settings
        self.key = key
        self.mount = mount.strip("/") or "transit"
        self._token_ttl = token_ttl
        self._monotonic = monotonic
        self._issued = monotonic()
        #: Sign with this key version (the one registered with the exchange); None: Vault's latest.
        self.pinned_version = key_version
        #: key version of the last signature (``vault:vN:``): changes when an admin rotates the key
        self.key_version: int | None = None
        if check_key:
            self._describe_key()

    # -- Vault calls -------------------------------------------------------------------
    def _open(self) -> Any:
        if self._client is None:
            raise SigningError("this signer has been closed", "get a new one with get_signer()")
        return self._client

    def _describe_key(self) -> dict[str, Any]:
        if self._client is None:
            raise SigningError("this signer has been closed", "get a new one with get_signer()")
        return describe_key(self._client, self._settings, mount=self.mount, key=self.key)

    def _maybe_renew(self) -> None:
        ttl = self._token_ttl
        if not ttl or self._monotonic() - self._issued < ttl / 2:
            return
        from ..vault import token

        resp = token.renew_self(self._open(), self._settings, action="renew the signing token at")
        lease = resp.get("auth", {}).get("lease_duration") if isinstance(resp, dict) else None
        self._issued = self._monotonic()
        if isinstance(lease, int) and lease > 0:
            self._token_ttl = float(lease)

    def _sign_bytes(self, payload: bytes) -> str:
        self._maybe_renew()
        path = f"{self.mount}/sign/{self.key}"
        b64 = base64.b64encode(payload).decode("ascii")
        from ..vault import transit

        resp = transit.sign(self._open(), self._settings, self.mount, self.key, b64, key_version=self.pinned_version)
        sig = resp.get("data", {}).get("signature") if isinstance(resp, dict) else None
        if not isinstance(sig, str):
            raise SigningError(f"Vault returned no signature from {path}", "check the transit mount and key")
        self.key_version, signature = core.strip_transit_prefix(sig)
        return signature

    def public_key_pem(self, version: int | None = None) -> str:
        """The PEM public key to register with Binance (the pinned, else the latest key version)."""
        data = self._describe_key()
        keys = data.get("keys")
        if not isinstance(keys, dict) or not keys:
            raise SigningError(f"Vault returned no public keys for {self.mount}/keys/{self.key}", "check the key")
        if version is None:
            version = self.pinned_version
        want = str(version if version is not None else data.get("latest_version") or max(int(k) for k in keys))
        entry = keys.get(want)
        pub = entry.get("public_key") if isinstance(entry, dict) else None
        if not isinstance(pub, str):
            from ..vault.session import in_hand, server_text

            shown = server_text(want, in_hand(self._settings, self._client), limit=20)  # may be the server's text
            raise SigningError(f"transit key {self.key} has no public key for version {shown}", "check the version")
        if pub.lstrip().startswith("-----BEGIN"):
            return pub
        return core.ed25519_raw_public_to_pem(pub)

    def close(self) -> None:
        self._client = None


def child_token(client: Any, settings: Any, *, mount: str, key: str, profile: str, ttl: str,
                role: str | None = None) -> tuple[Secret, int]:
    """A new token that may only sign with ``key``: (token, ttl in seconds).

    Writes the narrow policy first when the broker's token may (an admin can
    also write it beforehand: ``scripts/transit-key`` does). Without a token
    role, Vault lets a non-root token create children only with policies it
    holds itself; with ``role`` (``signer.token_role``) the role's
    ``allowed_policies`` decide.
    """
    from ..vault import token as vault_token

    name = policy_name(mount, key)
    try:
        vault_token.write_policy(client, settings, name, policy_hcl(mount, key))
    except VaultPermissionDenied:
        pass  # the admin manages policies; the token request below says if it is missing
    try:
        resp = vault_token.create(
            client, settings,
            policies=[name],
            ttl=ttl,
            renewable=True,
            display_name=f"credbroker-signer-{profile}",
            meta={"profile": profile, "transit_key": f"{mount}/{key}"},
            role=role,
            action="create a signing token at",
        )
    except (VaultPermissionDenied, VaultBadResponse) as exc:
        # 403 (the broker's token may not create tokens there) or 400 (the child's policy is not
        # one the broker's token holds, or not in the role's allowed_policies): the policy remedy.
        # Any other failure (Vault down, sealed, a bad token) keeps its own message and remedy.
        message = exc.message
        raise SigningError(
            f"cannot create a transit signing token for profile {profile!r}: {message}",
            f"give the broker's token policy {name} (scripts/transit-key writes it), or set signer.token_role",
        ) from exc
    auth = resp.get("auth") if isinstance(resp, dict) else None
    if not isinstance(auth, dict) or not isinstance(auth.get("client_token"), str) or not auth["client_token"]:
        raise SigningError("Vault returned no token for the transit signer", "check the server")
    token: str = auth["client_token"]
    policies = auth.get("policies") or []
    if name not in policies:
        raise SigningError(
            f"the signing token Vault issued lacks policy {name}",
            f"allow {name} in signer.token_role's allowed_policies, or write the policy (scripts/transit-key)",
        )
    lease = auth.get("lease_duration")
    return Secret(token), int(lease) if isinstance(lease, int) else 0
