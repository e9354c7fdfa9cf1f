"""Vault connection settings: they live in ``broker.vault.settings``; these names stay importable here."""

from __future__ import annotations

from ..vault.settings import DEFAULT_ADDR, DEFAULT_TIMEOUT, VaultSettings

__all__ = ["DEFAULT_ADDR", "DEFAULT_TIMEOUT", "VaultSettings"]
