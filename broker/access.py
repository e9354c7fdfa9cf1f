"""The one audited way to read a profile's secrets.

Every reader (``credbroker run``, ``check``, ``get_signer(profile=...)``, the
public ``broker.fetch``) calls :func:`fetch`: it opens the audit log before
anything is asked of a source (an access that cannot be recorded is never
made), fetches through the source registry, and records the outcome in one
schema, ``secret_fetched`` or ``refused``, each naming the reader (``by``).
A refusal that came after Vault answered (a field or version missing) carries
Vault's ``request_id`` too, so the weekly review's Vault cross-check matches
that read to the broker and never lists it as a read from outside.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config, Profile
from .errors import BrokerError, VaultError
from .secret import Credentials
from .events import Event, Recorder

if TYPE_CHECKING:  # pragma: no cover
    from .vault.settings import VaultSettings

#: ``record(event, fields)``: what every audited reader writes through.


def config_for(profile: Profile, config: Config | None = None) -> Config:
    """The config whose ``[vault]`` and ``[audit]`` tables apply to ``profile``: the one given, else the
    file the profile came from, else the documented search order."""
    if config is not None:
        return config
    from .config import load, parse_file

    return parse_file(Path(profile.origin)) if profile.origin else load()


def open_recorder(config: Config, environ: Mapping[str, str]) -> Recorder:
    """The audit log's ``record``, checked writable before anything is fetched (fail closed)."""
    from .audit import open_log

    log = open_log(config.audit or None, env=environ)
    log.check_writable()
    recorder: Recorder = log.record
    return recorder


def refusal(profile: Profile, exc: BrokerError, by: str, **context: Any) -> dict[str, Any]:
    """The ``refused`` record's fields for ``exc`` (with Vault's request id when Vault had answered)."""
    fields: dict[str, Any] = {"profile": profile.name, "source": profile.source, "error": type(exc).__name__,
                              "reason": exc.message, "by": by, **context}
    if isinstance(exc, VaultError) and exc.request_id:
        fields.update(request_id=exc.request_id, path=exc.secret_path)
    return fields


def record_refusal(record: Recorder, profile: Profile, exc: BrokerError, by: str, **context: Any) -> None:
    """Record ``exc`` as a refusal; a failure to record never hides the original error."""
    try:
        record(Event.REFUSED, refusal(profile, exc, by, **context))
    except BrokerError:
        pass  # the original failure is what the operator must see


def fetch(
    profile: Profile,
    *,
    config: Config | None = None,
    env: Mapping[str, str] | None = None,
    settings: VaultSettings | None = None,
    record: Recorder | None = None,
    by: str = "library",
    context: Mapping[str, Any] | None = None,
    use_daemon: bool = True,
) -> Credentials:
    """Every field ``profile`` names, read and recorded, or a ``BrokerError`` (recorded as refused).

    ``env`` is the environment (``VAULT_ADDR``...); the config's ``[vault]`` fills what it does not set.
    ``record`` defaults to the config's audit log. ``context`` adds fields to both records (the
    command, the pid). ``settings``: the caller's Vault settings when it resolved them already (a
    signer's refresh, check); else they are resolved once, where the read happens."""
    from .config import with_config_defaults

    cfg = config_for(profile, config)
    source_env = with_config_defaults(os.environ if env is None else env, cfg)
    rec = record if record is not None else open_recorder(cfg, source_env)
    return read(profile, env=source_env, settings=settings, record=rec, by=by, context=context,
                use_daemon=use_daemon)


def read(
    profile: Profile,
    *,
    env: Mapping[str, str],
    settings: VaultSettings | None = None,
    record: Recorder,
    by: str,
    context: Mapping[str, Any] | None = None,
    use_daemon: bool = True,
    isolate: bool = False,
    on_refused: Callable[[BrokerError], None] | None = None,
) -> Credentials:
    """The audited read itself, for a caller that has resolved its settings and holds the log: ``fetch``
    above, ``credbroker run`` (``by="run"``, in a throwaway child: ``isolate``), a run's rotation check
    (``"rotation"``) and the proxy's (``"proxy_rotation"``). Records ``secret_fetched`` with ``by``, or the
    refusal in the one schema (``on_refused``: the caller's own refusal record, with its context); a read
    that cannot be recorded is wiped, never handed out.

    ``settings`` are the caller's Vault settings, resolved once at its edge (a run, an import, a
    rotation's watcher); without them a vault profile's are resolved from ``env`` once, where the read
    happens (in this process, or in the daemon or the fetch child, from ``env`` with ``[vault]`` beside
    it, so a run whose fetch goes there never loads them here), and a failure to resolve them is the
    recorded refusal."""
    from .sources import fetch as source_fetch

    extra = dict(context or {})
    try:
        creds = source_fetch(profile, env=env, settings=settings, use_daemon=use_daemon, isolate=isolate)
    except BrokerError as exc:
        if on_refused is not None:
            on_refused(exc)
        else:
            record_refusal(record, profile, exc, by, **extra)
        raise
    try:
        record(Event.SECRET_FETCHED, {"profile": profile.name, **creds.origin.to_dict(),
                                      "fields": list(profile.fields), "by": by, **extra})
    except BaseException:
        creds.wipe()  # not recorded, not handed out
        raise
    return creds


def value_warnings(profile: Profile, creds: Credentials) -> list[str]:
    """One line per fetched value that would sign wrongly: a trailing newline or space (pasted with the
    value, or typed before Ctrl-D) makes every signature fail with -1022."""
    out = []
    for name in profile.fields:
        raw = creds[name].reveal()
        if raw[-1:] in (b"\n", b"\r"):
            out.append(f"field {name} of profile {profile.name} ends with a newline: every signature made with it "
                       "will fail (-1022); store it again without one (scripts/rotate-key strips it)")
        elif raw[-1:] in (b" ", b"\t") or raw[:1] in (b" ", b"\t"):
            out.append(f"field {name} of profile {profile.name} starts or ends with white space: check that it "
                       "was stored as the exchange gave it")
    return out
