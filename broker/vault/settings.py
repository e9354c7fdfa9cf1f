"""Vault connection settings, read the way the Vault CLI reads them.

Precedence: environment first (``VAULT_*``, then OpenBao's ``BAO_*``), then the
config file's ``[vault]`` table, then the CLI's defaults. The token comes from
``VAULT_TOKEN``/``BAO_TOKEN``, else ``~/.vault-token``; AppRole credentials from
``VAULT_ROLE_ID``/``VAULT_SECRET_ID`` (or ``CREDBROKER_*``), else from files
named in the config (``role_id_file``/``secret_id_file``), never from argv.

TLS, as the Vault CLI reads it: ``VAULT_CACERT`` (a file) or ``VAULT_CAPATH``
(a folder of PEM files; ``VAULT_CACERT`` wins when both are set) is then the
only trust anchor; ``VAULT_CLIENT_CERT`` + ``VAULT_CLIENT_KEY`` for mutual TLS;
``VAULT_TLS_SERVER_NAME`` for SNI and the certificate's name check;
``VAULT_SKIP_VERIFY`` (true/false as Go's ParseBool) turns checking off, loudly.

Each value remembers where it came from (``origin(...)``), so an error names
``VAULT_ADDR`` or ``[vault] addr in FILE``, whichever the user set.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .. import units
from ..errors import ConfigError, VaultAuthError
from ..secret import Secret
from .origins import CONFIG_ENV, FALSE_WORDS, TRUE_WORDS, lookup
from .paths import PathKind, check

DEFAULT_ADDR = "https://127.0.0.1:8200"  # the Vault CLI's own default
DEFAULT_TIMEOUT = 10.0



def _first(env: Mapping[str, str], *names: str) -> tuple[str | None, str | None]:
    """(value, variable) of the first of ``names`` set to a non-empty value."""
    for name in names:
        value = env.get(name)
        if value:
            return value, name
    return None, None


def origin_of(url: str) -> str:
    """``scheme://host:port`` of a URL, lower-cased, the port explicit: what a redirect is compared by."""
    parts = urlsplit(url)
    scheme = (parts.scheme or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = 443 if scheme == "https" else 80
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def _parse_addr(value: str, where: str) -> str:
    addr = value.strip().rstrip("/")
    parts = units.split_url(addr)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"Vault address {addr[:120]!r} (from {where}) is not an http:// or https:// URL with a "
                          "host (and a port from 1 to 65535, if any)",
                          f"fix {where}")
    return addr


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
    capath: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    tls_server_name: str | None = None
    skip_verify: bool = False
    #: Other addresses of the same cluster a redirect may lead to (origins); the addr's own always may.
    addrs: tuple[str, ...] = ()
    #: setting name ("addr", "cacert", "timeout"...) -> where its value came from, for messages
    origins: Mapping[str, str] = field(default_factory=dict)
    #: What these settings were resolved from (the environment, with ``[vault]`` beside it): kept only
    #: for ``reresolved()`` and for a process boundary (the daemon, the early fetch child), never read
    #: for a setting. None for settings built in code.
    inputs: Mapping[str, str] | None = field(default=None, repr=False, compare=False)

    def reresolved(self, *, drop_token: bool = False) -> VaultSettings:
        """The settings resolved again from the same inputs: the one deliberate re-read of the token file
        and the AppRole id files, for a long-running loop (a run's rotation watcher, the proxy's) whose
        token died: a `vault login` during the run wrote a new ~/.vault-token, an admin issued a new
        secret_id. ``drop_token``: without ``VAULT_TOKEN``/``BAO_TOKEN`` (the dead token), so an AppRole
        login is made instead. Settings built in code (no inputs) are returned as they are."""
        if self.inputs is None:
            return self
        from .origins import without

        inputs = without(self.inputs, "VAULT_TOKEN", "BAO_TOKEN") if drop_token else self.inputs
        return VaultSettings.from_env(inputs)

    def origin(self, name: str) -> str:
        """Where setting ``name`` came from ("VAULT_ADDR", "[vault] addr in FILE"); the variable by default."""
        return self.origins.get(name) or CONFIG_ENV.get(name, name)

    def allowed_origins(self) -> frozenset[str]:
        """The origins a request may be redirected to: the address's own and ``addrs``."""
        return frozenset({origin_of(self.addr), *(origin_of(a) for a in self.addrs)})

    def cluster(self) -> tuple[str, ...]:
        """The nodes to try, in order: the address's origin, then each of ``addrs`` (no duplicates)."""
        return tuple(dict.fromkeys([origin_of(self.addr), *(origin_of(a) for a in self.addrs)]))

    def connection(self) -> dict[str, object]:
        """How to connect, without any credential: what a child's transit signer needs (JSON-safe)."""
        return {"addr": self.addr, "cacert": self.cacert, "capath": self.capath, "namespace": self.namespace,
                "timeout": self.timeout, "client_cert": self.client_cert, "client_key": self.client_key,
                "tls_server_name": self.tls_server_name, "skip_verify": self.skip_verify,
                "addrs": list(self.addrs)}

    @classmethod
    def from_connection(cls, data: Mapping[str, object], *, token_source: str) -> VaultSettings:
        """The inverse of ``connection()`` (no token: the caller holds its own)."""

        def text(key: str) -> str | None:
            value = data.get(key)
            return value if isinstance(value, str) and value else None

        addr = text("addr")
        if addr is None:
            raise ConfigError("no Vault address in the signer's settings", "it is set by `credbroker run`")
        timeout = data.get("timeout")
        addrs = data.get("addrs")
        return cls(
            addr=_parse_addr(addr, "the signer's settings"),
            token_source=token_source,
            cacert=text("cacert"),
            capath=text("capath"),
            namespace=text("namespace"),
            timeout=float(timeout) if isinstance(timeout, (int, float)) and 0 < timeout <= units.MAX_SECONDS else DEFAULT_TIMEOUT,
            client_cert=text("client_cert"),
            client_key=text("client_key"),
            tls_server_name=text("tls_server_name"),
            skip_verify=data.get("skip_verify") is True,
            addrs=tuple(a for a in addrs if isinstance(a, str)) if isinstance(addrs, list) else (),
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> VaultSettings:
        """Resolve every setting from ``env`` (see the module docstring)."""
        origins: dict[str, str] = {}

        def pick(name: str, *names: str) -> str | None:
            value, where = lookup(env, *names, key=name)
            if where is not None:
                origins[name] = where
            return value

        raw_addr = pick("addr", "VAULT_ADDR", "BAO_ADDR")
        addr = _parse_addr(raw_addr, origins["addr"]) if raw_addr else DEFAULT_ADDR
        if raw_addr is None:
            origins["addr"] = (f"VAULT_ADDR: it is unset, so the default {DEFAULT_ADDR} was tried; export "
                               "VAULT_ADDR or set [vault] addr")
        timeout_s = pick("timeout", "CREDBROKER_VAULT_TIMEOUT")
        timeout = (units.seconds(timeout_s, origins.get("timeout", "CREDBROKER_VAULT_TIMEOUT")) if timeout_s
                   else DEFAULT_TIMEOUT)
        auth = pick("auth", "CREDBROKER_VAULT_AUTH") or "token"
        if auth not in ("token", "approle"):
            raise ConfigError(f"{origins.get('auth', 'CREDBROKER_VAULT_AUTH')}: Vault auth method {auth!r} is not "
                              "supported", 'use "token" or "approle"')

        token: Secret | None = None
        token_source: str | None = None
        for var in ("VAULT_TOKEN", "BAO_TOKEN"):
            if env.get(var):
                token, token_source = Secret(env[var].strip()), var
                break

        role_value, _ = _first(env, "VAULT_ROLE_ID", "BAO_ROLE_ID", "CREDBROKER_ROLE_ID")
        secret_value, _ = _first(env, "VAULT_SECRET_ID", "BAO_SECRET_ID", "CREDBROKER_SECRET_ID")
        role_id = Secret(role_value) if role_value else None
        secret_id = Secret(secret_value) if secret_value else None
        role_id_file = pick("role_id_file", "CREDBROKER_ROLE_ID_FILE")
        secret_id_file = pick("secret_id_file", "CREDBROKER_SECRET_ID_FILE")
        if role_id is None and role_id_file:
            role_id = _read_id_file(role_id_file, "role_id", private=False)
        if secret_id is None and secret_id_file:
            secret_id = _read_id_file(secret_id_file, "secret_id", private=True)
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

        skip_raw = pick("skip_verify", "VAULT_SKIP_VERIFY", "BAO_SKIP_VERIFY")
        if skip_raw is not None and skip_raw not in TRUE_WORDS | FALSE_WORDS:
            raise ConfigError(f"{origins['skip_verify']}={skip_raw!r} is not true or false",
                              f"unset {origins['skip_verify']} (and set VAULT_CACERT to the server's CA)")
        client_cert = pick("client_cert", "VAULT_CLIENT_CERT", "BAO_CLIENT_CERT")
        client_key = pick("client_key", "VAULT_CLIENT_KEY", "BAO_CLIENT_KEY")
        if (client_cert is None) != (client_key is None):
            have, lack = ("client_cert", "client_key") if client_key is None else ("client_key", "client_cert")
            raise ConfigError(f"{origins[have]} is set but no {lack}: mutual TLS needs both",
                              "set VAULT_CLIENT_CERT and VAULT_CLIENT_KEY together")
        addrs_raw = pick("addrs", "CREDBROKER_VAULT_ADDRS")
        addrs = tuple(_parse_addr(a, origins.get("addrs", "CREDBROKER_VAULT_ADDRS"))
                      for a in (addrs_raw or "").replace(",", " ").split())

        return cls(
            addr=addr,
            token=token,
            token_source=token_source,
            cacert=pick("cacert", "VAULT_CACERT", "BAO_CACERT"),
            capath=pick("capath", "VAULT_CAPATH", "BAO_CAPATH"),
            namespace=pick("namespace", "VAULT_NAMESPACE", "BAO_NAMESPACE"),
            timeout=timeout,
            auth=auth,
            approle_mount=check(pick("approle_mount", "CREDBROKER_APPROLE_MOUNT") or "approle", PathKind.MOUNT,
                                origins.get("approle_mount", "CREDBROKER_APPROLE_MOUNT")),
            role_id=role_id,
            secret_id=secret_id,
            client_cert=client_cert,
            client_key=client_key,
            tls_server_name=pick("tls_server_name", "VAULT_TLS_SERVER_NAME", "BAO_TLS_SERVER_NAME"),
            skip_verify=skip_raw in TRUE_WORDS,
            addrs=addrs,
            origins=origins,
            inputs=env,
        )
