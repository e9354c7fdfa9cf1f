"""Profiles, read from TOML.

Where the file is found, first match wins:

1. ``--config FILE`` (``load(path=...)``)
2. ``$CREDBROKER_CONFIG``
3. ``./credbroker.toml``
4. ``$XDG_CONFIG_HOME/credbroker/config.toml`` (default ``~/.config/credbroker/config.toml``)

A file named by 1 or 2 must exist; 3 and 4 are looked for. No file at all is
not an error: a one-off run can be described entirely with flags
(``Profile.adhoc``).

Example::

    [vault]                          # optional; VAULT_ADDR etc. override it
    addr = "http://127.0.0.1:8200"

    [profiles.um-futures]
    source = "vault"
    path = "secret/credbroker/um-futures"   # KV v2: <mount>/<path>
    env = { BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }

    [profiles.spot]
    source = "keyring"
    service = "credbroker/spot"
    env = { BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }

Every mistake is a ``ConfigError`` naming the file, the key and what is wrong.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .errors import ConfigError, RunError
from .vault.paths import PathKind, check
from .vault.origins import CONFIG_ENV, SettingsEnv, VaultTable
from .vault.origins import value as lookup_value

ENV_CONFIG = "CREDBROKER_CONFIG"
LOCAL_NAME = "credbroker.toml"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")

#: Variables that hold the broker's own powers. They are removed from the child's
#: environment, so a profile may not inject into them either.
BROKER_CREDENTIAL_VARS = frozenset(
    {
        "VAULT_TOKEN",
        "BAO_TOKEN",
        "VAULT_ROLE_ID",
        "VAULT_SECRET_ID",
        "BAO_ROLE_ID",
        "BAO_SECRET_ID",
        "CREDBROKER_ROLE_ID",
        "CREDBROKER_SECRET_ID",
        "CREDBROKER_AUDIT_KEY",
    }
)

#: Keys every profile may have, whatever its source. Sections later features read
#: (signer, policy, rotation) are accepted here and validated by their own module.
_COMMON_PROFILE_KEYS = frozenset({"source", "env", "description", "signer", "policy", "rotation", "proxy"})

#: Source-specific keys; the source module validates values when it runs.
_SOURCE_KEYS: dict[str, frozenset[str]] = {
    "vault": frozenset({"path", "mount", "version", "transit_key", "transit_mount"}),
    "keyring": frozenset({"service", "backend"}),
}



def default_config_path() -> Path:
    """The user-level config file (XDG)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "credbroker" / "config.toml"


def sources() -> tuple[str, ...]:
    """Names of the secret sources a profile may use."""
    return tuple(_SOURCE_KEYS)


# Value types here are NamedTuples, not dataclasses: they are immutable and typed
# just the same, and `credbroker run` does not pay the ~10 ms that importing
# `dataclasses` (and `inspect`) costs at every bot start. Treat the mappings
# they hold as read-only.


class Profile(NamedTuple):
    """One named way to fetch a bot's secrets and map them into its environment."""

    name: str
    source: str
    #: environment variable name -> secret field name
    env: Mapping[str, str]
    #: source-specific options (path, mount, version, service, ...)
    options: Mapping[str, Any] = {}
    #: other sections of the profile (signer, policy, rotation), raw
    sections: Mapping[str, Any] = {}
    #: the file this profile came from, for messages; None for a one-off profile
    origin: str | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        """The secret field names this profile needs, each once, in a stable order."""
        return tuple(dict.fromkeys(self.env.values()))

    def where(self, key: str = "") -> str:
        """``FILE: profiles.NAME.KEY`` for error messages; the flag for a one-off profile."""
        if self.origin is None:
            return _FLAG_FOR_KEY.get(key.split(".", 1)[0], "the command line")
        loc = f"profiles.{self.name}" + (f".{key}" if key else "")
        return f"{self.origin}: {loc}"

    @classmethod
    def adhoc(
        cls,
        *,
        env: Mapping[str, str],
        vault_path: str | None = None,
        vault_version: int | None = None,
        transit_key: str | None = None,
        keyring_service: str | None = None,
        base: Profile | None = None,
    ) -> Profile:
        """A profile from command-line flags, optionally overriding a configured one."""
        if vault_path and keyring_service:
            raise ConfigError(
                "--vault-path and --keyring-service name two sources",
                "give one of them",
            )
        source = base.source if base else None
        options: dict[str, Any] = dict(base.options) if base else {}
        if vault_path:
            if base is not None and base.source != "vault":
                options = {}
            source = "vault"
            options["path"] = vault_path
            options.pop("mount", None)
        if keyring_service:
            if base is not None and base.source != "keyring":
                options = {}
            source = "keyring"
            options["service"] = keyring_service
        if vault_version is not None:
            options["version"] = vault_version
        if transit_key:
            options["transit_key"] = transit_key
        if source is None:
            raise ConfigError(
                "no profile and no source given",
                "pass --profile NAME, or --vault-path PATH / --keyring-service NAME with --env VAR=FIELD",
            )
        merged_env = dict(base.env) if base else {}
        merged_env.update(env)
        name = base.name if base else _adhoc_name(options, source)
        profile = cls(
            name=name,
            source=source,
            env=merged_env,
            options=options,
            sections=dict(base.sections) if base else {},
            origin=base.origin if base else None,
        )
        _check_profile(profile)
        return profile


#: A one-off profile's keys, named as the flags that set them.
_FLAG_FOR_KEY = {
    "path": "--vault-path",
    "mount": "--vault-path",
    "version": "--vault-version",
    "transit_key": "--transit-key",
    "service": "--keyring-service",
    "env": "--env",
}


def _adhoc_name(options: Mapping[str, Any], source: str) -> str:
    ref = str(options.get("path") or options.get("service") or source)
    tail = ref.rstrip("/").rsplit("/", 1)[-1]
    return tail if _PROFILE_NAME.match(tail) else "adhoc"


class Config(NamedTuple):
    """A parsed configuration file."""

    path: Path | None
    profiles: Mapping[str, Profile]
    vault: Mapping[str, Any] = {}
    audit: Mapping[str, Any] = {}
    raw: Mapping[str, Any] = {}

    def profile(self, name: str) -> Profile:
        """The named profile, or a ConfigError listing the ones that exist."""
        try:
            return self.profiles[name]
        except KeyError:
            import difflib

            where = str(self.path.resolve()) if self.path else "no config file found"
            known = ", ".join(sorted(self.profiles)) or "none"
            close = difflib.get_close_matches(name, list(self.profiles), n=1, cutoff=0.6)
            raise ConfigError(
                f"profile {name!r} not found ({where}; profiles: {known})"
                + (f"; did you mean {close[0]!r}?" if close else ""),
                f"use -p {close[0]}" if close else f"add [profiles.{name}] to the config, or pass --config FILE",
            ) from None


def find_config(path: str | os.PathLike[str] | None = None) -> Path | None:
    """Apply the documented search order; None when no file exists."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"config file {p} not found", "check the --config path")
        return p
    env_path = os.environ.get(ENV_CONFIG)
    if env_path:
        p = Path(env_path).expanduser()
        if not p.is_file():
            raise ConfigError(f"config file {p} (from ${ENV_CONFIG}) not found", f"fix or unset {ENV_CONFIG}")
        return p
    local = Path(LOCAL_NAME)
    if local.is_file():
        return local
    user = default_config_path()
    if user.is_file():
        return user
    return None


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Find and parse the configuration; an empty Config when there is none."""
    found = find_config(path)
    if found is None:
        return Config(path=None, profiles={})
    return parse_file(found)


def check_safe_path(path: str | os.PathLike[str], what: str) -> None:
    """Refuse, as ssh does, a file another user could change: ConfigError naming the file and the fix.

    The file and every folder above it must be owned by us or by root, and
    writable by no one else (``chmod go-w``). A root-owned folder with the
    sticky bit (``/tmp``) is accepted: others cannot replace our entries in it.
    A missing file is left to the reader, which says so in its own words.
    """
    me = os.geteuid()
    p = Path(os.path.abspath(Path(path).expanduser()))
    try:
        st = p.stat()
    except OSError:
        return
    first = True
    for current in (p, *p.parents):
        if not first:
            try:
                st = current.stat()
            except OSError as exc:
                raise ConfigError(f"{what} {p}: cannot check {current}: {exc.strerror}",
                                  f"check {current}") from None
        subject = f"{what} {p}" if first else f"{what} {p}: its folder {current}"
        first = False
        if st.st_uid not in (me, 0):
            raise ConfigError(f"{subject} is owned by another user (uid {st.st_uid}), who could change it",
                              f"chown {_user_name(me)} {current}, or keep the file somewhere of your own")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            if current != p and st.st_uid == 0 and st.st_mode & stat.S_ISVTX:
                continue  # /tmp and the like: nobody else can replace our entry in it
            raise ConfigError(f"{subject} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}), "
                              "who could change it", f"chmod go-w {current}")


def _user_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def parse_file(path: Path) -> Config:
    """Parse one TOML file into a Config, or raise one clear ConfigError."""
    import tomllib

    check_safe_path(path, "the config file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}", "check the file's permissions") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})", "save the file as UTF-8") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}", "fix the syntax at that line") from None
    return parse_dict(raw, origin=str(path), path=path)


def parse_dict(raw: Mapping[str, Any], *, origin: str = "<config>", path: Path | None = None) -> Config:
    """Validate an already-decoded TOML document."""
    known_top = {"profiles", "vault", "audit"}
    for key in raw:
        if key not in known_top:
            raise ConfigError(
                f"{origin}: unknown top-level key {key!r}",
                f"expected one of: {', '.join(sorted(known_top))}",
            )
    vault = _table(raw, "vault", origin)
    for key in vault:
        if key not in VAULT_CONFIG_ENV:
            raise ConfigError(
                f"{origin}: vault.{key}: unknown key",
                f"expected one of: {', '.join(sorted(VAULT_CONFIG_ENV))}",
            )
    audit = _table(raw, "audit", origin)
    profiles_raw = _table(raw, "profiles", origin)
    profiles: dict[str, Profile] = {}
    for name, table in profiles_raw.items():
        if not _PROFILE_NAME.match(name):
            raise ConfigError(
                f"{origin}: profiles.{name!r}: invalid profile name",
                "use letters, digits, '.', '_' or '-' (at most 64)",
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{origin}: profiles.{name}: expected a table", f"write [profiles.{name}]")
        profiles[name] = _parse_profile(name, table, origin)
    return Config(path=path, profiles=profiles, vault=vault, audit=audit, raw=raw)


def _table(raw: Mapping[str, Any], key: str, origin: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{origin}: {key}: expected a table, got {_kind(value)}", f"write [{key}]")
    return value


def _kind(value: object) -> str:
    return {str: "a string", int: "an integer", bool: "a boolean", list: "an array", dict: "a table"}.get(
        type(value), type(value).__name__
    )


def _parse_profile(name: str, table: Mapping[str, Any], origin: str) -> Profile:
    where = f"{origin}: profiles.{name}"
    source = table.get("source")
    if source is None:
        raise ConfigError(f"{where}.source: missing", f"set source = one of {', '.join(_SOURCE_KEYS)}")
    if not isinstance(source, str) or source not in _SOURCE_KEYS:
        raise ConfigError(
            f"{where}.source: unknown source {source!r}",
            f"use one of: {', '.join(_SOURCE_KEYS)}",
        )
    allowed = _COMMON_PROFILE_KEYS | _SOURCE_KEYS[source]
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"{where}.{key}: unknown key for a {source} profile",
                f"expected one of: {', '.join(sorted(allowed))}",
            )
    env = table.get("env")
    if env is not None and not isinstance(env, dict):
        raise ConfigError(
            f"{where}.env: must be a table mapping variables to fields, got {_kind(env)}",
            'write env = { BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }',
        )
    if not env:
        raise ConfigError(
            f"{where}.env: missing or empty",
            'map variables to fields, e.g. env = { BINANCE_API_SECRET = "api_secret" }',
        )
    options = {k: v for k, v in table.items() if k in _SOURCE_KEYS[source]}
    sections = {k: v for k, v in table.items() if k in {"signer", "policy", "rotation", "proxy"}}
    profile = Profile(name=name, source=source, env=dict(env), options=options, sections=sections, origin=origin)
    _check_profile(profile)
    return profile


def _check_profile(profile: Profile) -> None:
    """Checks shared by file profiles and one-off profiles."""
    if not profile.env:
        raise ConfigError(
            f"{profile.where('env')}: no variables to inject",
            "pass --env VAR=FIELD, or set env in the profile",
        )
    for var, fld in profile.env.items():
        if not _ENV_NAME.match(var):
            raise ConfigError(
                f"{profile.where('env')}: {var!r} is not a valid environment variable name",
                "use letters, digits and '_', not starting with a digit",
            )
        if var in BROKER_CREDENTIAL_VARS or var.startswith("CREDBROKER_"):
            raise ConfigError(
                f"{profile.where('env')}: {var} is reserved for credbroker itself",
                "inject the secret under another name",
            )
        if not isinstance(fld, str) or not fld.strip():
            raise ConfigError(
                f"{profile.where('env.' + var)}: expected a field name (a non-empty string), got {_kind(fld)}",
                f'write {var} = "field_name"',
            )
    opts = profile.options
    if profile.source == "vault":
        path = opts.get("path")
        if not isinstance(path, str) or not path.strip("/"):
            raise ConfigError(
                f"{profile.where('path')}: missing",
                'set path = "<mount>/<path>" of a KV v2 secret, e.g. "secret/credbroker/um-futures"',
            )
        mount = opts.get("mount")
        if mount is not None and (not isinstance(mount, str) or not mount.strip("/")):
            raise ConfigError(f"{profile.where('mount')}: expected a mount name", 'e.g. mount = "secret"')
        check(path, PathKind.KV_PATH, profile.where("path"))
        if mount is not None:
            check(mount, PathKind.MOUNT, profile.where("mount"))
        if mount is None and "/" not in path.strip("/"):
            raise ConfigError(
                f"{profile.where('path')}: {path!r} has no mount",
                f'write "<mount>/<path>", e.g. "secret/{path.strip("/")}" for the KV v2 engine at secret/',
            )
        if mount is None:
            first, _, rest = path.strip("/").partition("/")
            inner, _, tail = rest.partition("/")
            if inner in ("data", "metadata") and tail:
                # The API path (secret/data/x) in place of the KV path (secret/x): the broker adds data/.
                raise ConfigError(
                    f"{profile.where('path')}: {path!r} names the KV v2 API path",
                    f'drop "{inner}/": write "{first}/{tail}" (credbroker adds data/ itself, as `vault kv get` does)',
                )
        version = opts.get("version")
        if isinstance(version, str) and version.strip().isascii() and version.strip().isdigit():
            raise ConfigError(
                f"{profile.where('version')}: expected a number, got the string {version!r}",
                f"write version = {version.strip()}, without quotes",
            )
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
            raise ConfigError(
                f"{profile.where('version')}: expected a KV version number >= 1, got {version!r}",
                "omit it to read the latest version",
            )
        for key in ("transit_key", "transit_mount"):
            value = opts.get(key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{profile.where(key)}: expected a non-empty string", f"fix {key}")
            if value is not None:
                check(value, PathKind.NAME if key == "transit_key" else PathKind.MOUNT, profile.where(key))
    elif profile.source == "keyring":
        service = opts.get("service")
        if service is not None and (not isinstance(service, str) or not service):
            raise ConfigError(f"{profile.where('service')}: expected a non-empty string", 'e.g. "credbroker/spot"')
        backend = opts.get("backend")
        if backend is not None and (not isinstance(backend, str) or not backend):
            raise ConfigError(
                f"{profile.where('backend')}: expected a keyring backend class name",
                'e.g. "keyring.backends.SecretService.Keyring", or omit it',
            )


#: [vault] config key -> the environment variable that overrides it.
VAULT_CONFIG_ENV = CONFIG_ENV


def with_config_defaults(environ: Mapping[str, str], config: Config | None) -> SettingsEnv:
    """The environment with the config's ``[vault]`` table beside it (validated here, once).

    Vault settings are then resolved from this one value: the environment first (as the Vault CLI
    reads it), then ``[vault]``, each value knowing where it came from, so errors name
    ``[vault] addr in FILE`` or ``VAULT_ADDR``. No ``[vault]`` value is written into the environment.
    """
    table = None
    if config is not None and config.vault:
        origin = str(config.path or "<config>")
        values: dict[str, str] = {}
        for key, value in config.vault.items():
            if key == "timeout":
                from . import units

                units.seconds(value, f"{origin}: vault.timeout")
            elif key == "addrs":
                if not isinstance(value, list) or not all(isinstance(a, str) and a.strip() for a in value):
                    raise ConfigError(f"{origin}: vault.addrs: expected a list of addresses, got {value!r}",
                                      'e.g. addrs = ["https://vault-2.example:8200"]')
                value = ",".join(value)
            elif not isinstance(value, str):
                raise ConfigError(f"{origin}: vault.{key}: expected a string, got {value!r}", f"quote the {key} value")
            values[key] = str(value)
        table = VaultTable(values=values, file=origin)
    env = SettingsEnv(environ, table)
    check_credential_files(env)
    return env


#: Variables naming files that hold the broker's own Vault credentials.
CREDENTIAL_FILE_VARS = {
    "CREDBROKER_ROLE_ID_FILE": "the role_id_file",
    "CREDBROKER_SECRET_ID_FILE": "the secret_id_file",
    "VAULT_CLIENT_KEY": "the TLS client key (VAULT_CLIENT_KEY)",
    "BAO_CLIENT_KEY": "the TLS client key (BAO_CLIENT_KEY)",
}
#: Files that decide whom the broker trusts and shows itself as: another user who could
#: change them could put themselves between the broker and Vault.
TRUST_FILE_VARS = {
    "VAULT_CACERT": "the Vault CA certificate (VAULT_CACERT)",
    "BAO_CACERT": "the Vault CA certificate (BAO_CACERT)",
    "VAULT_CAPATH": "the Vault CA folder (VAULT_CAPATH)",
    "BAO_CAPATH": "the Vault CA folder (BAO_CAPATH)",
    "VAULT_CLIENT_CERT": "the TLS client certificate (VAULT_CLIENT_CERT)",
    "BAO_CLIENT_CERT": "the TLS client certificate (BAO_CLIENT_CERT)",
}


def check_credential_files(env: Mapping[str, str]) -> None:
    """The credential and trust files the settings name (in the environment or ``[vault]``) must be safe
    from other users (``check_safe_path``)."""
    for var, what in (*CREDENTIAL_FILE_VARS.items(), *TRUST_FILE_VARS.items()):
        path = lookup_value(env, var)
        if path:
            check_safe_path(path, what)


def parse_env_mapping(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``--env VAR=FIELD`` flags into a mapping (``--env VAR`` means field ``var``)."""
    env: dict[str, str] = {}
    for item in items:
        var, sep, fld = item.partition("=")
        var = var.strip()
        fld = fld.strip() if sep else var.lower()
        if not var or not fld:
            raise ConfigError(f"--env {item!r}: expected VAR=FIELD", "e.g. --env BINANCE_API_SECRET=api_secret")
        env[var] = fld
    return env


def check_profiles(profiles: Sequence[Profile]) -> None:
    """Several profiles in one run: refused before anything is fetched when a profile is named twice or two
    profiles would set the same variable (one would silently overwrite the other's secret)."""
    seen: dict[str, str] = {}
    names: set[str] = set()
    for p in profiles:
        if p.name in names:
            raise RunError(f"profile {p.name!r} is named twice", "give each profile once")
        names.add(p.name)
        for var in p.env:
            if var in seen:
                raise RunError(
                    f"profiles {seen[var]!r} and {p.name!r} both set {var}: one would overwrite the other's secret",
                    f"map {var} in one profile only (rename it in the other's env table)",
                )
            seen[var] = p.name


def run_profiles(config: Config, names: Sequence[str] = (), *, env_items: Sequence[str] = (),
                 vault_path: str | None = None, vault_version: int | None = None, transit_key: str | None = None,
                 keyring_service: str | None = None) -> list[Profile]:
    """The profiles a run takes: the configured ones named, or one one-off profile shaped by the one-off
    options (``--env``, ``--vault-path``, ``--vault-version``, ``--transit-key``, ``--keyring-service``),
    on top of the one profile named, if any. The one-off options with several names are refused."""
    one_off = bool(env_items or vault_path or vault_version or transit_key or keyring_service)
    if len(names) > 1:
        if one_off:
            raise ConfigError("the one-off flags (--env, --vault-path, --vault-version, --transit-key, "
                              "--keyring-service) shape one profile, and this run names several",
                              "put each profile's mapping in the config file, or run one profile with the flags")
        return [config.profile(name) for name in names]
    base = config.profile(names[0]) if names else None
    if base is not None and not one_off:
        return [base]
    return [Profile.adhoc(
        env=parse_env_mapping(tuple(env_items)),
        vault_path=vault_path,
        vault_version=vault_version,
        transit_key=transit_key,
        keyring_service=keyring_service,
        base=base,
    )]
