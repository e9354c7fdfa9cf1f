"""``get_signer()``: sign Binance requests in code, the key local or inside Vault's transit engine.

::

    from broker import get_signer

    signer = get_signer()                      # inside `credbroker run --profile P -- python bot.py`
    signer = get_signer(profile="um-futures")  # anywhere else: fetched like `run`, audited

    query = signer.sign_params({"symbol": "BTCUSDT", "side": "BUY", "type": "MARKET", "quantity": "0.01"})
    requests.post(BASE + "/fapi/v1/order?" + query, headers=signer.headers())
    requests.get(BASE + "/fapi/v2/account", auth=signer)         # signs, and records key trouble

Signer kinds (one module each, one interface: ``base.Signer``): HMAC-SHA256
(hex), Ed25519 (base64), RSA PKCS#1 v1.5 SHA-256 (base64), and Vault transit
(Ed25519 inside Vault, base64). The kind comes from ``[profiles.P.signer]
type`` or, by default, from the stored key: a PEM block is Ed25519 or RSA, a
plain string is an HMAC secret.

Binance answers that mean key trouble (-1021, -1022, -2014, -2015, HTTP 401)
become ``signature_failure`` audit events: automatically when the signer is
``requests`` auth, through ``report_response(...)`` for any other client.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import childenv
from ..errors import BrokerError, ConfigError, SigningError
from ..secret import Secret
from .base import ApiKey, Signer
from .failures import SignatureFailure, report_response
from .settings import SignerSettings

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config, Profile
    from ..vault.settings import VaultSettings

__all__ = [
    "ApiKey",
    "SignatureFailure",
    "Signer",
    "SignerSettings",
    "child_env",
    "release_child_env",
    "signer_class",
    "get_signer",
    "key_env",
    "make_signer",
    "report_response",
]

#: Set by ``credbroker run`` in its child (see broker.runner).
RUN_VAR = childenv.RUN
PROFILE_VAR = childenv.PROFILE
ENV_MAP_VAR = childenv.ENV_MAP
#: Set by ``child_env``: the signer settings (JSON, no secret) and, for transit, the scoped token.
SIGNER_VAR = childenv.SIGNER
SIGNER_TOKEN_VAR = childenv.SIGNER_TOKEN
#: Set by ``key_env``: the key's kind, and an encrypted key's passphrase that the profile maps to no variable.
KEY_KIND_VAR = childenv.KEY_KIND
KEY_PASSPHRASE_VAR = childenv.KEY_PASSPHRASE
#: Set by ``credbroker run -p A -p B`` (several profiles): per profile, its own values of the variables above
#: (JSON, no secret: a secret one is moved to a numbered variable that the entry names).
PROFILES_VAR = childenv.PROFILES
#: The per-profile variables whose values are secret: never inside ``CREDBROKER_PROFILES``.
SECRET_CHILD_VARS = (SIGNER_TOKEN_VAR, KEY_PASSPHRASE_VAR)


def get_signer(
    profile: str | Profile | None = None,
    *,
    config: Config | str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    recv_window: int | None = None,
    record_failures: bool = True,
    refresh_interval: float | None = None,
) -> Signer:
    """A Signer for ``profile``, or for the profile ``credbroker run`` started this process with.

    With no profile, this must run inside ``credbroker run``: the signer is
    built from what the broker provided (the mapped variables, and for a
    transit profile a token that can only sign). With a profile, its secrets
    are fetched through the same sources and config as ``run``, the access is
    recorded in the audit log (``secret_fetched``), and the fetched copies are
    wiped once the signer holds its key. Such a signer follows key rotation
    without a restart (``signer.refresh()``, every ``refresh_interval``
    seconds, and after a key error from the exchange; see ``refresh``).
    Raises a BrokerError subclass.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    name = getattr(profile, "name", profile)
    if environ.get(RUN_VAR) and environ.get(PROFILES_VAR) and (profile is None or isinstance(profile, str)):
        environ = _profile_view(environ, profile)  # `credbroker run -p A -p B`: one signer per profile
    if environ.get(RUN_VAR) and (profile is None or (isinstance(profile, str) and profile == environ.get(PROFILE_VAR))):
        if environ.get(childenv.AGENT_SOCKET):  # `credbroker run --agent`: the broker signs (issue 6)
            from .agent import from_environment

            return from_environment(environ, recv_window=recv_window, record_failures=record_failures)
        return _from_run(environ, recv_window=recv_window, record_failures=record_failures)
    if profile is None:
        raise ConfigError(
            "get_signer() without a profile works only inside `credbroker run`",
            'pass get_signer(profile="NAME"), or start the bot with `credbroker run --profile NAME -- ...`',
        )
    from ..config import Config as _Config
    from ..config import Profile as _Profile
    from ..config import load

    cfg = config if isinstance(config, _Config) else load(config)
    prof = profile if isinstance(profile, _Profile) else cfg.profile(str(name))
    settings = SignerSettings.for_profile(prof)
    from ..access import fetch
    from ..config import with_config_defaults

    source_env = with_config_defaults(environ, cfg)
    from .audit_bridge import open_audit, write

    # As `credbroker run` does: a log that cannot be written stops us before any fetch (fail closed).
    log = open_audit(cfg.audit or None, source_env)

    def record(event: str, fields: Mapping[str, Any]) -> None:
        write(log, event, fields)

    # The Vault settings, resolved once for this signer: its reads, its transit client, its version checks.
    vault_settings = None
    if prof.source == "vault" or settings.type == "transit":
        from ..access import record_refusal
        from ..vault.settings import VaultSettings

        try:
            vault_settings = VaultSettings.from_env(source_env)
        except BrokerError as exc:
            record_refusal(record, prof, exc, "get_signer", pid=os.getpid())
            raise

    def build() -> tuple[Signer, int | None]:
        """Fetch (audited, the one way every reader does) and build the signer; the fetched copies are
        wiped once it holds its key."""
        creds = fetch(prof, config=cfg, env=environ, settings=vault_settings, by="get_signer",
                      context={"pid": os.getpid()}, record=record)
        try:
            fields = {f: creds[f] for f in creds}
            client = None
            if settings.type == "transit":
                from ..vault.token import open_client

                assert vault_settings is not None
                client = open_client(vault_settings)
            signer = make_signer(
                settings,
                fields,
                profile=prof.name,
                where=prof.where("signer"),
                recv_window=recv_window,
                audit_config=cfg.audit or None,
                record_failures=record_failures,
                vault_client=client,
                vault_settings=vault_settings,
            )
            return signer, creds.origin.version
        finally:
            creds.wipe()

    # Follow rotation in-process (issue 5): a vault secret that is not pinned has
    # a cheap version check; other sources are re-fetched on refresh().
    latest = None
    pinned = prof.options.get("version") is not None
    if prof.source == "vault" and not pinned:
        from ..sources.vault import current_version

        def latest() -> int | None:
            assert vault_settings is not None
            return current_version(prof, vault_settings)

    from .refresh import RefreshingSigner

    interval = refresh_interval if refresh_interval is not None else settings.refresh_interval
    refreshing = RefreshingSigner(build, latest=latest, record=lambda event, fields: write(log, event, fields),
                                  profile=prof.name, interval=None if pinned else interval)
    _sync_at_start(refreshing, settings)
    return refreshing


def _sync_at_start(signer: Signer, settings: SignerSettings) -> None:
    """Learn the exchange's clock offset when the profile names the exchange; a failure is one warning."""
    if not settings.exchange_url:
        return
    try:
        signer.sync_clock(settings.exchange_url)
    except SigningError as exc:
        import sys

        print(f"credbroker: WARNING: {exc.message}; timestamps use this host's clock until the exchange "
              "answers -1021", file=sys.stderr, flush=True)


#: Signer kind -> "module:class". A new kind is a new module and a line here
#: (and its name in settings.KINDS); modules load only when a profile uses them.
_REGISTRY: dict[str, str] = {
    "hmac": "broker.signing.hmac_sha256:HmacSigner",
    "ed25519": "broker.signing.ed25519:Ed25519Signer",
    "rsa": "broker.signing.rsa:RsaSigner",
    "transit": "broker.signing.transit:TransitSigner",
}


def signer_class(kind: str) -> type[Signer]:
    """The Signer subclass implementing ``kind``."""
    import importlib

    try:
        module_name, _, attr = _REGISTRY[kind].partition(":")
    except KeyError:
        raise ConfigError(f"unknown signer type {kind!r}", f"use one of: {', '.join(_REGISTRY)}") from None
    cls = getattr(importlib.import_module(module_name), attr)
    assert isinstance(cls, type) and issubclass(cls, Signer)
    return cls


def make_signer(
    settings: SignerSettings,
    fields: Mapping[str, Secret],
    *,
    profile: str | None = None,
    where: str = "signer",
    recv_window: int | None = None,
    audit_config: Mapping[str, Any] | None = None,
    record_failures: bool = True,
    vault_client: Any = None,
    vault_settings: Any = None,
    token_ttl: float | None = None,
    missing_settings: bool = False,
) -> Signer:
    """Build the signer ``settings`` call for from secret ``fields`` (by KV field name)."""
    common: dict[str, Any] = {
        "recv_window": recv_window if recv_window is not None else settings.recv_window,
        "profile": profile,
        "audit_config": audit_config,
        "record_failures": record_failures,
    }
    api_key = fields.get(settings.api_key_field)
    if settings.type == "transit":
        if vault_client is None:
            raise SigningError(f"{where}: a transit signer needs a Vault client", "this is a credbroker bug")
        assert settings.transit_key is not None
        transit: Any = signer_class("transit")  # subclasses' constructors differ from the base's
        made: Signer = transit(api_key, vault_client, vault_settings, key=settings.transit_key,
                               mount=settings.transit_mount, token_ttl=token_ttl,
                               key_version=settings.transit_key_version, **common)
        return made
    if api_key is None:
        raise ConfigError(
            f"{where}: no {settings.api_key_field!r} field was fetched for the API key",
            f'map it in the profile\'s env, e.g. BINANCE_API_KEY = "{settings.api_key_field}"',
        )
    key_field = settings.key_field or next((f for f in ("private_key", "api_secret") if f in fields), None)
    if key_field is None or key_field not in fields:
        wanted = settings.key_field or "private_key or api_secret"
        raise ConfigError(
            f"{where}: no signing key field ({wanted}) was fetched",
            'map it in the profile\'s env, e.g. BINANCE_API_SECRET = "api_secret"'
            + ("; for a transit profile, the runner must pass broker.signing.child_env() to the child"
               if missing_settings else ""),
        )
    secret = fields[key_field]
    from . import core

    passphrase = fields.get(settings.passphrase_field)
    pem = secret.reveal()
    if core.looks_like_pem(pem):
        detected, key = core.load_private_key(pem, passphrase.reveal() if passphrase else None)
    else:
        detected, key = "hmac", None
    del pem
    if settings.type not in ("auto", detected):
        raise ConfigError(
            f"{where}.type is {settings.type!r} but the key stored in {key_field!r} is {detected}",
            "fix the signer type, or store the right key",
        )
    # Local kinds share one constructor shape: (api_key, secret-or-key-object, **common).
    local: Any = signer_class(detected)
    signer: Signer = local(api_key, secret if key is None else key, **common)
    return signer


def key_env(profile: Profile, creds: Mapping[str, Secret]) -> dict[str, str]:
    """Variables that tell the bot about its key (env mode): ``CREDBROKER_KEY_KIND`` (hmac, ed25519, rsa).

    When the key is an encrypted PEM and the profile maps its passphrase to no
    variable (the broker read it anyway: ``broker.sources.fetch``), the
    passphrase goes in ``CREDBROKER_KEY_PASSPHRASE`` and ``CREDBROKER_ENV_MAP``
    names it, so ``get_signer()`` and the bot's client can open the key. Never
    raises: a key that does not load is reported where it is used.
    """
    from . import core

    try:
        settings = SignerSettings.for_profile(profile)
    except BrokerError:
        return {}
    key_field = settings.key_field or next((f for f in ("private_key", "api_secret") if f in creds), None)
    if settings.type == "transit" or key_field is None or key_field not in creds:
        return {}
    out: dict[str, str] = {}
    passphrase = creds.get(settings.passphrase_field)
    pem = creds[key_field].reveal()
    try:
        kind = core.load_private_key(pem, passphrase.reveal() if passphrase else None)[0] \
            if core.looks_like_pem(pem) else "hmac"
        out[KEY_KIND_VAR] = kind
    except SigningError:
        pass
    finally:
        del pem
    if passphrase is not None and settings.passphrase_field not in profile.env.values():
        out[KEY_PASSPHRASE_VAR] = passphrase.reveal_str()
        out[ENV_MAP_VAR] = json.dumps({**profile.env, KEY_PASSPHRASE_VAR: settings.passphrase_field},
                                      separators=(",", ":"))
    return out


def _json_env(environ: Mapping[str, str], var: str, default: Any) -> Any:
    raw = environ.get(var)
    if raw is None or raw == "":
        return default
    try:
        return json.loads(raw)
    except ValueError:
        raise SigningError(f"{var} is not valid JSON", "it is set by `credbroker run`; do not edit it") from None


def _profile_view(environ: Mapping[str, str], name: str | None) -> Mapping[str, str]:
    """Inside a run of several profiles: the environment as a run of profile ``name`` alone would have set
    it (its env map, signer settings, key kind, scoped token); unchanged for a profile the run does not hold."""
    table = _json_env(environ, PROFILES_VAR, {})
    if not isinstance(table, dict):
        raise SigningError(f"{PROFILES_VAR} is malformed", "it is set by `credbroker run`; do not edit it")
    if name is None:
        raise ConfigError(
            f"this bot runs with several profiles ({', '.join(table)}): get_signer() needs to know which",
            f'name it: get_signer("{next(iter(table), "PROFILE")}")',
        )
    entry = table.get(name)
    if not isinstance(entry, dict):
        return environ
    view = {k: v for k, v in environ.items()
            if k not in (PROFILES_VAR, ENV_MAP_VAR, SIGNER_VAR, KEY_KIND_VAR, *SECRET_CHILD_VARS)}
    values, moved = entry.get("vars") or {}, entry.get("moved") or {}
    if not isinstance(values, dict) or not isinstance(moved, dict):
        raise SigningError(f"{PROFILES_VAR} is malformed", "it is set by `credbroker run`; do not edit it")
    view.update({str(k): str(v) for k, v in values.items()})
    view.update({str(k): environ.get(str(v), "") for k, v in moved.items()})
    view[PROFILE_VAR] = name
    return view


def _from_run(environ: Mapping[str, str], *, recv_window: int | None, record_failures: bool) -> Signer:
    """The signer inside a child of ``credbroker run``: from the variables the broker set."""
    profile = environ.get(PROFILE_VAR) or None
    env_map = _json_env(environ, ENV_MAP_VAR, None)
    if not isinstance(env_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env_map.items()):
        raise SigningError(f"{ENV_MAP_VAR} is missing or malformed", "start the bot with `credbroker run --profile NAME`")
    raw_settings = _json_env(environ, SIGNER_VAR, {})
    if not isinstance(raw_settings, dict):
        raise SigningError(f"{SIGNER_VAR} is malformed", "it is set by `credbroker run`; do not edit it")
    vault: dict[str, Any] = raw_settings.pop("vault", None) or {}
    ttl = raw_settings.pop("token_ttl_seconds", None)
    settings = SignerSettings.from_mapping(raw_settings, f"{SIGNER_VAR} (profile {profile})")
    fields: dict[str, Secret] = {}
    for var, field_name in env_map.items():
        value = environ.get(var)
        if value:
            fields[field_name] = Secret(value)
    client = vault_settings = None
    if settings.type == "transit":
        client, vault_settings = _child_vault_client(environ, vault)
    try:
        signer = make_signer(settings, fields, profile=profile, where=f"profile {profile!r}: signer",
                             recv_window=recv_window, record_failures=record_failures,
                             vault_client=client, vault_settings=vault_settings,
                             token_ttl=float(ttl) if isinstance(ttl, (int, float)) and ttl > 0 else None,
                             missing_settings=not environ.get(SIGNER_VAR))
        _sync_at_start(signer, settings)
        return signer
    finally:
        for secret in fields.values():
            secret.wipe()


def _child_vault_client(environ: Mapping[str, str], vault: Mapping[str, Any]) -> tuple[Any, Any]:
    token = environ.get(SIGNER_TOKEN_VAR)
    if not token:
        raise SigningError(
            f"this transit profile has no signing token ({SIGNER_TOKEN_VAR} is not set)",
            "start the bot with a credbroker whose runner calls broker.signing.child_env",
        )
    addr = vault.get("addr")
    if not isinstance(addr, str) or not addr.startswith(("http://", "https://")):
        raise SigningError(f"{SIGNER_VAR} has no Vault address", "it is set by `credbroker run`; do not edit it")
    from ..vault.session import new_client
    from ..vault.settings import VaultSettings

    # The broker's connection settings (CA, client certificate, server name, cluster addresses),
    # never its credentials: the child holds only its own signing token.
    settings = VaultSettings.from_connection(vault, token_source=SIGNER_TOKEN_VAR)
    return new_client(settings, token), settings


def child_env(profile: Profile, *, vault_settings: VaultSettings | None = None) -> dict[str, str]:
    """Variables the runner adds to the child's environment so ``get_signer()`` works there.

    - ``CREDBROKER_CONFIG``: the profile's config file (absolute), so signature
      failures the child records go to the same audit log.
    - ``CREDBROKER_SIGNER``: the profile's signer settings as JSON (no secret).
    - transit profiles only: ``CREDBROKER_SIGNER_TOKEN``, a new token that may
      only sign with the profile's transit key (and read its public key),
      short-lived (``signer.token_ttl``) and renewed by the child while it
      runs. The broker's own token never reaches the child.

    ``vault_settings`` are the broker's Vault settings (resolved once by the run);
    a transit profile needs them. Raises a BrokerError (fail closed) when the
    token cannot be issued.
    """
    vs = vault_settings
    settings = SignerSettings.for_profile(profile)
    out: dict[str, str] = {}
    if profile.origin:
        out["CREDBROKER_CONFIG"] = str(Path(profile.origin).expanduser().resolve())
    payload: dict[str, Any] = settings.to_dict()
    if settings.type == "transit":
        from ..vault.token import open_client
        from .transit import child_token, describe_key

        if vs is None:
            raise ConfigError(f"{profile.where('signer')}: a transit signer needs the broker's Vault settings",
                              "pass child_env(profile, vault_settings=VaultSettings.from_env(...))")
        client = open_client(vs)
        assert settings.transit_key is not None
        # Before the bot starts: a mistyped key name fails here (125), not in the bot's get_signer().
        describe_key(client, vs, mount=settings.transit_mount, key=settings.transit_key,
                     where=profile.where("signer.transit_key"))
        token, lease = child_token(client, vs, mount=settings.transit_mount, key=settings.transit_key,
                                   profile=profile.name, ttl=settings.token_ttl, role=settings.token_role)
        payload["vault"] = vs.connection()
        payload["token_ttl_seconds"] = lease or settings.ttl_seconds()
        out[SIGNER_TOKEN_VAR] = token.reveal_str()
        token.wipe()
    out[SIGNER_VAR] = json.dumps(payload, separators=(",", ":"))
    return out


def release_child_env(extra: Mapping[str, str], *, env: Mapping[str, str]) -> None:
    """Revoke the signing token ``child_env`` issued, once the child has exited (best effort).

    The token would expire on its own after ``signer.token_ttl``; revoking it
    at once closes the window in which a copy of it could still sign.
    """
    token = extra.get(SIGNER_TOKEN_VAR)
    raw = extra.get(SIGNER_VAR)
    if not token or not raw:
        return
    try:
        vault = json.loads(raw).get("vault") or {}
        client, settings = _child_vault_client({SIGNER_TOKEN_VAR: token}, vault)
        from ..vault import token as vault_token

        vault_token.revoke_self(client, settings, action="revoke the signing token at")
    except (ValueError, AttributeError, BrokerError):
        pass  # already expired or revoked, or Vault is gone: the TTL bounds it anyway
