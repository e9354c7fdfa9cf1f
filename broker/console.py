"""The broker's own lines for the operator (stderr), never a secret value."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """One line for the operator on stderr, as credbroker (never a secret value)."""
    print(f"credbroker: {message}", file=sys.stderr, flush=True)
