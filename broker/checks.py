"""`credbroker check`: read a profile as a run would (through ``broker.access``, audited ``by="check"``) and
validate what the run would need later (signer, policy, rotation and proxy tables; a transit key; the
metadata rotation watches). It sits above signing, the proxy settings and rotation, which it validates;
``access`` (the read) stays below them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .access import config_for, fetch, value_warnings
from .config import Config, Profile
from .errors import BrokerError
from .events import Recorder


class CheckResult(dict[str, Any]):
    """What `credbroker check` reports of one profile (JSON-ready; no secret): ``ok``, where the secret was
    read, each field's size, and ``warnings``/``problems`` found beyond the read itself."""


def check(profile: Profile, *, config: Config | None = None, env: Mapping[str, str] | None = None,
          record: Recorder | None = None) -> CheckResult:
    """Read ``profile`` as ``credbroker run`` would (audited, ``by="check"``) and validate what a run
    would need later: the [signer], [policy], [rotation] and [proxy] tables; for a transit signer, that
    the key exists, can sign and cannot leave Vault, and that the broker may issue the bot's scoped token;
    for a vault profile that follows the latest version, that the token may read the metadata rotation
    watches. Raises on the read."""
    from .config import with_config_defaults

    cfg = config_for(profile, config)
    environ = os.environ if env is None else env
    problems: list[str] = []
    transit = _signer_type(profile) == "transit"
    vault = None
    if profile.source == "vault" or transit:
        from .vault.settings import VaultSettings

        try:  # once, for the read, the transit key's check and the rotation check
            vault = VaultSettings.from_env(with_config_defaults(environ, cfg))
        except BrokerError as exc:
            if profile.source == "vault":
                vault = None  # the read below resolves them again, fails the same way, and records it
            else:
                problems.append(str(exc))
    creds = fetch(profile, config=cfg, env=environ, settings=vault, record=record, by="check")
    try:
        result = CheckResult(
            profile=profile.name, **creds.origin.to_dict(),
            fields={name: {"bytes": len(creds[name])} for name in profile.fields},
            env=dict(profile.env), warnings=value_warnings(profile, creds),
        )
    finally:
        creds.wipe()
    for validate in (_check_signer, _check_policy, _check_rotation, _check_proxy):
        try:
            validate(profile)
        except BrokerError as exc:
            problems.append(str(exc))
    if transit and not problems and vault is not None:
        # What run does before the bot starts: check the key and issue (then revoke) the scoped token.
        from .signing import child_env, release_child_env

        try:
            release_child_env(child_env(profile, vault_settings=vault), env=environ)
        except BrokerError as exc:
            problems.append(str(exc))
    if profile.source == "vault" and not profile.options.get("version") and vault is not None:
        from .sources.vault import current_version

        try:
            current_version(profile, vault)
        except BrokerError as exc:
            problems.append(f"rotation cannot be followed: {exc}")
    result.update(problems=problems, ok=not problems)
    return result


def check_many(config: Config, names: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None,
               record: Recorder | None = None) -> list[CheckResult]:
    """``check`` of several profiles: ``names`` as one run would take them (a profile named twice, or a
    variable two of them set, is refused before any read), or every configured profile when None.

    With one name, its read's error is raised; with several (or all), a profile whose read fails gets a
    result of its own (``ok`` false, the error as its one problem) and the next one is checked."""
    from .config import check_profiles
    from .errors import ConfigError

    every = names is None
    wanted = sorted(config.profiles) if names is None else list(names)
    if every and not wanted:
        raise ConfigError(f"no profiles in {config.path or 'the config (none found)'}", "add [profiles.NAME]")
    if len(wanted) > 1 and not every:
        check_profiles([config.profile(name) for name in wanted])
    several = every or len(wanted) > 1
    results: list[CheckResult] = []
    for name in wanted:
        try:
            results.append(check(config.profile(name), config=config, env=env, record=record))
        except BrokerError as exc:
            if not several:
                raise
            results.append(CheckResult(profile=name, ok=False, problems=[str(exc)], warnings=[]))
    return results


def _signer_type(profile: Profile) -> str | None:
    table = profile.sections.get("signer")
    return str(table.get("type")) if isinstance(table, dict) and table.get("type") else None


def _check_signer(profile: Profile) -> None:
    from .signing.settings import SignerSettings

    SignerSettings.for_profile(profile)


def _check_policy(profile: Profile) -> None:
    if profile.sections.get("policy") is not None:
        from .signing_policy import SigningPolicy

        SigningPolicy.for_profile(profile)


def _check_proxy(profile: Profile) -> None:
    if profile.sections.get("proxy") is not None:
        from .proxy.settings import ProxySettings

        ProxySettings.for_profile(profile)


def _check_rotation(profile: Profile) -> None:
    if profile.sections.get("rotation") is not None:
        from .rotation import policy_from

        policy_from(profile, None, None, None)
