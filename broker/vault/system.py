"""``sys/`` calls other than policies (those are ``token.write_policy``'s): each inside ``session.mapped``,
so a failure is a ``VaultError`` with a remedy. Callers outside ``broker.vault`` call these functions,
never the hvac client's ``sys`` or ``adapter``.
"""

from __future__ import annotations

from typing import Any

from .session import mapped
from .settings import VaultSettings
from .token import token_check


def audit_hash(client: Any, settings: VaultSettings, device: str, value: str) -> Any:
    """The raw HTTP answer of ``sys/audit-hash/<device>`` for ``value`` (the caller reads its JSON)."""
    path = f"sys/audit-hash/{device}"
    with mapped(settings, "hash a value with", path, client, token_valid=token_check(client), secrets=[value]):
        return client.adapter.post(f"/v1/{path}", json={"input": value})
