"""Where each Vault setting can come from: its variable, or a key of ``[vault]`` in the config file.

Kept apart from ``settings`` (and free of heavy imports) because ``broker.config`` needs these names
on every start of ``credbroker run``, whatever the source.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = ["CONFIG_ENV", "FROM_CONFIG_VAR", "describe"]

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

#: Written by ``config.with_config_defaults``: {variable: config file} for each value it filled in
#: from ``[vault]``, so messages can say "[vault] addr in FILE" rather than "VAULT_ADDR".
FROM_CONFIG_VAR = "CREDBROKER_VAULT_FROM_CONFIG"


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
    """Where the value of ``var`` in ``env`` came from: the variable, or the ``[vault]`` key and file."""
    raw = env.get(FROM_CONFIG_VAR)
    if raw:
        try:
            filled = json.loads(raw)
        except ValueError:
            filled = {}
        if isinstance(filled, dict) and var in filled:
            key = next((k for k, v in CONFIG_ENV.items() if v == var), var)
            return f"[vault] {key} in {filled[var]}"
    return var
