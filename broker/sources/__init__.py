"""Secret sources: one interface, one module per backend.

A source module exposes::

    def fetch(profile: Profile, *, settings: VaultSettings | None) -> Credentials

which returns every field ``profile.fields`` names, or raises a ``SourceError``
subclass that says what failed and how to fix it (fail closed: never a partial
result). ``settings`` are the Vault settings the caller resolved once (a source
that does not speak to Vault ignores them), passed explicitly so the library
never depends on hidden global state.

Adding a backend: a new module here, a line in ``_REGISTRY``, and its option
names in ``config._SOURCE_KEYS``. Modules are imported only when a profile
uses them, so ``credbroker run`` with a keyring profile never pays for hvac.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from .. import childenv
from ..config import Profile
from ..errors import ConfigError, SourceError
from ..secret import Credentials, Secret, wipe_buffer

if TYPE_CHECKING:  # pragma: no cover
    from ..vault.settings import VaultSettings

_REGISTRY: dict[str, str] = {
    "vault": "broker.sources.vault",
    "keyring": "broker.sources.keyring",
}


class SourceModule(Protocol):
    """What every source module provides."""

    def fetch(self, profile: Profile, *, settings: VaultSettings | None) -> Credentials: ...


def get(name: str) -> SourceModule:
    """The module implementing source ``name``."""
    try:
        module_name = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown source {name!r}", f"use one of: {', '.join(_REGISTRY)}") from None
    module: SourceModule = importlib.import_module(module_name)
    return module


def fetch(profile: Profile, *, env: Mapping[str, str] | None = None, settings: VaultSettings | None = None,
          use_daemon: bool = True, isolate: bool = False) -> Credentials:
    """Fetch every field the profile names, or raise (fail closed).

    A vault profile goes through a running ``credbroker daemon`` when there is
    one (hvac already loaded there; see ``broker.daemon``), else in-process;
    with ``isolate`` (what ``credbroker run`` asks) in a forked child of this
    process, so no stray copy of the secret stays in this one. ``env`` (with
    ``[vault]`` beside it) is what crosses to the daemon or the child, which
    resolve their own settings from it; an in-process read uses ``settings``,
    resolved from ``env`` here only when the caller brought none.
    """
    env = os.environ if env is None else env
    for name in profile.fields:  # a profile built in code skips the config file's checks
        if not isinstance(name, str) or not name.strip() or not name.isprintable():
            raise ConfigError(f"profile {profile.name!r}: the field name {name!r} is empty or not printable",
                              "map each variable to a field name, e.g. env = { BINANCE_API_SECRET = \"api_secret\" }")
    creds = None
    if use_daemon and profile.source == "vault":
        from .. import daemon

        creds = daemon.fetch(profile, env)
        if creds is None and isolate:
            creds = daemon.fetch_isolated(profile, env)
    if creds is None:
        if settings is None and profile.source == "vault":
            from ..vault.settings import VaultSettings

            settings = VaultSettings.from_env(env)
        creds = get(profile.source).fetch(profile, settings=settings)
    missing = [f for f in profile.fields if f not in creds.fields]
    if missing:  # a source bug must never turn into a partially configured bot
        creds.wipe()
        raise SourceError(
            f"profile {profile.name!r}: source {profile.source} returned no value for {', '.join(missing)}",
            "this is a credbroker bug; please report it",
        )
    field = passphrase_field(profile)
    if field not in creds and any(_encrypted(s) for s in creds.values()):
        creds = _with_passphrase(profile, creds, field, env=env, settings=settings, use_daemon=use_daemon)
    return creds


#: Where a stored PEM key's passphrase lives unless ``[signer] passphrase_field`` says otherwise.
DEFAULT_PASSPHRASE_FIELD = "private_key_passphrase"


def passphrase_field(profile: Profile) -> str:
    """The field holding the passphrase of the profile's encrypted PEM key."""
    table = profile.sections.get("signer") if profile.sections else None
    name = table.get("passphrase_field") if isinstance(table, Mapping) else None
    return name if isinstance(name, str) and name else DEFAULT_PASSPHRASE_FIELD


def is_encrypted_pem(value: bytes | bytearray) -> bool:
    """True for an encrypted PEM private key (PKCS#8 ``ENCRYPTED PRIVATE KEY``, or OpenSSL's ``Proc-Type``).

    Looks in place (start/end indexes, no slice): a copy of a secret's head would outlive the check."""
    i = 0
    while i < len(value) and value[i] in b" \t\r\n":
        i += 1
    return value.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----", i) or (
        value.startswith(b"-----BEGIN ", i) and value.find(b"Proc-Type: 4,ENCRYPTED", i, i + 200) >= 0)


def _encrypted(secret: Secret) -> bool:
    buf = secret.reveal_buffer()
    try:
        return is_encrypted_pem(buf)
    finally:
        wipe_buffer(buf)


def _with_passphrase(profile: Profile, creds: Credentials, field: str, *, env: Mapping[str, str],
                     settings: VaultSettings | None, use_daemon: bool) -> Credentials:
    """``creds`` plus the passphrase field, read from the same secret version (fail closed).

    A key stored encrypted is useless without its passphrase, so it is read
    whether or not the profile maps it to a variable.
    """
    options = dict(profile.options)
    if creds.origin.version is not None and profile.source == "vault":
        options["version"] = creds.origin.version  # the passphrase of this very key, not of a newer one
    wider = profile._replace(env={**profile.env, childenv.KEY_PASSPHRASE: field}, options=options)
    try:
        more = fetch(wider, env=env, settings=settings, use_daemon=use_daemon)
    except SourceError as exc:
        creds.wipe()
        raise SourceError(f"profile {profile.name!r}: the stored private key is encrypted and its passphrase "
                          f"could not be read from the field {field!r} ({exc.message})",
                          f"store the passphrase in {field}, or store the key unencrypted") from exc
    fields = {name: creds[name] for name in creds}
    fields[field] = more[field]
    for name in more:
        if name != field:
            more[name].wipe()
    return Credentials(profile=creds.profile, origin=creds.origin, fields=fields)
