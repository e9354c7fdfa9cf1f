"""The one place signing talks to the audit log (``broker.audit``'s contract).

``open_log(config_audit_mapping_or_None).record(event, fields, durable=True)``.
Inside a child of ``credbroker run`` the audit settings come from the config
file the broker used (``CREDBROKER_CONFIG``, set by ``child_env``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..errors import AuditError, BrokerError


def audit_config_from_env(env: Mapping[str, str] | None = None) -> Mapping[str, Any] | None:
    """The ``[audit]`` table of the config file in use, or None (the audit log's defaults)."""
    from ..config import load

    environ = os.environ if env is None else env
    path = environ.get("CREDBROKER_CONFIG")
    config = load(path) if path else load()
    return config.audit or None


def record_event(event: str, fields: Mapping[str, Any], *, audit_config: Mapping[str, Any] | None = None,
                 durable: bool = True) -> None:
    """Append one event; AuditError (a BrokerError) when it cannot be written."""
    try:
        from ..audit import open_log
    except ImportError as exc:  # the audit module is missing: fail closed, say why
        raise AuditError("the audit log module (broker.audit) is not available", "reinstall credbroker") from exc
    if audit_config is None:
        audit_config = audit_config_from_env()
    try:
        open_log(audit_config).record(event, dict(fields), durable=durable)
    except BrokerError:
        raise
    except OSError as exc:
        raise AuditError(f"cannot write the audit log: {exc.strerror or type(exc).__name__}",
                         "check the audit log's folder and permissions") from exc
