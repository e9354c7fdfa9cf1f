"""What every source refuses to hand a bot, in one place: each source asks ``value_problem`` of each
value it fetched, so all refuse the same values with the same words (a leaf: only ``broker.secret``)."""

from __future__ import annotations

from ..secret import Secret, wipe_buffer

#: The most bytes one field's value may hold. One environment string cannot exceed 128 KiB on Linux
#: (MAX_ARG_STRLEN: execve fails with E2BIG) and no exchange credential (an API secret, a PEM key) comes
#: near 64 KiB: a bigger value is a file stored by mistake, refused at the fetch rather than at the exec.
MAX_VALUE_BYTES = 64 * 1024


def value_problem(secret: Secret) -> str | None:
    """Why a fetched value cannot be handed to a bot ("is empty"...), or None; every source asks this
    of each value it fetched, so all refuse the same values with the same words. Never shows the value."""
    if not len(secret):
        return "is empty"
    if len(secret) > MAX_VALUE_BYTES:
        return f"is {len(secret)} bytes, more than the {MAX_VALUE_BYTES} a field may hold"
    buf = secret.reveal_buffer()
    try:
        if 0 in buf:
            return "holds a NUL byte, which no environment variable can carry"
    finally:
        wipe_buffer(buf)
    return None
