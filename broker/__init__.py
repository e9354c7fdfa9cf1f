"""credbroker: exchange API secrets from Vault/OpenBao or the OS keyring, in memory only.

The public API is imported lazily so that ``credbroker run`` (which sits in
front of every bot start) loads only what it uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BrokerError",
    "Credentials",
    "Secret",
    "__version__",
    "fetch",
    "get_signer",
    "load_config",
]

if TYPE_CHECKING:  # pragma: no cover
    from .config import load as load_config
    from .errors import BrokerError
    from .secret import Credentials, Secret
    from .signing import get_signer
    from .access import fetch

_LAZY = {
    "BrokerError": ("broker.errors", "BrokerError"),
    "Credentials": ("broker.secret", "Credentials"),
    "Secret": ("broker.secret", "Secret"),
    "fetch": ("broker.access", "fetch"),
    "load_config": ("broker.config", "load"),
    "get_signer": ("broker.signing", "get_signer"),
}


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'broker' has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value
