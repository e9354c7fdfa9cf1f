"""The broker's own lines for the operator: ``broker.console.say`` (a leaf every room may use)."""

from __future__ import annotations

from ..console import say

__all__ = ["say"]
