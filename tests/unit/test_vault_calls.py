"""Every Vault call goes through broker.vault (issue 10 item 3; DESIGN.md: vault/ settings, session, kv,
transit, token): no module outside broker/vault/ reaches into an hvac client's API groups itself.

The check reads every module's syntax tree and fails on an attribute chain ``<x>.secrets.<y>``,
``<x>.auth.<y>``, ``<x>.sys.<y>`` or ``<x>.adapter.<y>`` (hvac's ``client.secrets.kv.v2...``,
``client.auth.token...``, ``client.sys...``, ``client.adapter.post``) outside broker/vault/. Those calls
belong in broker.vault.kv / transit / token / system, wrapped in ``session.mapped``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import broker

BROKER = Path(broker.__file__).parent
HVAC_GROUPS = frozenset({"secrets", "auth", "sys", "adapter"})


def _hvac_chains(source: str, filename: str) -> list[str]:
    """``file:line: .group.attr`` for each attribute chain through one of hvac's API groups."""
    hits = sorted((node.lineno, node.col_offset, f".{node.value.attr}.{node.attr}")
                  for node in ast.walk(ast.parse(source, filename))
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                  and node.value.attr in HVAC_GROUPS)
    return [f"{filename}:{line}: {chain}" for line, _, chain in hits]


def test_no_module_outside_broker_vault_calls_hvac_client_methods() -> None:
    found: list[str] = []
    for path in sorted(BROKER.rglob("*.py")):
        rel = path.relative_to(BROKER)
        if rel.parts[0] == "vault":
            continue
        found += _hvac_chains(path.read_text(encoding="utf-8"), str(rel))
    assert found == [], "Vault calls outside broker/vault/ (move them into vault.kv/transit/token/system):\n" + \
        "\n".join(found)


def test_the_scan_sees_each_kind_of_call_and_nothing_else() -> None:
    sample = (
        "def f(client, self):\n"
        "    client.secrets.kv.v2.read_secret_version(path='p')\n"
        "    self._client.auth.token.renew_self()\n"
        "    client.sys.create_or_update_acl_policy(name='n', policy='')\n"
        "    client.adapter.post('/v1/x')\n"
        "    import sys, secrets\n"
        "    sys.exit(secrets.token_hex(4))\n"
        "    requests.get('u', auth=self)\n"
    )
    assert _hvac_chains(sample, "m.py") == [
        "m.py:2: .secrets.kv", "m.py:3: .auth.token", "m.py:4: .sys.create_or_update_acl_policy",
        "m.py:5: .adapter.post",
    ]
    # the vault package itself is where these calls live: the scan finds them there
    assert _hvac_chains((BROKER / "vault" / "kv.py").read_text(encoding="utf-8"), "kv.py")
