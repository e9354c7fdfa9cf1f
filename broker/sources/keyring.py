"""OS keyring source, through the ``keyring`` library.

A profile names a service (default ``credbroker/<profile>``); each secret
field is one entry of that service (``keyring``'s "username"). The backend is
whatever ``keyring`` selects for this session (Secret Service, macOS Keychain,
Windows Credential Locker, KWallet), unless the profile names one.

Fail closed: no usable backend, a locked keyring or a missing entry is an
error naming the service and field, never an empty value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import Profile
from ..errors import ConfigError, KeyringError, KeyringLocked, KeyringNotFound, KeyringUnavailable
from ..secret import Credentials, Origin, Secret
from .values import value_problem

if TYPE_CHECKING:  # pragma: no cover
    from ..vault.settings import VaultSettings


def service_for(profile: Profile) -> str:
    """The keyring service a profile's entries live under; an empty name, a control character or a
    ``.``/``..`` segment is refused, never replaced by the default (each would name another entry than
    the one the operator meant, and the audit record would name it too)."""
    service = profile.options.get("service")
    if service is None:
        return f"credbroker/{profile.name}"
    if not isinstance(service, str) or not service.strip() or not service.isprintable() or any(
            seg in (".", "..") for seg in service.split("/")):
        raise ConfigError(f"{profile.where('service')}: {service!r} is not a usable keyring service name",
                          'give a plain name, e.g. "credbroker/spot" (no empty name, control characters, '
                          "'.' or '..' segments)")
    return service


def backend_for(profile: Profile | None = None) -> Any:
    """The keyring backend to use; raises KeyringUnavailable when there is none."""
    import keyring
    import keyring.errors

    name = profile.options.get("backend") if profile is not None else None
    try:
        if name:
            from keyring.core import load_keyring

            backend = load_keyring(str(name))
        else:
            backend = keyring.get_keyring()
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(
            f"keyring backend {name!r} cannot be loaded ({type(exc).__name__})",
            "name a class as module.Class, e.g. keyring.backends.SecretService.Keyring, or omit backend",
        ) from exc
    except keyring.errors.KeyringError as exc:
        raise KeyringUnavailable(f"keyring backend {name!r} is not usable: {exc}", "omit backend") from exc
    kind = f"{type(backend).__module__}.{type(backend).__qualname__}"
    if kind.startswith(("keyring.backends.fail.", "keyring.backends.null.")):
        raise KeyringUnavailable(
            "no OS keyring is available in this session (no Secret Service on D-Bus, Keychain or Locker)",
            "start the desktop keyring (on a server: gnome-keyring-daemon in a D-Bus session), or use a vault profile",
        )
    return backend


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a backend raises when the keyring service does not answer: D-Bus errors of
    secretstorage and jeepney (Secret Service), and OSError (a socket, a file, a timeout).

    Anything else (a TypeError, a bug of ours or of a backend) is not "the keyring did not
    answer" and is left to surface as an internal error."""
    kinds: list[type[BaseException]] = [OSError]
    try:
        import secretstorage.exceptions

        kinds.append(secretstorage.exceptions.SecretStorageException)
    except ImportError:
        pass
    try:
        import jeepney

        kinds += [jeepney.DBusErrorResponse, jeepney.AuthenticationError, jeepney.SizeLimitError]
    except (ImportError, AttributeError):
        pass
    return tuple(kinds)


def call_backend(what: str, service: str, fn: Any, *args: Any, field: str | None = None) -> Any:
    """``fn(*args)`` on a keyring backend, its failures as credbroker's keyring errors (what names the act)."""
    import keyring.errors

    try:
        return fn(*args)
    except UnicodeDecodeError as exc:  # the backend holds bytes another program stored; keyring wants text
        entry = f"entry {field!r}" if field is not None else "an entry"
        raise KeyringError(f"the OS keyring's {entry} for service {service!r} is not UTF-8 text",
                           "store it again as text with `credbroker keyring set`") from exc
    except keyring.errors.KeyringLocked as exc:
        raise KeyringLocked(
            f"the OS keyring is locked; cannot {what} service {service!r}",
            "unlock it (log in to the desktop, or `gnome-keyring-daemon --unlock` with the password on stdin)",
        ) from exc
    except keyring.errors.NoKeyringError as exc:
        raise KeyringUnavailable(
            f"no OS keyring is available to {what} service {service!r}",
            "start the desktop keyring, or use a vault profile",
        ) from exc
    except keyring.errors.InitError as exc:
        raise KeyringUnavailable(f"the OS keyring failed to start ({type(exc).__name__})",
                                 "check the D-Bus session and the keyring daemon") from exc
    except keyring.errors.KeyringError as exc:
        raise KeyringError(f"the OS keyring failed to {what} service {service!r}: {type(exc).__name__}",
                           "check the keyring daemon") from exc
    except _transport_errors() as exc:
        raise KeyringUnavailable(
            f"the OS keyring did not answer while trying to {what} service {service!r} ({type(exc).__name__})",
            "check that the D-Bus session and the keyring daemon are running",
        ) from exc


def fetch(profile: Profile, *, settings: VaultSettings | None = None) -> Credentials:
    """Read every field the profile names from the keyring (fail closed); ``settings`` (Vault's) unused."""
    service = service_for(profile)  # a refused name fails before the backend is asked
    backend = backend_for(profile)
    fields: dict[str, Secret] = {}
    try:
        for name in profile.fields:
            value = call_backend("read", service, backend.get_password, service, name, field=name)
            if value is None:
                raise KeyringNotFound(
                    f"the OS keyring has no entry {name!r} for service {service!r}",
                    f"store it with `credbroker keyring set {profile.name} {name}`",
                )
            if not isinstance(value, str):
                raise KeyringError(f"the OS keyring's entry {name!r} for service {service!r} is not text "
                                   f"({type(value).__name__})", "check the keyring backend")
            fields[name] = Secret(value)
            del value
            why = value_problem(fields[name])
            if why is not None:
                raise (KeyringNotFound if why == "is empty" else KeyringError)(
                    f"the OS keyring's entry {name!r} for service {service!r} {why}",
                    f"store the value itself with `credbroker keyring set {profile.name} {name}`",
                )
    except BaseException:
        for secret in fields.values():
            secret.wipe()
        raise
    return Credentials(profile=profile.name, origin=Origin(source="keyring", path=service), fields=fields)


def store(profile: Profile, field: str, value: Secret) -> None:
    """Store one field's value in the keyring (used by `credbroker keyring set`)."""
    backend = backend_for(profile)
    service = service_for(profile)
    call_backend("write to", service, backend.set_password, service, field, value.reveal_str())


def delete(profile: Profile, field: str) -> None:
    """Delete one field's entry; KeyringNotFound when there is none."""
    import keyring.errors

    backend = backend_for(profile)
    service = service_for(profile)
    try:
        call_backend("delete from", service, backend.delete_password, service, field)
    except KeyringError as exc:
        if isinstance(exc.__cause__, keyring.errors.PasswordDeleteError):
            raise KeyringNotFound(f"the OS keyring has no entry {field!r} for service {service!r}",
                                  "nothing to delete") from None
        raise
