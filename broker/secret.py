"""The only types in credbroker that hold secret bytes.

``Secret`` keeps its value in a ``bytearray`` (mutable, so it can be wiped),
locked into RAM with ``mlock`` where the system allows, and never shows it in
``repr``/``str``/``format``; it refuses to be pickled or copied. Revealing is
explicit and greppable: ``secret.reveal()``.

``Credentials`` is what a source returns: the fields a profile named, each a
``Secret``, plus where they came from (source, path, version) for the audit
log.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, NoReturn

_MASK = "********"


def mask_id(value: str, keep: int = 4) -> str:
    """Show an identifier masked to its last ``keep`` characters, as aws-vault does."""
    if len(value) <= keep:
        return "*" * len(value)
    return "*" * min(8, len(value) - keep) + value[-keep:]


class _Libc:
    """mlock/munlock through libc, loaded on first use, best effort."""

    _lib: ctypes.CDLL | None = None
    _tried = False

    @classmethod
    def get(cls) -> ctypes.CDLL | None:
        if not cls._tried:
            cls._tried = True
            try:
                # The process's own symbol table already has libc; find_library
                # would run `ldconfig -p` in a subprocess at every start.
                lib = ctypes.CDLL(None, use_errno=True)
                lib.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
                lib.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
                cls._lib = lib
            except (OSError, AttributeError):
                cls._lib = None
        return cls._lib


def _buffer_address(buf: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


def wipe_buffer(buf: bytearray) -> None:
    """Overwrite a mutable buffer that held secret bytes (a received frame, say) with zeros."""
    if len(buf):
        ctypes.memset(_buffer_address(buf), 0, len(buf))


class Secret:
    """Secret bytes: masked when printed, wipeable, compared in constant time."""

    __slots__ = ("_buf", "_locked", "__weakref__")

    def __init__(self, value: bytes | bytearray | memoryview | str) -> None:
        if isinstance(value, str):
            value = value.encode("utf-8")
        self._buf = bytearray(value)
        self._locked = False
        if self._buf:
            lib = _Libc.get()
            if lib is not None:
                # May fail under a low RLIMIT_MEMLOCK; the secret stays usable.
                self._locked = lib.mlock(_buffer_address(self._buf), len(self._buf)) == 0

    # -- revealing: explicit, greppable -------------------------------------------------
    def reveal(self) -> bytes:
        """Return the secret bytes. Every call site is a place the secret leaves this type."""
        self._check_alive()
        return bytes(self._buf)

    def reveal_buffer(self) -> bytearray:
        """A mutable copy of the secret bytes, for an API that takes a buffer; the caller
        wipes it (``wipe_buffer``) as soon as it is done, so no copy outlives its use."""
        self._check_alive()
        return bytearray(self._buf)

    def reveal_str(self) -> str:
        """Return the secret decoded as UTF-8."""
        return self.reveal().decode("utf-8")

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def wiped(self) -> bool:
        """True once ``wipe()`` has run."""
        return self._buf is None

    @property
    def memory_locked(self) -> bool:
        """True when ``mlock`` kept the buffer out of swap."""
        return self._locked

    def wipe(self) -> None:
        """Overwrite the buffer with zeros and release it. Idempotent."""
        buf = self._buf
        if buf is None:
            return
        n = len(buf)
        if n:
            ctypes.memset(_buffer_address(buf), 0, n)
            if self._locked:
                lib = _Libc.get()
                if lib is not None:
                    lib.munlock(_buffer_address(buf), n)
        self._buf = None  # type: ignore[assignment]
        self._locked = False

    def __del__(self) -> None:
        try:
            self.wipe()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def _check_alive(self) -> None:
        if self._buf is None:
            raise ValueError("this Secret has been wiped")

    # -- never shown, never copied ------------------------------------------------------
    def __repr__(self) -> str:
        return f"Secret({_MASK})" if not self.wiped else "Secret(<wiped>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        import hmac  # constant-time comparison; imported here to keep start-up lean

        if isinstance(other, Secret):
            return hmac.compare_digest(self.reveal(), other.reveal())
        if isinstance(other, (bytes, bytearray)):
            return hmac.compare_digest(self.reveal(), bytes(other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError("a Secret cannot be copied; pass the same object")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("a Secret cannot be copied; pass the same object")


class Origin(NamedTuple):
    """Where a set of secrets came from, for the audit log. Holds no secret."""

    source: str  # "vault" | "keyring" | ...
    path: str  # "secret/credbroker/um-futures", or the keyring service
    version: int | None = None  # KV v2 version; None where the source has none
    address: str | None = None  # the Vault server, where there is one
    #: Vault's request_id of the read: the same id its audit device logs, so the
    #: weekly review can match each broker fetch to exactly one Vault read.
    request_id: str | None = None
    #: The Vault namespace (Enterprise/OpenBao), where one was used: with the
    #: address and path it names the secret, so the review never mixes two Vaults.
    namespace: str | None = None
    #: How the read was made: "daemon" (a running credbroker daemon), "child" (a throwaway child of
    #: the broker), or None (in this process). For `run -v` and the audit record, never for matching.
    via: str | None = None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"source": self.source, "path": self.path, "version": self.version,
                                  "address": self.address}
        if self.request_id is not None:
            out["request_id"] = self.request_id
        if self.namespace:
            out["namespace"] = self.namespace
        if self.via:
            out["via"] = self.via
        return out


class Credentials(Mapping[str, Secret]):
    """The secret fields of one profile, by field name, with their origin. Immutable."""

    __slots__ = ("profile", "origin", "fields")
    profile: str
    origin: Origin
    fields: Mapping[str, Secret]

    def __init__(self, profile: str, origin: Origin, fields: Mapping[str, Secret]) -> None:
        object.__setattr__(self, "profile", profile)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "fields", dict(fields))

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError("Credentials are immutable")

    def __getitem__(self, name: str) -> Secret:
        return self.fields[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def __repr__(self) -> str:
        names = ", ".join(sorted(self.fields))
        return f"Credentials(profile={self.profile!r}, origin={self.origin!r}, fields=[{names}])"

    __str__ = __repr__

    def wipe(self) -> None:
        """Wipe every field's secret bytes."""
        for secret in self.fields.values():
            secret.wipe()

    def __reduce__(self) -> NoReturn:
        raise TypeError("Credentials cannot be pickled")
