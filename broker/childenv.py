"""The broker <-> bot contract: every ``CREDBROKER_*`` variable ``credbroker run`` sets for its child.

The broker writes these (``runner``, ``agent``, ``proxy``, the transit signer's set-up) and the bot's
side reads them (``get_signer()``, the agent client, the audit bridge); both name them only through
this module, so the two sides cannot drift apart. None of them holds a secret except
``SIGNER_TOKEN`` (a short-lived token that may only sign) and ``PROXY_SECRET`` (the per-run secret
the bot's client signs with; never the exchange key).

A leaf module: the standard library only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = ["AGENT_SOCKET", "AUDIT_FD", "CONTRACT", "ENV_MAP", "KEY_KIND", "KEY_PASSPHRASE", "PROFILE", "PROFILES",
           "PROXY_SECRET", "PROXY_URL", "PROXY_WS_URL", "RUN", "SIGNER", "SIGNER_TOKEN", "encode_env_map", "env_map",
           "profile"]

#: Set in every child (the broker's pid): `credbroker run` inside it is refused, get_signer() knows where it is.
RUN = "CREDBROKER_RUN"
#: The profile the child runs under.
PROFILE = "CREDBROKER_PROFILE"
#: ``credbroker run -p A -p B``: per profile, its own values of the variables here (JSON, no secret).
PROFILES = "CREDBROKER_PROFILES"
#: JSON {variable: field}: which injected variable holds which field of the profile.
ENV_MAP = "CREDBROKER_ENV_MAP"
#: ``--agent``: the private socket of the signing agent.
AGENT_SOCKET = "CREDBROKER_AGENT_SOCKET"
#: The pipe the bot's signature failures travel to the broker's audit log through.
AUDIT_FD = "CREDBROKER_AUDIT_FD"
#: The key's kind (hmac, ed25519, rsa) when the bot does not hold the key itself (proxy, transit).
KEY_KIND = "CREDBROKER_KEY_KIND"
#: ``--proxy``: the signing proxy's loopback base URL, and the per-run secret the bot signs with.
PROXY_URL = "CREDBROKER_PROXY_URL"
PROXY_SECRET = "CREDBROKER_PROXY_SECRET"
#: The signing proxy's WebSocket API endpoint (``ws://127.0.0.1:PORT``), with ``credbroker[ws]``.
PROXY_WS_URL = "CREDBROKER_PROXY_WS_URL"
#: A transit profile: the signer's settings (JSON, no credential) and its scoped, short-lived token.
SIGNER = "CREDBROKER_SIGNER"
SIGNER_TOKEN = "CREDBROKER_SIGNER_TOKEN"
#: An encrypted key's passphrase that the profile maps to no variable of its own (named in ``ENV_MAP``).
KEY_PASSPHRASE = "CREDBROKER_KEY_PASSPHRASE"

#: Every variable of the contract (a stale copy in the broker's own environment is not passed on).
CONTRACT = frozenset({RUN, PROFILE, PROFILES, ENV_MAP, AGENT_SOCKET, AUDIT_FD, KEY_KIND, PROXY_URL, PROXY_SECRET,
                      PROXY_WS_URL, SIGNER, SIGNER_TOKEN, KEY_PASSPHRASE})


def encode_env_map(mapping: Mapping[str, str]) -> str:
    """The ``ENV_MAP`` value for ``{variable: field}``."""
    return json.dumps(dict(mapping), separators=(",", ":"))


def env_map(environ: Mapping[str, str]) -> dict[str, str]:
    """``{variable: field}`` from ``ENV_MAP``; empty when unset or not a JSON object of strings."""
    try:
        data = json.loads(environ.get(ENV_MAP) or "{}")
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): str(v) for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def profile(environ: Mapping[str, str]) -> str | None:
    """The profile the broker runs this process under, or None."""
    return environ.get(PROFILE) or None
