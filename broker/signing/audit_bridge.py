"""The one place signing talks to the audit log (``broker.audit``'s contract).

``open_log(config_audit_mapping_or_None).record(event, fields, durable=True)``.
Inside a child of ``credbroker run`` the audit settings come from the config
file the broker used (``CREDBROKER_CONFIG``, set by ``child_env``).

A keyed audit log cannot be written by the child (the key stays with the
broker). When the broker gives the child a relay, ``CREDBROKER_AUDIT_FD``
(an inherited pipe/socket), events go through it instead, one JSON line
each: ``{"event": "signature_failure", "fields": {...}}``; the broker checks
the event name and records it with its own key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .. import childenv
from ..errors import AuditError, BrokerError


RELAY_FD_VAR = childenv.AUDIT_FD


def _relay(fd: int, event: str, fields: Mapping[str, Any]) -> None:
    """Send one event to the broker over the inherited relay descriptor."""
    import json

    line = json.dumps({"event": event, "fields": dict(fields)}, separators=(",", ":"), default=str) + "\n"
    data = line.encode("utf-8")
    if fd < 0 or len(data) > 4096:  # one write <= PIPE_BUF is atomic: no interleaving between threads
        raise AuditError(f"cannot relay the {event} event to credbroker ({RELAY_FD_VAR} is unusable)",
                         "this is a credbroker bug; please report it")
    try:
        os.write(fd, data)
    except OSError as exc:
        raise AuditError(f"cannot relay the {event} event to credbroker: {exc.strerror or type(exc).__name__}",
                         "the broker may have exited") from exc


def audit_config_from_env(env: Mapping[str, str] | None = None) -> Mapping[str, Any] | None:
    """The ``[audit]`` table of the config file in use, or None (the audit log's defaults)."""
    from ..config import load

    environ = os.environ if env is None else env
    path = environ.get("CREDBROKER_CONFIG")
    config = load(path) if path else load()
    return config.audit or None


def open_audit(audit_config: Mapping[str, Any] | None, env: Mapping[str, str] | None = None) -> Any:
    """The audit log (``broker.audit.open_log``), or AuditError/ConfigError when it cannot be opened."""
    try:
        from ..audit import open_log
    except ImportError as exc:  # the audit module is missing: fail closed, say why
        raise AuditError("the audit log module (broker.audit) is not available", "reinstall credbroker") from exc
    try:
        log = open_log(audit_config, env=env)
        log.check_writable()  # before any fetch: an access that cannot be recorded is not made
        return log
    except BrokerError:
        raise
    except OSError as exc:
        raise AuditError(f"cannot open the audit log: {exc.strerror or type(exc).__name__}",
                         "check the audit log's folder and permissions") from exc


def write(log: Any, event: str, fields: Mapping[str, Any], *, durable: bool = True) -> None:
    """``log.record(...)`` with OS errors turned into AuditError."""
    try:
        log.record(event, dict(fields), durable=durable)
    except BrokerError:
        raise
    except OSError as exc:
        raise AuditError(f"cannot write the audit log: {exc.strerror or type(exc).__name__}",
                         "check the audit log's folder and permissions") from exc


def record_event(event: str, fields: Mapping[str, Any], *, audit_config: Mapping[str, Any] | None = None,
                 durable: bool = True, env: Mapping[str, str] | None = None) -> None:
    """Append one event; AuditError (a BrokerError) when it cannot be written."""
    environ = os.environ if env is None else env
    relay = environ.get(RELAY_FD_VAR)
    if relay:
        _relay(int(relay) if relay.isascii() and relay.isdigit() else -1, event, fields)
        return
    if audit_config is None:
        audit_config = audit_config_from_env(environ)
    write(open_audit(audit_config, environ), event, fields, durable=durable)
