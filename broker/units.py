"""Durations, sizes and rates: one parser each, for the config file, flags and environment variables.

Every parser takes ``what``, the setting as the user wrote it (``--grace``, ``cfg.toml: [audit] keep``,
``CREDBROKER_VAULT_TIMEOUT``), and raises a one-line ``ConfigError`` that names it and says what to
write. A leaf module: the standard library and ``errors`` only, so any layer may use it without
loading more of credbroker (a bot that sets ``refresh_interval`` loads this, not the runner).
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from urllib.parse import SplitResult

__all__ = ["DURATION_UNITS", "duration", "rate", "seconds", "size"]

#: Seconds per unit of a duration: ``45s``, ``30m``, ``12h``, ``90d``, ``2w``. (Numbers in settings are at
#: most 15 ASCII digits: int() refuses Python's 4,300 digits and more with a ValueError of its own.)
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*([0-9]{1,15})\s*([smhdw])\s*\Z")

#: Bytes per unit of a size; the binary units are the usual ones (``64MiB``, ``64M``), KB/MB/GB are decimal.
SIZE_UNITS = {
    "": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
}
_SIZE = re.compile(r"^\s*([0-9]{1,15})\s*(B|KiB|MiB|GiB|KB|MB|GB|K|M|G)?\s*\Z", re.IGNORECASE)

#: Seconds per unit of a rate: ``20/s``, ``100/m``, ``1000/hour``.
RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
              "h": 3600.0, "hour": 3600.0}
_RATE = re.compile(r"^\s*([1-9][0-9]{0,14})\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*\Z")


#: The longest duration any setting takes (10 years, in seconds).
MAX_SECONDS = 10 * 365 * 86400


def seconds(value: object, what: str, *, bare_seconds: bool = True) -> float:
    """``30s``/``5m``/``1h``/``2d``/``1w`` (or, with ``bare_seconds``, a number of seconds) -> seconds > 0.

    Without ``bare_seconds`` a plain number is refused: ``keep = 90`` could mean days as well as seconds."""
    if bare_seconds and isinstance(value, (int, float)) and not isinstance(value, bool):
        result = float(value)
    else:
        text = value.strip() if isinstance(value, str) else None
        m = _DURATION.match(text) if text is not None else None
        if m is not None:
            result = float(int(m.group(1)) * DURATION_UNITS[m.group(2)])
        else:
            try:
                if text is None or not bare_seconds:
                    raise ValueError(text)
                result = float(text)
            except ValueError:
                remedy = ("write seconds or a number and a unit, e.g. 30s, 5m, 1h" if bare_seconds
                          else "write a number and a unit, e.g. 7d, 12h, 2w, 90d")
                raise ConfigError(f"{what}: invalid duration {_shown(value)}", remedy) from None
    if not result > 0 or math.isinf(result):
        raise ConfigError(f"{what}: expected a duration > 0, got {_shown(value)}", "e.g. 30s, 5m, 1h")
    if result > MAX_SECONDS:
        # Past this, timers and socket timeouts overflow (OverflowError), and no setting means it.
        raise ConfigError(f"{what}: {_shown(value)} is longer than 10 years", "e.g. 30s, 5m, 1h, 90d")
    return result


def duration(value: object, what: str, *, bare_seconds: bool = False) -> timedelta:
    """The same durations as ``seconds``, as a ``timedelta`` (a plain number is refused unless ``bare_seconds``)."""
    return timedelta(seconds=seconds(value, what, bare_seconds=bare_seconds))


def size(value: object, what: str, *, minimum: int = 1) -> int:
    """``64MiB``, ``10M``, ``500KB`` or a whole number of bytes -> bytes >= ``minimum``."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size, got a boolean", 'write e.g. "64MiB"')
    if isinstance(value, int):
        result = value
    else:
        m = _SIZE.match(value) if isinstance(value, str) else None
        if not m:
            raise ConfigError(f"{what}: invalid size {_shown(value)}", 'write e.g. "64MiB"')
        result = int(m.group(1)) * SIZE_UNITS[(m.group(2) or "").lower()]
    if result < minimum:
        raise ConfigError(f"{what}: {result} bytes is too small", f"use at least {_show_size(minimum)}")
    return result


def rate(value: object, what: str) -> tuple[int, float]:
    """``20/s``, ``100/m``, ``1000/h`` -> (count, per seconds)."""
    m = _RATE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ConfigError(f"{what}: expected \"COUNT/s\", \"COUNT/m\" or \"COUNT/h\", got {_shown(value)}",
                          'e.g. rate_limit = "20/s"')
    return int(m.group(1)), RATE_UNITS[m.group(2)]


def split_url(value: str) -> SplitResult | None:
    """``urlsplit(value)``, or None when it cannot be read: an unclosed IPv6 bracket, a port that is not a
    number or not in 0-65535 (``urlsplit`` and ``.port`` raise ValueError for those, not a ConfigError)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - read for its check
    except ValueError:
        return None
    return parts


def _shown(value: object) -> str:
    """``value`` as an error message quotes it: its repr, at most ~60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...{text[-12:]} ({len(str(value))} characters)"


def _show_size(n: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n} bytes"
