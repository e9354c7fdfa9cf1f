"""Secret sources: one interface, one module per backend.

A source module exposes::

    def fetch(profile: Profile, *, env: Mapping[str, str]) -> Credentials

which returns every field ``profile.fields`` names, or raises a ``SourceError``
subclass that says what failed and how to fix it (fail closed: never a partial
result). ``env`` is the environment to read settings from (``VAULT_ADDR``...),
passed explicitly so the library never depends on hidden global state.

Adding a backend: a new module here, a line in ``_REGISTRY``, and its option
names in ``config._SOURCE_KEYS``. Modules are imported only when a profile
uses them, so ``credbroker run`` with a keyring profile never pays for hvac.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Protocol

from ..config import Profile
from ..errors import ConfigError, SourceError
from ..secret import Credentials

_REGISTRY: dict[str, str] = {
    "vault": "broker.sources.vault",
    "keyring": "broker.sources.keyring",
}


class SourceModule(Protocol):
    """What every source module provides."""

    def fetch(self, profile: Profile, *, env: Mapping[str, str]) -> Credentials: ...


def get(name: str) -> SourceModule:
    """The module implementing source ``name``."""
    try:
        module_name = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown source {name!r}", f"use one of: {', '.join(_REGISTRY)}") from None
    module: SourceModule = importlib.import_module(module_name)
    return module


def fetch(profile: Profile, *, env: Mapping[str, str] | None = None, use_daemon: bool = True,
          isolate: bool = False) -> Credentials:
    """Fetch every field the profile names, or raise (fail closed).

    A vault profile goes through a running ``credbroker daemon`` when there is
    one (hvac already loaded there; see ``broker.daemon``), else in-process;
    with ``isolate`` (what ``credbroker run`` asks) in a forked child of this
    process, so no stray copy of the secret stays in this one.
    """
    env = os.environ if env is None else env
    creds = None
    if use_daemon and profile.source == "vault":
        from .. import daemon

        creds = daemon.fetch(profile, env)
        if creds is None and isolate:
            creds = daemon.fetch_isolated(profile, env)
    if creds is None:
        creds = get(profile.source).fetch(profile, env=env)
    missing = [f for f in profile.fields if f not in creds.fields]
    if missing:  # a source bug must never turn into a partially configured bot
        creds.wipe()
        raise SourceError(
            f"profile {profile.name!r}: source {profile.source} returned no value for {', '.join(missing)}",
            "this is a credbroker bug; please report it",
        )
    return creds
