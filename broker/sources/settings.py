"""Vault connection settings, read the way the Vault CLI reads them.

Precedence: environment first (``VAULT_*``, then OpenBao's ``BAO_*``), then the
config file's ``[vault]`` table, then the CLI's defaults. The token comes from
``VAULT_TOKEN``/``BAO_TOKEN``, else ``~/.vault-token``; AppRole credentials from
``VAULT_ROLE_ID``/``VAULT_SECRET_ID`` (or ``CREDBROKER_*``), else from files
named in the config (``role_id_file``/``secret_id_file``), never from argv.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, VaultAuthError
from ..secret import Secret

DEFAULT_ADDR = "https://127.0.0.1:8200"  # the Vault CLI's own default
DEFAULT_TIMEOUT = 10.0

def _first(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value:
            return value
    return None


def _read_id_file(path_str: str, what: str, *, private: bool) -> Secret:
    path = Path(path_str).expanduser()
    try:
        st = path.stat()
    except OSError as exc:
        raise VaultAuthError(f"cannot read AppRole {what} file {path}: {exc.strerror}", f"check {what}_file") from None
    if private and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise VaultAuthError(
            f"AppRole {what} file {path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):04o})",
            f"chmod 600 {path}",
        )
    try:
        data = path.read_bytes().strip()
    except OSError as exc:
        raise VaultAuthError(f"cannot read AppRole {what} file {path}: {exc.strerror}", f"check {what}_file") from None
    if not data:
        raise VaultAuthError(f"AppRole {what} file {path} is empty", f"write the {what} into it")
    return Secret(data)


@dataclass(frozen=True)
class VaultSettings:
    """Where and how to reach Vault. Tokens and ids are Secrets (masked in repr)."""

    addr: str
    token: Secret | None = field(default=None, repr=False)
    token_source: str | None = None  # "VAULT_TOKEN", "~/.vault-token", ...: named in errors
    cacert: str | None = None
    namespace: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    auth: str = "token"  # "token" | "approle"
    approle_mount: str = "approle"
    role_id: Secret | None = field(default=None, repr=False)
    secret_id: Secret | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> VaultSettings:
        """Resolve every setting from ``env`` (see the module docstring)."""
        addr = (_first(env, "VAULT_ADDR", "BAO_ADDR") or DEFAULT_ADDR).rstrip("/")
        if not addr.startswith(("http://", "https://")):
            raise ConfigError(f"Vault address {addr!r} has no http:// or https://", "fix VAULT_ADDR")
        timeout_s = env.get("CREDBROKER_VAULT_TIMEOUT")
        try:
            timeout = float(timeout_s) if timeout_s else DEFAULT_TIMEOUT
            if timeout <= 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"CREDBROKER_VAULT_TIMEOUT={timeout_s!r} is not a number of seconds > 0",
                              "e.g. CREDBROKER_VAULT_TIMEOUT=10") from None
        auth = env.get("CREDBROKER_VAULT_AUTH") or "token"
        if auth not in ("token", "approle"):
            raise ConfigError(f"Vault auth method {auth!r} is not supported", 'use "token" or "approle"')

        token: Secret | None = None
        token_source: str | None = None
        for var in ("VAULT_TOKEN", "BAO_TOKEN"):
            if env.get(var):
                token, token_source = Secret(env[var].strip()), var
                break

        role_value = _first(env, "VAULT_ROLE_ID", "BAO_ROLE_ID", "CREDBROKER_ROLE_ID")
        secret_value = _first(env, "VAULT_SECRET_ID", "BAO_SECRET_ID", "CREDBROKER_SECRET_ID")
        role_id = Secret(role_value) if role_value else None
        secret_id = Secret(secret_value) if secret_value else None
        if role_id is None and env.get("CREDBROKER_ROLE_ID_FILE"):
            role_id = _read_id_file(env["CREDBROKER_ROLE_ID_FILE"], "role_id", private=False)
        if secret_id is None and env.get("CREDBROKER_SECRET_ID_FILE"):
            secret_id = _read_id_file(env["CREDBROKER_SECRET_ID_FILE"], "secret_id", private=True)
        if (role_id is None) != (secret_id is None) and (auth == "approle" or token is None):
            missing = "secret_id" if secret_id is None else "role_id"
            raise VaultAuthError(
                f"AppRole login needs both a role_id and a secret_id; the {missing} is missing",
                f"set VAULT_{missing.upper()} or {missing}_file in [vault]",
            )
        if role_id is not None and secret_id is not None and token is None:
            auth = "approle"
        if auth == "token" and token is None:
            home = env.get("HOME") or os.path.expanduser("~")
            token_file = Path(home) / ".vault-token"
            try:
                data = token_file.read_text().strip()
            except OSError:
                data = ""
            if data:
                token, token_source = Secret(data), "~/.vault-token"

        return cls(
            addr=addr,
            token=token,
            token_source=token_source,
            cacert=_first(env, "VAULT_CACERT", "BAO_CACERT"),
            namespace=_first(env, "VAULT_NAMESPACE", "BAO_NAMESPACE"),
            timeout=timeout,
            auth=auth,
            approle_mount=env.get("CREDBROKER_APPROLE_MOUNT") or "approle",
            role_id=role_id,
            secret_id=secret_id,
        )
