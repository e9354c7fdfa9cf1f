"""Every audit event name credbroker writes, and the one type of a function that records one.

The weekly review (``broker.audit.report``) and every writer name events through ``Event``, so a
typo is an AttributeError at import, not a record the review never counts. ``Event`` is a ``StrEnum``:
a member is its name as written in the log (``Event.SECRET_FETCHED == "secret_fetched"``). The log's
schema stays open (any ``[a-z][a-z0-9_]*`` is accepted when read), so records of other versions
still verify and show.

A leaf module: the standard library only.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Protocol

__all__ = ["Event", "Recorder"]


class Event(StrEnum):
    """The name of an audit record."""

    # A run: the read, the start, the end (the weekly review's "accesses", "injections", "exits").
    SECRET_FETCHED = "secret_fetched"
    SECRET_INJECTED = "secret_injected"
    COMMAND_ARGS = "command_args"  # the rest of a long command line (broker.cmdline)
    CHILD_EXITED = "child_exited"
    CHILD_RESTARTING = "child_restarting"
    REFUSED = "refused"
    PREFLIGHT = "preflight"
    # Rotation and the broker's own Vault token.
    ROTATION_DETECTED = "rotation_detected"
    ROTATION_CHECK_FAILED = "rotation_check_failed"
    TOKEN_RENEWED = "token_renewed"
    TOKEN_RELOGIN = "token_relogin"
    TOKEN_FAILED = "token_failed"
    TOKEN_LOOKUP_FAILED = "token_lookup_failed"
    # Signing: the agent, the proxy, the exchange's answers.
    SIGNED = "signed"
    POLICY_REFUSED = "policy_refused"
    AGENT_REFUSED = "agent_refused"
    AGENT_STARTED = "agent_started"
    AGENT_STOPPED = "agent_stopped"
    PROXY_STARTED = "proxy_started"
    PROXY_STOPPED = "proxy_stopped"
    PROXY_CLOCK_SYNCED = "proxy_clock_synced"
    PROXY_REQUEST = "proxy_request"
    PROXY_ANSWER = "proxy_answer"
    PROXY_REFUSED = "proxy_refused"
    PROXY_RATE_LIMITS = "proxy_rate_limits"  # the request-weight and order limits in force (proxy/weight.py)
    PROXY_KEY_ROTATED = "proxy_key_rotated"  # the proxy follows rotation itself (proxy/follow.py)
    PROXY_ROTATION_FAILED = "proxy_rotation_failed"
    LISTEN_KEY_CREATED = "listen_key_created"  # the listenKey keeper (signing/listenkey.py, proxy/listenkeys.py)
    LISTEN_KEY_KEPT_ALIVE = "listen_key_kept_alive"
    LISTEN_KEY_RECREATED = "listen_key_recreated"
    LISTEN_KEY_FAILED = "listen_key_failed"
    SIGNATURE_FAILURE = "signature_failure"
    # Admin commands.
    SECRET_IMPORTED = "secret_imported"
    PLAINTEXT_DELETED = "plaintext_deleted"
    KEYRING_SET = "keyring_set"
    KEYRING_DELETED = "keyring_deleted"
    # Written by the audit log itself.
    PARTIAL_TAIL = "partial_tail"
    PRUNED = "pruned"
    AUDIT_KEYED = "audit_keyed"
    GAP = "gap"
    GAP_ACKNOWLEDGED = "gap_acknowledged"
    ANCHOR_FAILED = "anchor_failed"


class Recorder(Protocol):
    """Writes one audit record: ``record(Event.SECRET_FETCHED, {"profile": ...})``.

    ``broker.audit.AuditLog.record`` is one; so is any ``lambda event, fields: ...`` a test collects with."""

    def __call__(self, event: str, fields: dict[str, Any], /) -> Any: ...

