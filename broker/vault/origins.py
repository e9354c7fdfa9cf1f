"""Where each Vault setting can come from: its variable, or a key of ``[vault]`` in the config file.

The environment comes first (as the Vault CLI reads it), then ``[vault]``. The table travels beside
the environment (``SettingsEnv``), never inside it as invented variables, so every value knows
whether it came from ``VAULT_ADDR`` or from ``[vault] addr in FILE``.

Kept apart from ``settings`` (and free of heavy imports) because ``broker.config`` needs these names
on every start of ``credbroker run``, whatever the source.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

__all__ = ["CONFIG_ENV", "SettingsEnv", "VaultTable", "describe", "lookup", "value", "vault_table", "without"]

#: [vault] config key -> the environment variable that overrides it.
CONFIG_ENV = {
    "addr": "VAULT_ADDR",
    "addrs": "CREDBROKER_VAULT_ADDRS",
    "namespace": "VAULT_NAMESPACE",
    "cacert": "VAULT_CACERT",
    "capath": "VAULT_CAPATH",
    "client_cert": "VAULT_CLIENT_CERT",
    "client_key": "VAULT_CLIENT_KEY",
    "tls_server_name": "VAULT_TLS_SERVER_NAME",
    "timeout": "CREDBROKER_VAULT_TIMEOUT",
    "auth": "CREDBROKER_VAULT_AUTH",
    "approle_mount": "CREDBROKER_APPROLE_MOUNT",
    "role_id_file": "CREDBROKER_ROLE_ID_FILE",
    "secret_id_file": "CREDBROKER_SECRET_ID_FILE",
}

#: A variable that older versions wrote to carry ``[vault]`` values; never read, always dropped.
FROM_CONFIG_VAR = "CREDBROKER_VAULT_FROM_CONFIG"
_KEY_OF = {var: key for key, var in CONFIG_ENV.items()}


@dataclass(frozen=True)
class VaultTable:
    """The config file's ``[vault]`` table, validated: key -> value as text (``addrs`` comma-joined)."""

    values: Mapping[str, str]
    file: str

    def where(self, key: str) -> str:
        """How a message names ``key``: ``[vault] addr in /path/credbroker.toml``."""
        return f"[vault] {key} in {self.file}"


class SettingsEnv(Mapping[str, str]):
    """The environment the broker reads its Vault settings from, with the config's ``[vault]`` beside it.

    Indexing reads the environment only: a ``[vault]`` value never poses as a variable. ``lookup``
    resolves a setting (the environment first, then ``[vault]``) and says where it came from."""

    def __init__(self, environ: Mapping[str, str], vault: VaultTable | None = None) -> None:
        self._env = {k: v for k, v in environ.items() if k != FROM_CONFIG_VAR}
        self.vault = vault

    def __getitem__(self, key: str) -> str:
        return self._env[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._env)

    def __len__(self) -> int:
        return len(self._env)

    def without(self, *names: str) -> SettingsEnv:
        """The same settings without the variables ``names`` (e.g. a token that must not be used again)."""
        return SettingsEnv({k: v for k, v in self._env.items() if k not in names}, self.vault)


def vault_table(env: Mapping[str, str]) -> VaultTable | None:
    """The ``[vault]`` table that travels with ``env``, if any."""
    return env.vault if isinstance(env, SettingsEnv) else None


def lookup(env: Mapping[str, str], *names: str, key: str | None = None) -> tuple[str | None, str | None]:
    """(value, where it came from) of a setting: the first of the variables ``names`` that is set, else
    ``[vault] key`` (``key`` defaults to the config key of ``names[0]``), else (None, None)."""
    for name in names:
        if env.get(name):
            return env[name], name
    table = vault_table(env)
    key = key or (_KEY_OF.get(names[0]) if names else None)
    if table is not None and key is not None and table.values.get(key):
        return table.values[key], table.where(key)
    return None, None


def value(env: Mapping[str, str], *names: str) -> str | None:
    """The value ``lookup`` finds (the environment first, then ``[vault]``), or None."""
    return lookup(env, *names)[0]


def without(env: Mapping[str, str], *names: str) -> Mapping[str, str]:
    """``env`` without the variables ``names``, keeping its ``[vault]`` table."""
    if isinstance(env, SettingsEnv):
        return env.without(*names)
    return {k: v for k, v in env.items() if k not in names}


#: True as Go's strconv.ParseBool reads it, the way the Vault CLI reads VAULT_SKIP_VERIFY.
TRUE_WORDS = frozenset({"1", "t", "T", "TRUE", "true", "True"})
FALSE_WORDS = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def skip_verify_var(env: Mapping[str, str]) -> str | None:
    """The variable that turns TLS checking off in ``env`` (VAULT_SKIP_VERIFY...), when one does."""
    for var in ("VAULT_SKIP_VERIFY", "BAO_SKIP_VERIFY"):
        if env.get(var):
            return var if env[var] in TRUE_WORDS else None
    return None


def describe(env: Mapping[str, str], var: str) -> str:
    """Where the value of ``var`` came from: the variable, or the ``[vault]`` key and file."""
    return lookup(env, var)[1] or var
