"""The audit log: every access recorded, tamper-evident, reviewed weekly (issue 3).

Writing (the one path every component records through)::

    from broker.audit import open_log
    log = open_log(config.audit)                          # [audit] table, or None
    log.record("secret_fetched", {"profile": "um-futures", "version": 3, "fields": ["api_key"]})

    with log.batch():                                     # high-rate events: group commit
        log.record("sign", {"profile": "um-futures"}, durable=False)

``record`` returns the written record (a dict); a ``durable=False`` record's
``seq``/``hash`` are filled in when its batch is committed.

Where the log is: ``[audit] path``, else ``$CREDBROKER_AUDIT_LOG``, else
``$XDG_STATE_HOME/credbroker/audit.log`` (default
``~/.local/state/credbroker/audit.log``). File 0600, folder 0700. See
``settings`` for the other ``[audit]`` keys, ``keys`` for the keyed chain,
``chain`` for the record format, ``log`` for durability and locking.

Event names other modules use: ``secret_fetched``, ``secret_injected``,
``child_exited``, ``refused``, ``signature_failure``, ``rotation_detected``;
any other ``[a-z][a-z0-9_]*`` name is accepted (the schema is open). The log
writes ``partial_tail``, ``pruned``, ``audit_keyed``, ``gap``, ``gap_acknowledged``
and ``anchor_failed`` itself (``gap``: records were lost; ``anchor``: the Vault witness). A field value
that is a ``broker.secret.Secret`` is refused with ``AuditError``.

Reading (imported only when used): ``verify.verify_files``,
``report.build_report``, ``prune.prune``.

This package imports only the standard library and ``broker.errors`` /
``broker.secret`` at import time, so ``credbroker run`` stays lean.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping
from typing import Any

from ..errors import AuditError
from ..secret import Secret
from .log import (
    CHILD_EXITED,
    REFUSED,
    ROTATION_DETECTED,
    SECRET_FETCHED,
    SECRET_INJECTED,
    SIGNATURE_FAILURE,
    AuditLog,
    check_fields,
)
from .settings import AuditSettings, load_settings

__all__ = [
    "CHILD_EXITED",
    "REFUSED",
    "ROTATION_DETECTED",
    "SECRET_FETCHED",
    "SECRET_INJECTED",
    "SIGNATURE_FAILURE",
    "AuditError",
    "AuditLog",
    "AuditSettings",
    "check_fields",
    "load_settings",
    "open_log",
]

_CACHE: dict[tuple[object, ...], AuditLog] = {}
_CACHE_LOCK = threading.Lock()


def open_log(
    audit_config: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    key: Secret | bytes | None = None,
) -> AuditLog:
    """The audit log ``[audit]`` describes (one shared instance per log and key in a process).

    ``env`` defaults to ``os.environ``; it supplies ``$CREDBROKER_AUDIT_LOG``,
    ``$XDG_STATE_HOME``, ``$CREDBROKER_AUDIT_KEY`` and the Vault settings used
    to fetch a key named by ``[audit] key``. ``key`` passes the HMAC key directly.
    Raises ``ConfigError`` for a bad ``[audit]`` table and ``AuditError`` when a
    configured key cannot be fetched (fail closed: no unkeyed writes then).
    """
    environ = os.environ if env is None else env
    settings = load_settings(audit_config, environ)
    from .settings import ENV_KEY

    env_key = environ.get(ENV_KEY) or ""
    explicit = key.reveal() if isinstance(key, Secret) else key
    # Cache on a digest of the key material, never the key itself.
    material = hashlib.sha256(b"credbroker/audit/cache\x00" + env_key.encode() + b"\x00" + (explicit or b"")).hexdigest()
    # The Vault address decides whether the head is anchored: part of the log's identity here.
    from ..vault.origins import value

    cache_key = (settings, material, key is None, value(environ, "VAULT_ADDR", "BAO_ADDR") or "")
    with _CACHE_LOCK:
        log = _CACHE.get(cache_key)
        if log is None:
            from .keys import resolve_key

            secret = resolve_key(settings.key_spec, environ, key=key)
            try:
                log = AuditLog(settings, secret, env=environ)
            finally:
                if secret is not None:
                    secret.wipe()
            _CACHE[cache_key] = log
    return log
