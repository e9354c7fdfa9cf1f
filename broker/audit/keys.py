"""The audit chain's HMAC key: where it comes from, and how it is turned into bytes.

A keyed chain means that someone who can edit the log file, but cannot read
the key, cannot recompute the chain after an edit. Where the key comes from,
first match wins:

1. ``open_log(..., key=Secret)`` (code that already holds it; tests)
2. ``$CREDBROKER_AUDIT_KEY``: the key in hex (at least 32 hex digits = 16 bytes).
   ``config.BROKER_CREDENTIAL_VARS`` strips it from every child's environment.
3. ``[audit] key``, a reference fetched through ``broker.sources``:

   - ``"vault:MOUNT/PATH#FIELD"``: field FIELD of a KV v2 secret, e.g.
     ``vault:secret/credbroker/audit#key``
   - ``"keyring:SERVICE:FIELD"``: an OS keyring entry, e.g.
     ``keyring:credbroker/audit:key`` (the last ``:`` separates the field)
   - ``"file:PATH"``: a file of the broker's own (mode 0600; refused, as ssh
     refuses a key, when another user could read or change it)

A fetched value that is all hex digits (even length, >= 32) is decoded from
hex; any other value is used as raw bytes and must be at least 16 bytes long.
Create one with ``openssl rand -hex 32``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import NamedTuple

from ..errors import AuditError, BrokerError, ConfigError
from ..secret import Secret
#: The audit key in the environment (hex), when ``[audit] key`` names none.
ENV_KEY = "CREDBROKER_AUDIT_KEY"

MIN_KEY_BYTES = 16
_HEX = re.compile(rb"^(?:[0-9a-fA-F]{2}){16,}$")
#: Domain separation: the key id is a MAC of a fixed label, so it reveals nothing about the key.
_KID_LABEL = b"credbroker/audit/v1/key-id"
_KEY_FIELD_VAR = "CREDBROKER_AUDIT_KEY_"


class KeySpec(NamedTuple):
    """A parsed ``[audit] key`` reference (no secret in it)."""

    source: str  # "vault" | "keyring" | "file"
    location: str  # KV v2 MOUNT/PATH, keyring service, or file path
    field: str

    def __str__(self) -> str:
        if self.source == "file":
            return f"file:{self.location}"
        sep = "#" if self.source == "vault" else ":"
        return f"{self.source}:{self.location}{sep}{self.field}"


def parse_key_spec(spec: str) -> KeySpec:
    """``vault:MOUNT/PATH#FIELD`` or ``keyring:SERVICE:FIELD`` -> KeySpec, or ConfigError."""
    kind, sep, rest = spec.partition(":")
    hint = 'write key = "vault:MOUNT/PATH#FIELD", "keyring:SERVICE:FIELD" or "file:PATH"'
    if not sep or not rest:
        raise ConfigError(f"[audit] key: {spec!r} is not a key reference", hint)
    if kind == "file":
        return KeySpec("file", rest, "")
    if kind == "vault":
        location, hash_sep, field = rest.rpartition("#")
        location = location.strip("/")
        if not hash_sep or not location or "/" not in location or not field:
            raise ConfigError(f"[audit] key: {spec!r}: expected vault:MOUNT/PATH#FIELD", hint)
        return KeySpec("vault", location, field)
    if kind == "keyring":
        service, colon, field = rest.rpartition(":")
        if not colon or not service or not field:
            raise ConfigError(f"[audit] key: {spec!r}: expected keyring:SERVICE:FIELD", hint)
        return KeySpec("keyring", service, field)
    raise ConfigError(f"[audit] key: unknown key source {kind!r}", hint)


def key_bytes(value: bytes, what: str) -> bytes:
    """Hex-decode a hex key, else take the bytes as they are; at least 16 bytes either way."""
    value = value.strip()
    raw = bytes.fromhex(value.decode("ascii")) if _HEX.match(value) else value
    if len(raw) < MIN_KEY_BYTES:
        raise AuditError(
            f"the audit key from {what} is too short ({len(raw)} bytes)",
            "use at least 16 random bytes, e.g. the output of `openssl rand -hex 32`",
        )
    return raw


def key_id(key: bytes) -> str:
    """16 hex digits naming a key (a MAC of a fixed label); shown in records and messages."""
    return hmac.new(key, _KID_LABEL, hashlib.sha256).hexdigest()[:16]


def from_env(env: Mapping[str, str]) -> Secret | None:
    """``$CREDBROKER_AUDIT_KEY`` (hex) as a Secret, or None when unset."""
    text = env.get(ENV_KEY)
    if text is None or text == "":
        return None
    value = text.strip().encode("ascii", "replace")
    if not _HEX.match(value):
        # Never echo the value: say only what is wrong with it.
        raise AuditError(
            f"${ENV_KEY} is not a hex key of at least 32 hex digits",
            "set it to the output of `openssl rand -hex 32`, or unset it",
        )
    return Secret(bytes.fromhex(value.decode("ascii")))


def fetch_key(spec: KeySpec, env: Mapping[str, str]) -> Secret:
    """Fetch the key a reference names through ``broker.sources`` (fail closed)."""
    if spec.source == "file":
        return _read_key_file(spec.location)
    from ..config import Profile
    from ..sources import fetch

    options = {"path": spec.location} if spec.source == "vault" else {"service": spec.location}
    profile = Profile(name="audit-key", source=spec.source, env={_KEY_FIELD_VAR: spec.field}, options=options)
    try:
        creds = fetch(profile, env=env)
    except BrokerError as exc:
        raise AuditError(
            f"cannot fetch the audit key ({spec}): {exc.message}",
            exc.remedy or "check [audit] key",
        ) from exc
    try:
        return Secret(key_bytes(creds[spec.field].reveal(), str(spec)))
    finally:
        creds.wipe()


def _read_key_file(location: str) -> Secret:
    import os
    import stat

    from ..config import check_safe_path

    path = os.path.abspath(os.path.expanduser(location))
    check_safe_path(path, "the audit key file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise AuditError(f"cannot read the audit key file {path}: {exc.strerror}", "check [audit] key") from None
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"the audit key file {path} is accessible by other users (mode {mode:04o})",
                              f"chmod 600 {path}")
        raw = bytearray(os.read(fd, 4096))
    finally:
        os.close(fd)
    try:
        return Secret(key_bytes(bytes(raw), f"the audit key file {path}"))
    finally:
        raw[:] = bytes(len(raw))


def resolve_key(
    key_spec: str | None, env: Mapping[str, str], *, key: Secret | bytes | None = None
) -> Secret | None:
    """The audit key by the documented order, or None for an unkeyed chain."""
    if key is not None:
        if isinstance(key, Secret):
            return Secret(key_bytes(key.reveal(), "the caller"))
        return Secret(key_bytes(bytes(key), "the caller"))
    from_environment = from_env(env)
    if from_environment is not None:
        return from_environment
    if key_spec:
        return fetch_key(parse_key_spec(key_spec), env)
    return None
