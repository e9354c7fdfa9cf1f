"""Several profiles in one run (``-p spot -p um-futures``): refused when they collide, fetched all or
none, combined into one view for the child's environment, described to ``get_signer`` in the child."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..config import Profile
from ..errors import BrokerError
from ..secret import Credentials
from .. import childenv
from .options import Recorder

if TYPE_CHECKING:  # pragma: no cover
    from ..vault.settings import VaultSettings

#: The separator of a combined profile's field names (``profile/field``): keys of the run's own view, never parsed back.
_SEP = "/"

def combine(profiles: Sequence[Profile], creds: Sequence[Credentials]) -> tuple[Profile, Credentials]:
    """One view of several profiles for the child's environment: every variable mapped to its profile's
    field, the secrets shared (not copied), so wiping the view wipes them all. One profile is itself."""
    if len(profiles) == 1:
        return profiles[0], creds[0]
    view = combined_profile(profiles)
    fields = {f"{p.name}{_SEP}{fld}": c[fld] for p, c in zip(profiles, creds) for fld in c}
    return view, Credentials(view.name, creds[0].origin, fields)

def combined_profile(profiles: Sequence[Profile]) -> Profile:
    """The profile half of ``combine``: each variable mapped to ``profile/field``."""
    if len(profiles) == 1:
        return profiles[0]
    env = {var: f"{p.name}{_SEP}{fld}" for p in profiles for var, fld in p.env.items()}
    # The source the separation check looks at: the keyring when any profile reads it (the bot could ask it).
    source = "keyring" if any(p.source == "keyring" for p in profiles) else profiles[0].source
    return Profile(name=",".join(p.name for p in profiles), source=source, env=env)

def fetch_all(profiles: Sequence[Profile], env: Mapping[str, str], rec: Recorder,
              refused: Callable[[BrokerError, Profile | None], None], *,
              settings: VaultSettings | None = None) -> list[Credentials]:
    """Every profile's secrets, or none: on the first failure what was fetched is wiped (each read that
    happened is still recorded, so the review never lists it as a read from outside) and the error raised."""
    try:
        return fetch_each(profiles, env, rec, refused, settings=settings)
    finally:
        daemon = sys.modules.get("broker.daemon")
        if daemon is not None:
            daemon.discard_prefork()  # an early fetch child no profile used (a keyring profile, a failure)


def fetch_each(profiles: Sequence[Profile], env: Mapping[str, str], rec: Recorder,
               refused: Callable[[BrokerError, Profile | None], None], *,
               settings: VaultSettings | None = None) -> list[Credentials]:
    """Each profile read through the one audited read (``access.read``, ``by="run"``), in a throwaway
    child; the run's own refusal record (with the command) when a read fails."""
    from ..access import read

    held: list[Credentials] = []
    for p in profiles:
        def refuse(exc: BrokerError, p: Profile = p) -> None:
            refused(exc, p)

        try:
            c = read(p, env=env, settings=settings, record=rec, by="run", isolate=True, on_refused=refuse)
        except BrokerError as exc:
            for done in held:
                done.wipe()
            if len(profiles) > 1 and f"{p.name!r}" not in exc.message:
                exc.message = f"profile {p.name!r}: {exc.message}"  # which of the run's profiles failed
                exc.args = (exc.message,)
            raise
        except BaseException:
            for done in held:
                done.wipe()
            raise
        held.append(c)
    return held


def profiles_env(profiles: Sequence[Profile], per_profile: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """The child's map of a several-profile run: ``CREDBROKER_PROFILES`` (JSON, no secret) tells
    ``get_signer("spot")`` which variables are whose; a secret one (a transit profile's scoped token, a
    passphrase) moves to a numbered variable the map names."""
    from ..signing import PROFILES_VAR, SECRET_CHILD_VARS

    out: dict[str, str] = {}
    table: dict[str, dict[str, Any]] = {}
    for n, (p, own) in enumerate(zip(profiles, per_profile), 1):
        values = {childenv.ENV_MAP: json.dumps(dict(p.env), separators=(",", ":")), **own}
        values.pop("CREDBROKER_CONFIG", None)  # one config for the run: the shared variable
        moved: dict[str, str] = {}
        for var in SECRET_CHILD_VARS:
            if var in values:
                moved[var] = f"{var}_{n}"
                out[moved[var]] = values.pop(var)
        table[p.name] = {"vars": values, "moved": moved}
    out[PROFILES_VAR] = json.dumps(table, separators=(",", ":"))
    env_map: dict[str, str] = {}
    for p in profiles:
        env_map.update(p.env)
    out[childenv.ENV_MAP] = json.dumps(env_map, separators=(",", ":"))
    out[childenv.PROFILE] = ",".join(p.name for p in profiles)
    return out
