"""Vault / OpenBao source, through hvac.

Reads a KV v2 secret (latest or a pinned version); a field whose value is a
transit ciphertext (``vault:v1:...``) is decrypted through the transit engine,
so its plaintext only ever exists in memory. Every HTTP status and transport
failure becomes a specific ``VaultError`` with a remedy.

Two protections hvac does not give by default:

* every request has a timeout (``VaultSettings.timeout``);
* the token never follows a redirect to another origin: ``requests`` strips
  ``Authorization`` on such redirects but not Vault's custom ``X-Vault-Token``
  header, so ``_TokenSafeSession`` strips it (and the namespace) too.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from ..config import Profile
from ..errors import (
    ConfigError,
    VaultAuthError,
    VaultBadResponse,
    VaultError,
    VaultNotFound,
    VaultPermissionDenied,
    VaultSealed,
    VaultUnreachable,
)
from ..secret import Credentials, Origin, Secret
from .settings import VaultSettings

if TYPE_CHECKING:  # pragma: no cover
    import hvac

T = TypeVar("T")

TRANSIT_PREFIX = "vault:v"
_MAX_ERR = 200


def split_path(profile: Profile) -> tuple[str, str]:
    """(mount, path inside the mount) of a vault profile's KV v2 secret."""
    path = str(profile.options["path"]).strip("/")
    mount = profile.options.get("mount")
    if mount:
        mount = str(mount).strip("/")
        if path.startswith(mount + "/"):
            path = path[len(mount) + 1 :]
        return mount, path
    mount, _, rest = path.partition("/")
    if not rest:
        raise ConfigError(f"{profile.where('path')}: {path!r} has no mount", 'write "<mount>/<path>"')
    return mount, rest


def _session() -> Any:
    """A requests Session that drops Vault's token header on a cross-origin redirect."""
    import requests

    class _TokenSafeSession(requests.Session):
        def rebuild_auth(self, prepared_request: Any, response: Any) -> None:
            super().rebuild_auth(prepared_request, response)  # type: ignore[no-untyped-call]
            if self.should_strip_auth(response.request.url, prepared_request.url):  # type: ignore[no-untyped-call]
                prepared_request.headers.pop("X-Vault-Token", None)
                prepared_request.headers.pop("X-Vault-Namespace", None)

    return _TokenSafeSession()


def _describe(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, (list, tuple)) and errors:
        text = "; ".join(str(e) for e in errors)
    else:
        text = type(exc).__name__
    text = " ".join(text.split())
    return text[:_MAX_ERR] + ("..." if len(text) > _MAX_ERR else "")


@contextmanager
def _mapped(settings: VaultSettings, action: str, path: str, token_check: Callable[[], bool] | None = None
            ) -> Iterator[None]:
    """Turn hvac/requests failures during ``action`` on ``path`` into VaultErrors."""
    import hvac.exceptions as hx
    import requests.exceptions as rx

    addr = settings.addr
    try:
        yield
    except VaultError:
        raise
    except rx.SSLError as exc:
        raise VaultUnreachable(
            f"TLS error talking to Vault at {addr}",
            "set VAULT_CACERT to the server's CA certificate, or check VAULT_ADDR",
        ) from exc
    except (rx.ConnectTimeout, rx.ReadTimeout, rx.Timeout) as exc:
        raise VaultUnreachable(
            f"Vault at {addr} did not answer within {settings.timeout:g} s while trying to {action} {path}",
            "check that the server is up and reachable, or raise CREDBROKER_VAULT_TIMEOUT",
        ) from exc
    except rx.ConnectionError as exc:
        raise VaultUnreachable(
            f"cannot reach Vault at {addr} (connection failed) to {action} {path}",
            "start the server or fix VAULT_ADDR",
        ) from exc
    except rx.RequestException as exc:
        raise VaultUnreachable(f"request to Vault at {addr} failed: {type(exc).__name__}", "check VAULT_ADDR") from exc
    except hx.VaultDown as exc:
        raise VaultSealed(
            f"Vault at {addr} is sealed (or in standby and unavailable) while trying to {action} {path}",
            "unseal it: `vault operator unseal` (or `bao operator unseal`)",
        ) from exc
    except hx.VaultNotInitialized as exc:
        raise VaultSealed(f"Vault at {addr} is not initialized", "run `vault operator init`") from exc
    except hx.Unauthorized as exc:
        raise VaultAuthError(
            f"Vault rejected the credentials while trying to {action} {path}: {_describe(exc)}",
            "run `vault login` or set VAULT_TOKEN",
        ) from exc
    except hx.Forbidden as exc:
        # Vault answers 403 both for a bad token and for a policy that denies
        # this path; ask about the token itself to tell the two apart.
        if token_check is not None and not token_check():
            where = settings.token_source or "the token"
            raise VaultAuthError(
                f"Vault at {addr} rejected the token from {where} (invalid, expired or revoked)",
                "run `vault login`, or set VAULT_TOKEN to a valid token",
            ) from exc
        raise VaultPermissionDenied(
            f"permission denied: the token may not {action} {path}",
            f"grant it in the bot's policy; check with `vault token capabilities {path}`",
        ) from exc
    except hx.InvalidPath as exc:
        raise VaultNotFound(
            f"nothing found at {path} on {addr} while trying to {action} it",
            "check the path with `vault kv get` (and that secret engine is mounted as KV v2)",
        ) from exc
    except hx.RateLimitExceeded as exc:
        raise VaultUnreachable(f"Vault at {addr} is rate limiting requests", "retry later") from exc
    except hx.InvalidRequest as exc:
        raise VaultBadResponse(
            f"Vault refused the request to {action} {path}: {_describe(exc)}", "check the path and settings"
        ) from exc
    except hx.VaultError as exc:
        raise VaultBadResponse(
            f"Vault at {addr} failed to {action} {path}: {_describe(exc)}", "check the server's logs"
        ) from exc
    except ValueError as exc:  # bad JSON from something that is not Vault
        raise VaultBadResponse(
            f"the server at {addr} did not answer like Vault while trying to {action} {path}",
            "check VAULT_ADDR points at Vault/OpenBao",
        ) from exc


def client_for(profile: Profile | None, env: Mapping[str, str], *, settings: VaultSettings | None = None
               ) -> hvac.Client:
    """An authenticated hvac client: token, or AppRole login. Raises VaultError."""
    import hvac

    s = settings or VaultSettings.from_env(env)
    verify: bool | str = s.cacert or True
    client = hvac.Client(
        url=s.addr,
        token=None,
        verify=verify,
        timeout=s.timeout,
        namespace=s.namespace,
        session=_session(),
    )
    if s.auth == "approle":
        if s.role_id is None or s.secret_id is None:
            raise VaultAuthError(
                "Vault auth is approle but no role_id/secret_id is set",
                "set VAULT_ROLE_ID and VAULT_SECRET_ID, or role_id_file/secret_id_file in [vault]",
            )
        login_path = f"auth/{s.approle_mount}/login"
        try:
            with _mapped(s, "log in at", login_path):
                resp = client.auth.approle.login(
                    role_id=s.role_id.reveal_str(),
                    secret_id=s.secret_id.reveal_str(),
                    mount_point=s.approle_mount,
                    use_token=True,
                )
        except (VaultBadResponse, VaultPermissionDenied) as exc:
            raise VaultAuthError(
                f"AppRole login at {s.addr}/v1/{login_path} failed: {exc.message}",
                "check the role_id, and issue a new secret_id (they expire and may be single-use)",
            ) from exc
        if not isinstance(resp, dict) or not isinstance(resp.get("auth"), dict):
            raise VaultBadResponse(f"AppRole login at {login_path} returned no token", "check the server")
    else:
        if s.token is None:
            raise VaultAuthError(
                f"no Vault token for {s.addr}",
                "set VAULT_TOKEN, run `vault login` (writes ~/.vault-token), or configure AppRole",
            )
        client.token = s.token.reveal_str()
    return client


def _token_valid(client: Any) -> Callable[[], bool]:
    def check() -> bool:
        import hvac.exceptions as hx

        try:
            client.auth.token.lookup_self()
            return True
        except (hx.Forbidden, hx.Unauthorized):
            return False
        except Exception:  # noqa: BLE001 - unknown: assume the token is fine, report the 403
            return True

    return check


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
    api_path = f"{mount}/data/{path}"
    shown = api_path + (f" (version {version})" if version else "")
    with _mapped(settings, "read", shown, _token_valid(client)):
        resp = client.secrets.kv.v2.read_secret_version(
            path=path, version=version, mount_point=mount, raise_on_deleted_version=True
        )
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


def current_version(profile: Profile, env: Mapping[str, str], *, client: Any = None) -> int | None:
    """The KV v2 ``current_version`` of a vault profile's secret (for rotation)."""
    settings = VaultSettings.from_env(env)
    client = client or client_for(profile, env, settings=settings)
    mount, path = split_path(profile)
    with _mapped(settings, "read metadata of", f"{mount}/metadata/{path}", _token_valid(client)):
        resp = client.secrets.kv.v2.read_secret_metadata(path=path, mount_point=mount)
    value = _require(resp, "data", "current_version", what=f"{mount}/metadata/{path}")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def current_version_created(profile: Profile, env: Mapping[str, str], *, client: Any = None
                            ) -> tuple[str, int, str] | None:
    """(secret label, current version, its created_time) from KV v2 metadata; None when the answer lacks them.

    For the weekly review's "keys not rotated in N days": metadata holds no
    secret value, so reading it is not an access to record.
    """
    settings = VaultSettings.from_env(env)
    client = client or client_for(profile, env, settings=settings)
    mount, path = split_path(profile)
    with _mapped(settings, "read metadata of", f"{mount}/metadata/{path}", _token_valid(client)):
        resp = client.secrets.kv.v2.read_secret_metadata(path=path, mount_point=mount)
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


def _decrypt(client: Any, settings: VaultSettings, profile: Profile, field: str, ciphertext: str) -> Secret:
    key = profile.options.get("transit_key")
    if not key:
        raise ConfigError(
            f"profile {profile.name!r}: field {field} is transit ciphertext (vault:v...) but no transit_key is set",
            "set transit_key in the profile (or pass --transit-key NAME)",
        )
    mount = str(profile.options.get("transit_mount") or "transit")
    with _mapped(settings, "decrypt with", f"{mount}/decrypt/{key}", _token_valid(client)):
        resp = client.secrets.transit.decrypt_data(name=key, ciphertext=ciphertext, mount_point=mount)
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


def fetch(profile: Profile, *, env: Mapping[str, str]) -> Credentials:
    """Read every field the profile names from its KV v2 secret (fail closed)."""
    settings = VaultSettings.from_env(env)
    client = client_for(profile, env, settings=settings)
    mount, path = split_path(profile)
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
                raise VaultNotFound(f"field {name!r} in {mount}/{path} is empty", "store a value in it")
            if text.startswith(TRANSIT_PREFIX):
                fields[name] = _decrypt(client, settings, profile, name, text)
            else:
                fields[name] = Secret(text)
    except BaseException:
        for secret in fields.values():
            secret.wipe()
        raise
    finally:
        # The decoded JSON holds immutable str copies we cannot wipe; drop them now.
        data.clear()
        client.adapter.close()
    return Credentials(
        profile=profile.name,
        origin=Origin(source="vault", path=f"{mount}/{path}", version=version, address=settings.addr,
                      request_id=request_id, namespace=settings.namespace or None),
        fields=fields,
    )
