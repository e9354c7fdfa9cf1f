"""The one check of every Vault path a user gives: KV paths, mounts, transit key names.

A segment that Vault (or an HTTP library on the way) would rewrite makes the request read another
secret than the one the audit record names: ``secret/bot/../other`` is read as ``secret/other``, an
empty segment (``a//b``) is collapsed by hvac, and ``%2e%2e`` is decoded by the server's HTTP layer.
So each of these is refused, never normalised:

- an empty segment (a leading ``/``, ``//``, a trailing ``/`` except one after a mount name);
- ``.`` and ``..``;
- ``%`` anywhere (percent-encoding), ``\\`` (another separator on some proxies), ``?`` and ``#``
  (they end the URL path), whitespace and control characters.

``scripts/lib-vault.sh`` (``cb_check_path``) applies the same rules to the admin scripts' arguments;
tests/integration/test_vault_paths.py runs both over one table of cases.
"""

from __future__ import annotations

from enum import StrEnum

from ..errors import ConfigError


class PathKind(StrEnum):
    """What a value names: its shape differs (a key name is a single segment)."""

    KV_PATH = "path"  # <mount>/<path> or the path inside a mount: one or more segments
    MOUNT = "mount"  # one or more segments; one trailing "/" allowed (``vault secrets list`` shows it)
    NAME = "name"  # a single segment: a transit key, a policy or role name


def problem(value: str, kind: PathKind) -> str | None:
    """Why ``value`` is not an acceptable ``kind``, or None when it is."""
    if kind is PathKind.MOUNT and value.endswith("/") and not value.endswith("//"):
        value = value[:-1]
    if not value:
        return "it is empty"
    for ch in value:
        if ch == "%":
            return "it has a '%' (percent-encoded characters are refused)"
        if ch == "\\":
            return "it has a backslash"
        if ch in "?#":
            return f"it has a {ch!r}"
        if ch.isspace() or not ch.isprintable():
            return "it has whitespace or a control character"
    segments = value.split("/")
    if kind is PathKind.NAME and len(segments) > 1:
        return "it has a '/' (a name is one segment)"
    for seg in segments:
        if seg == "":
            return "it has an empty segment (a leading, doubled or trailing '/')"
        if seg in (".", ".."):
            return f"it has a {seg!r} segment"
    return None


def check(value: object, kind: PathKind, where: str) -> str:
    """``value`` as a clean path of ``kind`` (a mount without its trailing ``/``); else a ConfigError.

    ``where`` names the value's origin for the one-line error: ``"--vault-path"``,
    ``"credbroker.toml: profiles.bot.path"``...
    """
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {type(value).__name__}", "quote the value")
    why = problem(value, kind)
    if why is not None:
        raise ConfigError(
            f"{where}: {value!r} is not a valid Vault {kind.value}: {why}",
            "write plain segments separated by single '/' (letters, digits, '-', '_', '.'), "
            "no '.', '..', empty or %-encoded segments",
        )
    return value[:-1] if kind is PathKind.MOUNT and value.endswith("/") else value
