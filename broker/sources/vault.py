"""Vault / OpenBao source, through hvac.

Reads a KV v2 secret (latest or a pinned version); a field whose value is a
transit ciphertext (``vault:v1:...``) is decrypted through the transit engine,
so its plaintext only ever exists in memory. The client, TLS, redirects,
deadlines and the mapping of every failure to a ``VaultError`` with a remedy
are ``broker.vault.session``'s; this module only knows KV v2 and profiles.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any

from ..config import Profile
from ..errors import ConfigError, VaultBadResponse, VaultError, VaultNotFound
from ..secret import Credentials, Origin, Secret
from ..vault import kv, transit
from ..vault.paths import PathKind, check
from ..vault.session import close
from ..vault.token import open_client
from ..vault.settings import VaultSettings
from .values import value_problem

if TYPE_CHECKING:  # pragma: no cover
    import hvac

TRANSIT_PREFIX = "vault:v"
#: An option only code sets (a config file cannot: its keys are checked): read the values as stored,
#: transit ciphertext not decrypted. The import's read-back compares what it wrote byte for byte.
AS_STORED = "as_stored"


def split_path(profile: Profile) -> tuple[str, str]:
    """(mount, path inside the mount) of a vault profile's KV v2 secret; refuses ``..`` and the like."""
    path = check(profile.options["path"], PathKind.KV_PATH, profile.where("path"))
    mount = profile.options.get("mount")
    if mount:
        mount = check(mount, PathKind.MOUNT, profile.where("mount"))
        if path.startswith(mount + "/"):
            path = path[len(mount) + 1 :]
        return mount, path
    mount, _, rest = path.partition("/")
    if not rest:
        raise ConfigError(f"{profile.where('path')}: {path!r} has no mount", 'write "<mount>/<path>"')
    return mount, rest


def client_for(settings: VaultSettings) -> hvac.Client:
    """An authenticated hvac client for ``settings`` (logged in by ``broker.vault.token``)."""
    return open_client(settings)


def _require(obj: Any, *keys: str, what: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict) or key not in obj:
            raise VaultBadResponse(f"unexpected answer from Vault for {what} (no {'.'.join(keys)})",
                                   "check that the path is a KV v2 secret")
        obj = obj[key]
    return obj


def read_kv(client: Any, settings: VaultSettings, mount: str, path: str, version: int | None
            ) -> tuple[dict[str, Any], int | None, str | None]:
    """(data, version, Vault's request_id) of a KV v2 secret; raises a VaultError."""
    check(mount, PathKind.MOUNT, "the KV mount")  # every caller's path, whatever checked it before
    check(path, PathKind.KV_PATH, "the KV path")
    api_path = f"{mount}/data/{path}"
    shown = api_path + (f" (version {version})" if version else "")
    try:
        resp = kv.read_version(client, settings, mount, path, version, shown=shown)
    except VaultNotFound:
        if version is None:
            raise
        latest = _latest_version(client, settings, mount, path)
        if latest is None or version <= latest:
            raise
        raise VaultNotFound(f"version {version} of {mount}/{path} does not exist: the latest is {latest}",
                            f"pin an existing version (1..{latest}), or remove the pin to read the latest") from None
    data = _require(resp, "data", "data", what=api_path)
    meta = _require(resp, "data", "metadata", what=api_path)
    if data is None:
        raise VaultNotFound(f"version {version or 'latest'} of {api_path} is deleted or destroyed",
                            "read another version, or undelete it with `vault kv undelete`")
    if not isinstance(data, dict):
        raise VaultBadResponse(f"{api_path} holds no key/value map", "store fields with `vault kv put`")
    got = meta.get("version") if isinstance(meta, dict) else None
    request_id = resp.get("request_id") if isinstance(resp, dict) else None
    return (data, got if isinstance(got, int) and not isinstance(got, bool) else None,
            request_id if isinstance(request_id, str) and request_id else None)


def _latest_version(client: Any, settings: VaultSettings, mount: str, path: str) -> int | None:
    """``current_version`` from the metadata, for a message; None when it cannot be read."""
    try:
        resp = kv.read_metadata(client, settings, mount, path)
    except VaultError:
        return None
    data = resp.get("data") if isinstance(resp, dict) else None
    value = data.get("current_version") if isinstance(data, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def current_version(profile: Profile, settings: VaultSettings, *, client: Any = None) -> int | None:
    """The KV v2 ``current_version`` of a vault profile's secret (for rotation)."""
    mount, path = split_path(profile)
    client = client or client_for(settings)
    resp = kv.read_metadata(client, settings, mount, path)
    value = _require(resp, "data", "current_version", what=f"{mount}/metadata/{path}")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def current_version_created(profile: Profile, settings: VaultSettings, *, client: Any = None
                            ) -> tuple[str, int, str] | None:
    """(secret label, current version, its created_time) from KV v2 metadata; None when the answer lacks them.

    For the weekly review's "keys not rotated in N days": metadata holds no
    secret value, so reading it is not an access to record.
    """
    mount, path = split_path(profile)
    client = client or client_for(settings)
    resp = kv.read_metadata(client, settings, mount, path)
    data = resp.get("data") if isinstance(resp, dict) else None
    if not isinstance(data, dict):
        return None
    version = data.get("current_version")
    versions = data.get("versions")
    if not isinstance(version, int) or isinstance(version, bool) or not isinstance(versions, dict):
        return None
    entry = versions.get(str(version))
    created = entry.get("created_time") if isinstance(entry, dict) else None
    if not isinstance(created, str) or not created:
        return None
    where = settings.addr + (f" [{settings.namespace}]" if settings.namespace else "")
    return f"{where} {mount}/{path}", version, created


def _decrypt(client: Any, settings: VaultSettings, profile: Profile, field: str, ciphertext: str,
             held: list[Any]) -> Secret:
    key = profile.options.get("transit_key")
    if not key:
        raise ConfigError(
            f"profile {profile.name!r}: field {field} is transit ciphertext (vault:v...) but no transit_key is set",
            "set transit_key in the profile (or pass --transit-key NAME)",
        )
    key = check(key, PathKind.NAME, profile.where("transit_key"))
    mount = check(profile.options.get("transit_mount") or "transit", PathKind.MOUNT, profile.where("transit_mount"))
    resp = transit.decrypt(client, settings, mount, key, ciphertext, secrets=held)
    plaintext_b64 = _require(resp, "data", "plaintext", what=f"{mount}/decrypt/{key}")
    if not isinstance(plaintext_b64, str):
        raise VaultBadResponse(f"transit decrypt of field {field} returned no plaintext", "check the transit key")
    try:
        raw = bytearray(base64.b64decode(plaintext_b64, validate=True))
    except (binascii.Error, ValueError):
        raise VaultBadResponse(
            f"transit decrypt of field {field} returned invalid base64", "check the server"
        ) from None
    try:
        return Secret(raw)
    finally:
        raw[:] = bytes(len(raw))


def fetch(profile: Profile, *, settings: VaultSettings | None) -> Credentials:
    """Read every field the profile names from its KV v2 secret (fail closed), with the caller's resolved
    ``settings`` (``sources.fetch`` resolves them for a caller that has none)."""
    if settings is None:
        raise ConfigError(f"profile {profile.name!r}: no Vault settings were resolved for this read",
                          "this is a credbroker bug; please report it")
    mount, path = split_path(profile)  # a bad path fails before any request
    client = client_for(settings)
    pinned = profile.options.get("version")
    data, version, request_id = read_kv(client, settings, mount, path, pinned)
    fields: dict[str, Secret] = {}
    try:
        for name in profile.fields:
            if name not in data:
                have = ", ".join(sorted(map(str, data))) or "none"
                raise VaultNotFound(
                    f"field {name!r} not found in {mount}/{path} (version {version}; fields: {have})",
                    f"add it with `vault kv patch -mount={mount} {path} {name}=-` (value on stdin), "
                    "or fix the profile's env mapping",
                )
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise VaultBadResponse(
                    f"field {name!r} in {mount}/{path} is not a string", "store secrets as string values"
                )
            text = str(value)
            if not text:
                raise VaultNotFound(f"field {name!r} in {mount}/{path} is empty",
                                    f"store a value in it with `vault kv patch -mount={mount} {path} {name}=-` "
                                    "(value on stdin)")
            if text.startswith(TRANSIT_PREFIX) and not profile.options.get(AS_STORED):
                held = [*fields.values(), *(v for v in data.values() if isinstance(v, str))]
                fields[name] = _decrypt(client, settings, profile, name, text, held)
            else:
                fields[name] = Secret(text)
            why = value_problem(fields[name])
            if why is not None:
                raise VaultBadResponse(f"field {name!r} in {mount}/{path} {why}",
                                       f"store the value itself with `vault kv patch -mount={mount} {path} {name}=-` "
                                       "(value on stdin)")
    except BaseException as exc:
        for secret in fields.values():
            secret.wipe()
        if isinstance(exc, VaultError):
            # Vault answered (and logged) the read: the refusal record names it, so the weekly review's
            # cross-check matches this read to the broker.
            exc.request_id, exc.secret_path = request_id, f"{mount}/{path}"
        raise
    finally:
        # The decoded JSON holds immutable str copies we cannot wipe; drop them now.
        data.clear()
        close(client)
    return Credentials(
        profile=profile.name,
        origin=Origin(source="vault", path=f"{mount}/{path}", version=version, address=settings.addr,
                      request_id=request_id, namespace=settings.namespace or None),
        fields=fields,
    )
