"""Move a plaintext key file (creds.yml, .env) into Vault or the OS keyring.

The steps (issue 5, part 6), each a function a program can call:

1. ``read_plaintext(path)`` parses the file into ``Secret`` values. Only the
   flat subset such files use in practice is read, strictly (no PyYAML: a
   security tool keeps its dependencies few): ``key: value`` lines for YAML,
   ``KEY=value`` lines for dotenv. Anything else is refused with one line
   naming the file and line, never quoting it (the line may hold a secret).
2. ``select_fields`` picks and renames what is stored (``--field`` or a
   profile's env mapping).
3. ``store_vault`` / ``store_keyring`` write the values; ``verify_read_back``
   reads the stored copy back through the one audited read (``access.read``,
   ``by="import"``: a ``secret_fetched`` record with Vault's request id, or a
   ``refused`` one) and compares every byte in constant time
   (``hmac.compare_digest``).
4. ``shred(path)`` overwrites the file in place, flushes it to the disk and
   unlinks it. That is all software can do: ``SHRED_WARNING`` says honestly
   what it cannot reach.

``import_plaintext`` runs steps 1-3 and records the read-back and a
``secret_imported`` audit event; ``delete_plaintext`` runs step 4 and records ``plaintext_deleted``.
Audit events name the file, the store, the version and the field names, never
a value.
"""

from __future__ import annotations

import hmac
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Profile
from .errors import ConfigError
# Error classes live in errors.py; these names stay importable from here too.
from .errors import ImportVerifyError as ImportVerifyError
from .errors import PlaintextFormatError as PlaintextFormatError
from .errors import ShredError as ShredError
from .secret import Secret
from .events import Event, Recorder

if TYPE_CHECKING:  # pragma: no cover
    from .vault.settings import VaultSettings

#: A key file bigger than this is not a key file.
MAX_BYTES = 1 << 20

SHRED_WARNING = (
    "The file is overwritten in place, flushed and unlinked, but old copies may survive where no program can "
    "reach them: copy-on-write and journaling filesystems (btrfs, ZFS, APFS, ext4 data=journal), SSD wear "
    "levelling, snapshots, backups, editor swap/backup files, shell history and git history. If this key was "
    "ever copied, committed or backed up, treat it as exposed: rotate it at the exchange."
)


@dataclass(frozen=True)
class PlainFile:
    """A parsed plaintext key file: its values as Secrets, in file order."""

    path: Path
    kind: str  # "yaml" | "env"
    fields: Mapping[str, Secret] = field(repr=False)

    def wipe(self) -> None:
        """Wipe every value."""
        for secret in self.fields.values():
            secret.wipe()


# -- reading ---------------------------------------------------------------------------
def detect_format(path: Path) -> str:
    """``yaml`` or ``env`` from the file name; ConfigError when it says neither."""
    name = path.name.lower()
    if name.endswith((".yml", ".yaml")):
        return "yaml"
    if name == ".env" or name.endswith(".env") or name.startswith(".env."):
        return "env"
    raise ConfigError(f"cannot tell whether {path} is YAML or a .env file from its name",
                      "pass --format yaml or --format env")


def read_plaintext(path: str | os.PathLike[str], fmt: str | None = None) -> PlainFile:
    """Parse a creds.yml / .env file; raise ConfigError with file and line on anything unexpected."""
    p = Path(path)
    kind = fmt or detect_format(p)
    if kind not in ("yaml", "env"):
        raise ConfigError(f"unknown format {kind!r}", "use --format yaml or --format env")
    try:
        st = p.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror}", "check the path") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{p} is not a regular file", "name the key file itself")
    if st.st_size > MAX_BYTES:
        raise PlaintextFormatError(f"{p} is {st.st_size} bytes, too big for a key file",
                                   "import a flat file of key: value lines")
    try:
        raw = bytearray(p.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror}", "check its permissions") from None
    try:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise PlaintextFormatError(f"{p}: line {line}: not UTF-8 text", "save the file as UTF-8") from None
    finally:
        raw[:] = bytes(len(raw))
    parser = parse_yaml if kind == "yaml" else parse_dotenv
    return PlainFile(path=p, kind=kind, fields=parser(text, str(p)))


def _lines(text: str) -> list[str]:
    # Split on \n only: str.splitlines() would also split on \x0b, \x1c, U+2028...,
    # which YAML and dotenv do not, and hide a control character inside a value.
    if text.startswith("\ufeff"):
        text = text[1:]
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


_KEY = r"[A-Za-z_][A-Za-z0-9_.-]*"
_YAML_LINE = re.compile(rf"({_KEY}):(?:[ \t]+(.*))?$")
# Plain scalars that YAML (1.1, as PyYAML reads them) turns into something other
# than the text: null, booleans, numbers. A bot that read the file with PyYAML
# saw that value, not the text, so we refuse and ask for quotes.
_YAML_NULL = re.compile(r"^(~|null|Null|NULL)$")
_YAML_BOOL = re.compile(r"^(y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)$")
_YAML_NUM = re.compile(
    r"^[-+]?(0b[01_]+|0x[0-9a-fA-F_]+|[0-9][0-9_]*(:[0-5]?[0-9])*|([0-9][0-9_]*)?\.[0-9_]*([eE][-+]?[0-9]+)?"
    r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(inf|Inf|INF)|\.(nan|NaN|NAN))$"
)


class _Where:
    """Formats ``FILE: line N: ...`` errors."""

    def __init__(self, name: str) -> None:
        self.name = name

    def error(self, lineno: int, what: str, remedy: str) -> PlaintextFormatError:
        return PlaintextFormatError(f"{self.name}: line {lineno}: {what}", remedy)


def _check_value(where: _Where, lineno: int, key: str, value: str) -> None:
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise where.error(lineno, f"value of {key} holds a control character", "store one printable line")
    if not value:
        raise where.error(lineno, f"{key} has an empty value", "give it a value, or remove the line")


def _trailing(where: _Where, lineno: int, key: str, rest: str) -> None:
    """After a quoted scalar: only blanks and an optional comment."""
    rest_stripped = rest.lstrip(" \t")
    if rest_stripped and not (rest_stripped.startswith("#") and rest != rest_stripped):
        raise where.error(lineno, f"unexpected text after the quoted value of {key}",
                          "one quoted value per line, optionally followed by ' # comment'")


def _single_quoted(where: _Where, lineno: int, key: str, s: str, *, doubled_quote: bool) -> str:
    """'...' : YAML doubles a quote inside (''), dotenv has no escape at all."""
    out = []
    i = 1
    while i < len(s):
        ch = s[i]
        if ch == "'":
            if doubled_quote and s.startswith("''", i):
                out.append("'")
                i += 2
                continue
            _trailing(where, lineno, key, s[i + 1 :])
            return "".join(out)
        out.append(ch)
        i += 1
    raise where.error(lineno, f"the quoted value of {key} does not end on this line",
                      "multi-line values are not supported: keep each value on one line")


def _double_quoted(where: _Where, lineno: int, key: str, s: str, escapes: Mapping[str, str],
                   no_dollar: bool) -> str:
    out = []
    i = 1
    while i < len(s):
        ch = s[i]
        if ch == "\\":
            nxt = s[i + 1 : i + 2]
            if nxt not in escapes:
                raise where.error(lineno, f"the value of {key} uses an escape sequence credbroker does not read",
                                  f"only {' '.join(chr(92) + e for e in escapes)} are read; or use single quotes")
            out.append(escapes[nxt])
            i += 2
            continue
        if ch == '"':
            _trailing(where, lineno, key, s[i + 1 :])
            return "".join(out)
        if no_dollar and ch == "$" and re.match(r"[A-Za-z_{(]", s[i + 1 : i + 2]):
            raise where.error(lineno, f"the value of {key} uses variable expansion ($NAME)",
                              "put the literal value in single quotes")
        out.append(ch)
        i += 1
    raise where.error(lineno, f"the quoted value of {key} does not end on this line",
                      "multi-line values are not supported: keep each value on one line")


def parse_yaml(text: str, name: str = "<yaml>") -> dict[str, Secret]:
    """The flat YAML subset: ``key: value`` lines, comments, an optional leading ``---``."""
    where = _Where(name)
    out: dict[str, Secret] = {}
    first_line: dict[str, int] = {}
    seen_content = False
    try:
        for lineno, line in enumerate(_lines(text), start=1):
            stripped = line.strip(" \t")
            if not stripped or stripped.startswith("#"):
                continue
            if stripped in ("---", "...") or line.startswith(("--- ", "... ")):
                if stripped == "---" and not seen_content and line == "---":
                    seen_content = True
                    continue
                raise where.error(lineno, "a second YAML document (--- or ...)", "keep one flat map per file")
            seen_content = True
            if line[0] in " \t":
                raise where.error(lineno, "indented line: nested YAML is not supported",
                                  "write flat `key: value` lines starting in column 1")
            if line.startswith("-") and (len(line) == 1 or line[1] in " \t"):
                raise where.error(lineno, "a YAML list is not supported", "write flat `key: value` lines")
            if line[0] in "{[":
                raise where.error(lineno, "flow-style YAML ({...} or [...]) is not supported",
                                  "write flat `key: value` lines")
            m = _YAML_LINE.match(line)
            if not m:
                raise where.error(lineno, "expected `key: value` (a plain key, a colon, a space, the value)",
                                  "keys are letters, digits, _ . - ; quote values that contain ': '")
            key, rest = m.group(1), m.group(2)
            if key in first_line:
                raise where.error(lineno, f"key {key} appears twice (first on line {first_line[key]})",
                                  "keep one value per key")
            rest = (rest or "").rstrip(" \t")
            if not rest or rest.startswith("#"):
                raise where.error(lineno, f"{key} has no value (nested maps and empty values are not supported)",
                                  "give it a value on the same line")
            if rest[0] == "'":
                value = _single_quoted(where, lineno, key, rest, doubled_quote=True)
            elif rest[0] == '"':
                value = _double_quoted(where, lineno, key, rest, {"\\": "\\", '"': '"', "/": "/"},
                                       no_dollar=False)
            elif rest[0] in "&*!|>{[@`%" or (rest[0] in "-?:" and (len(rest) == 1 or rest[1] in " \t")):
                raise where.error(lineno, f"the value of {key} uses YAML syntax credbroker does not read "
                                  "(anchor, alias, tag, block, flow or list)", "quote the value")
            else:
                cut = re.search(r"[ \t]#", rest)
                value = rest[: cut.start()].rstrip(" \t") if cut else rest
                if ": " in value or value.endswith(":") or ":\t" in value:
                    raise where.error(lineno, f"the value of {key} contains ': '", "quote the value")
                if _YAML_NULL.match(value):
                    raise where.error(lineno, f"{key} is null", "give it a value")
                if _YAML_BOOL.match(value) or _YAML_NUM.match(value):
                    raise where.error(lineno, f"the value of {key} would be read by YAML as a number or boolean",
                                      "quote the value to keep it as text")
            _check_value(where, lineno, key, value)
            out[key] = Secret(value)
            first_line[key] = lineno
            del value
    except BaseException:
        for secret in out.values():
            secret.wipe()
        raise
    if not out:
        raise PlaintextFormatError(f"{name} holds no `key: value` line", "is this the right file?")
    return out


_ENV_LINE = re.compile(rf"(?:export[ \t]+)?({_KEY})[ \t]*=[ \t]*(.*)$")


def parse_dotenv(text: str, name: str = "<.env>") -> dict[str, Secret]:
    """The .env subset: ``KEY=value`` lines (optional ``export``), quotes, comments."""
    where = _Where(name)
    out: dict[str, Secret] = {}
    first_line: dict[str, int] = {}
    try:
        for lineno, line in enumerate(_lines(text), start=1):
            stripped = line.strip(" \t")
            if not stripped or stripped.startswith("#"):
                continue
            m = _ENV_LINE.match(stripped)
            if not m:
                raise where.error(lineno, "expected KEY=value", "one KEY=value per line; keys are letters, digits, _")
            key, rest = m.group(1), m.group(2).rstrip(" \t")
            if key in first_line:
                raise where.error(lineno, f"key {key} appears twice (first on line {first_line[key]})",
                                  "keep one value per key")
            if not rest or rest.startswith("#"):
                raise where.error(lineno, f"{key} has an empty value", "give it a value, or remove the line")
            if rest[0] == "'":
                value = _single_quoted(where, lineno, key, rest, doubled_quote=False)
            elif rest[0] == '"':
                value = _double_quoted(where, lineno, key, rest, {"\\": "\\", '"': '"', "'": "'", "$": "$"},
                                       no_dollar=True)
            else:
                cut = re.search(r"[ \t]#", rest)
                value = rest[: cut.start()].rstrip(" \t") if cut else rest
                # Unquoted text that a shell and a dotenv library read differently.
                if re.search(r"[ \t'\"`\\]", value):
                    raise where.error(lineno, f"the unquoted value of {key} holds spaces, quotes or backslashes",
                                      "put the value in single quotes")
                if re.search(r"\$[A-Za-z_{(]", value):
                    raise where.error(lineno, f"the value of {key} uses variable expansion ($NAME)",
                                      "put the literal value in single quotes")
            _check_value(where, lineno, key, value)
            out[key] = Secret(value)
            first_line[key] = lineno
            del value
    except BaseException:
        for secret in out.values():
            secret.wipe()
        raise
    if not out:
        raise PlaintextFormatError(f"{name} holds no KEY=value line", "is this the right file?")
    return out


# -- choosing what to store --------------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    """What will be stored: store field -> Secret, and the file keys left out."""

    fields: Mapping[str, Secret] = field(repr=False)
    #: store field -> the file key it came from
    sources: Mapping[str, str]
    left_out: tuple[str, ...]


#: The field names the README's profiles map (``env = { BINANCE_API_KEY = "api_key", ... }``), by the
#: names plaintext files use for them (after dropping an exchange prefix and lower-casing).
_CANONICAL = {
    "api_key": "api_key", "apikey": "api_key", "key": "api_key",
    "api_secret": "api_secret", "apisecret": "api_secret", "secret": "api_secret", "secret_key": "api_secret",
    "api_secret_key": "api_secret",
    "private_key": "private_key", "api_private_key": "private_key", "private_key_path": "private_key_path",
    "private_key_passphrase": "private_key_passphrase", "private_key_pass": "private_key_passphrase",
    "passphrase": "private_key_passphrase",
}
_EXCHANGE_PREFIX = re.compile(r"^(binance|bnb|exchange)_", re.I)
#: canonical field -> the variable the README's bots read it from.
_SUGGESTED_VAR = {"api_key": "BINANCE_API_KEY", "api_secret": "BINANCE_API_SECRET",
                  "private_key": "BINANCE_PRIVATE_KEY", "private_key_passphrase": "BINANCE_PRIVATE_KEY_PASSPHRASE"}


def canonical_field(file_key: str) -> str:
    """The store field for a plaintext key: BINANCE_API_SECRET, secretKey, api-secret -> api_secret.

    Unknown keys keep their name, lower-cased (SYMBOL -> symbol)."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", file_key).replace("-", "_").lower()
    bare = _EXCHANGE_PREFIX.sub("", snake)
    return _CANONICAL.get(bare, _CANONICAL.get(snake, snake))


def profile_snippet(name: str, source: str, location: str, sources: Mapping[str, str]) -> str:
    """A ``[profiles.NAME]`` block to paste into credbroker.toml for what an import stored.

    ``sources`` is store field -> file key: a .env's variable names are what its bot reads, so they
    stay the variables; a YAML key becomes the README's variable for its field."""
    pairs = []
    for fld, file_key in sources.items():
        var = file_key if re.fullmatch(r"[A-Z_][A-Z0-9_]*", file_key) else _SUGGESTED_VAR.get(fld, fld.upper())
        pairs.append(f'{var} = "{fld}"')
    where = f'path = "{location}"' if source == "vault" else f'service = "{location}"'
    return f'[profiles.{name}]\nsource = "{source}"\n{where}\nenv = {{ {", ".join(pairs)} }}\n'


def select_fields(plain: PlainFile, mapping: Mapping[str, str] | None = None,
                  profile: Profile | None = None) -> Selection:
    """Pick the values to store.

    ``mapping`` (file key -> store field, from ``--field``) wins; else a
    profile's env mapping (VAR -> field): the file's VAR, or else a key named
    like the field, goes to that field; else every key under its canonical
    field name (``canonical_field``: BINANCE_API_SECRET -> api_secret), the
    names the README's profiles map.
    Every requested value must be present (fail closed).
    """
    have = plain.fields
    chosen: dict[str, str] = {}  # store field -> file key
    if mapping:
        for file_key, store_field in mapping.items():
            if file_key not in have:
                raise ConfigError(f"{plain.path} has no key {file_key}",
                                  f"keys in the file: {', '.join(have) or 'none'}")
            if store_field in chosen:
                raise ConfigError(f"two keys map to field {store_field}", "map each key to its own field")
            chosen[store_field] = file_key
    elif profile is not None:
        for var, store_field in profile.env.items():
            if store_field in chosen:
                continue
            if var in have:
                chosen[store_field] = var
            elif store_field in have:
                chosen[store_field] = store_field
            else:
                raise ConfigError(
                    f"{plain.path} has no value for field {store_field} of profile {profile.name} "
                    f"(looked for keys {var} and {store_field})",
                    "map it with --field FILEKEY=" + store_field,
                )
    else:
        for file_key in have:
            store_field = canonical_field(file_key)
            if store_field in chosen:
                raise ConfigError(
                    f"{plain.path}: keys {chosen[store_field]} and {file_key} would both be stored as {store_field}",
                    f"say which with --field {file_key}=OTHER_FIELD",
                )
            chosen[store_field] = file_key
    used = set(chosen.values())
    return Selection(
        fields={f: have[k] for f, k in chosen.items()},
        sources=dict(chosen),
        left_out=tuple(k for k in have if k not in used),
    )


# -- Vault -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Stored:
    """Where the values went, for messages, JSON and the audit log (no secret)."""

    target: str  # "vault" | "keyring"
    location: str  # "secret/credbroker/alpha" or the keyring service
    fields: tuple[str, ...]
    version: int | None = None
    address: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"target": self.target, "location": self.location, "fields": list(self.fields),
                "version": self.version, "address": self.address}


def store_vault(settings: VaultSettings, mount: str, path: str, fields: Mapping[str, Secret], *,
                force: bool = False, client: Any = None) -> Stored:
    """Write ``fields`` as a new KV v2 secret (check-and-set 0: only if none exists, unless ``force``)."""
    from .errors import VaultBadResponse
    from .vault.paths import PathKind, check
    from .vault import kv
    from .vault.token import open_client

    check(mount, PathKind.MOUNT, "the Vault mount")
    check(path, PathKind.KV_PATH, "the Vault path")
    client = client or open_client(settings)
    shown = f"{mount}/{path}"
    data = {name: secret.reveal_str() for name, secret in fields.items()}
    try:
        try:
            resp = kv.write(client, settings, mount, path, data, cas=None if force else 0, secrets=fields.values())
        except VaultBadResponse as exc:
            if "check-and-set" in exc.message:
                raise ConfigError(
                    f"{shown} already exists in Vault; import writes only new secrets",
                    "pass --force to write the file's values as a new version (other fields are dropped), "
                    "or rotate with scripts/rotate-key",
                ) from None
            raise
    finally:
        data.clear()  # the str copies cannot be wiped; drop them now
    version = resp.get("data", {}).get("version") if isinstance(resp, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise VaultBadResponse(f"Vault did not report the version it wrote at {shown}", "check the server")
    return Stored("vault", shown, tuple(fields), version, settings.addr)


def read_back_profile(stored: Stored, *, mount: str = "", profile: Profile | None = None) -> Profile:
    """The profile the read-back reads: exactly the stored fields, at the stored place (for Vault, the very
    version just written); the configured profile's name (and file, keyring backend) when there is one,
    else a one-off profile named as the printed snippet suggests."""
    name = profile.name if profile is not None else (stored.location.rstrip("/").rsplit("/", 1)[-1] or "bot")
    env = {f"CREDBROKER_IMPORT_{i}": fld for i, fld in enumerate(stored.fields)}  # each field once
    origin = profile.origin if profile is not None else None
    if stored.target == "vault":
        from .sources.vault import AS_STORED

        # As stored: a value that looks like transit ciphertext was written as it is and is compared so.
        options: dict[str, Any] = {"path": stored.location[len(mount) + 1:] if mount else stored.location,
                                   "mount": mount, "version": stored.version, AS_STORED: True}
        return Profile(name=name, source="vault", env=env, options=options, origin=origin)
    options = {"service": stored.location}
    if profile is not None and profile.options.get("backend"):
        options["backend"] = profile.options["backend"]
    return Profile(name=name, source="keyring", env=env, options=options, origin=origin)


def verify_read_back(stored: Stored, fields: Mapping[str, Secret], *, mount: str = "",
                     profile: Profile | None = None, env: Mapping[str, str], settings: VaultSettings | None,
                     record: Recorder) -> None:
    """Read the stored copy back through the one audited read (``access.read``, ``by="import"``) and compare
    every field in constant time. The read is recorded as ``secret_fetched`` (with Vault's request id, so
    the weekly review's cross-check knows it was credbroker's) or as ``refused``; a copy that differs is
    recorded as ``refused`` too, after the read that found it. The values read are wiped."""
    from .access import read, record_refusal

    back = read_back_profile(stored, mount=mount, profile=profile)
    # use_daemon=False: the read-back uses the credentials the write used, never another process's.
    creds = read(back, env=env, settings=settings, record=record, by="import", use_daemon=False)
    try:
        _compare(stored, {name: creds[name] for name in creds}, fields,
                 stored.version is None or creds.origin.version == stored.version)
    except ImportVerifyError as exc:
        context = {"request_id": creds.origin.request_id, "path": creds.origin.path} if creds.origin.request_id \
            else {}
        record_refusal(record, back, exc, "import", **context)
        raise
    finally:
        creds.wipe()


def _compare(stored: Stored, data: Mapping[str, Any], fields: Mapping[str, Secret], version_ok: bool) -> None:
    bad = [name for name, secret in fields.items() if not _same(data.get(name), secret)]
    extra = sorted(set(data) - set(fields))
    if bad or extra or not version_ok:
        what = (f"fields {', '.join(bad)} differ" if bad else
                f"unexpected fields {', '.join(extra)}" if extra else "another version was read")
        raise ImportVerifyError(
            f"the copy stored at {stored.target} {stored.location} does not match the file: {what}",
            "the plaintext file was kept; check who else writes there, then import again",
        )


# -- keyring ---------------------------------------------------------------------------
def store_keyring(service: str, fields: Mapping[str, Secret], *, force: bool = False,
                  profile: Profile | None = None) -> Stored:
    """Write each field as an entry of ``service`` (refusing to replace one unless ``force``)."""
    from .sources.keyring import backend_for, call_backend

    backend = backend_for(profile)
    if not force:
        present = [n for n in fields if call_backend("read", service, backend.get_password, service, n) is not None]
        if present:
            raise ConfigError(
                f"the OS keyring already holds {', '.join(present)} for service {service!r}",
                "pass --force to replace them, or delete them with `credbroker keyring delete`",
            )
    for name, secret in fields.items():
        call_backend("write to", service, backend.set_password, service, name, secret.reveal_str())
    return Stored("keyring", service, tuple(fields))


# -- deleting the plaintext --------------------------------------------------------------
@dataclass(frozen=True)
class Shredded:
    """What ``shred`` did."""

    path: Path
    bytes_overwritten: int
    #: other hard links to the same data (their names stay, showing the overwritten bytes)
    other_links: int


def shred(path: str | os.PathLike[str]) -> Shredded:
    """Overwrite ``path`` with random bytes, flush to disk, truncate, unlink, flush the folder.

    Refuses symlinks (unlinking one would leave the data behind) and anything
    that is not a regular file. See ``SHRED_WARNING`` for what no program can do.
    """
    p = Path(path)
    try:
        st = p.lstat()
    except OSError as exc:
        raise ShredError(f"cannot delete {p}: {exc.strerror}", "check the path") from None
    if stat.S_ISLNK(st.st_mode):
        raise ShredError(f"{p} is a symbolic link; not deleting it", "delete the file it points to by hand")
    if not stat.S_ISREG(st.st_mode):
        raise ShredError(f"{p} is not a regular file; not deleting it", "delete it by hand")
    flags = os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(p, flags)
    except OSError as exc:
        raise ShredError(f"cannot open {p} to overwrite it: {exc.strerror}", "check its permissions") from None
    size = st.st_size
    try:
        written = 0
        chunk = 64 * 1024
        while written < size:
            n = min(chunk, size - written)
            written += os.write(fd, os.urandom(n))
        os.fsync(fd)
        os.ftruncate(fd, 0)
        os.fsync(fd)
    except OSError as exc:
        raise ShredError(f"overwriting {p} failed: {exc.strerror}", "delete it by hand, then rotate the key") from None
    finally:
        os.close(fd)
    try:
        os.unlink(p)
    except OSError as exc:
        raise ShredError(f"{p} was overwritten but could not be removed: {exc.strerror}",
                         "remove it by hand") from None
    try:
        dfd = os.open(p.parent if str(p.parent) else Path("."), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # some filesystems cannot fsync a folder; the unlink itself succeeded
    return Shredded(path=p, bytes_overwritten=size, other_links=max(0, st.st_nlink - 1))


# -- the whole import, as `credbroker import` runs it ----------------------------------------
#: ``record(event, fields)``: the audit log's ``AuditLog.record``, or a test's list.append.


@dataclass(frozen=True)
class ImportResult:
    """A verified import (no secret): what was stored where, and what the file still holds."""

    file: Path
    stored: Stored
    #: store field -> the file key it came from
    sources: Mapping[str, str]
    left_out: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {"file": str(self.file), **self.stored.to_dict(), "verified": True, "left_out": list(self.left_out)}


def import_plaintext(
    path: str | os.PathLike[str],
    *,
    target: str,
    location: str,
    mount: str = "",
    env: Mapping[str, str] | None = None,
    profile: Profile | None = None,
    mapping: Mapping[str, str] | None = None,
    fmt: str | None = None,
    force: bool = False,
    record: Recorder | None = None,
) -> ImportResult:
    """Read ``path``, store its values in Vault (``mount``/``location``) or the keyring
    (service ``location``), read them back and verify; the plaintext file is left alone."""
    if target not in ("vault", "keyring"):
        raise ConfigError(f"unknown import target {target!r}", 'use "vault" or "keyring"')
    plain = read_plaintext(path, fmt)
    environ = os.environ if env is None else env
    rec: Recorder = record if record is not None else _not_recorded
    settings: VaultSettings | None = None
    try:
        sel = select_fields(plain, mapping, profile)
        if target == "vault":
            from .vault.settings import VaultSettings

            settings = VaultSettings.from_env(environ)  # once: the write and the read-back use them
            stored = store_vault(settings, mount, location, sel.fields, force=force)
        else:
            stored = store_keyring(location, sel.fields, force=force, profile=profile)
        verify_read_back(stored, sel.fields, mount=mount, profile=profile, env=environ, settings=settings,
                         record=rec)
    finally:
        plain.wipe()
    result = ImportResult(file=plain.path, stored=stored, sources=dict(sel.sources), left_out=sel.left_out)
    if record is not None:
        record(Event.SECRET_IMPORTED, {
            "file": str(plain.path.resolve()), "target": stored.target, "location": stored.location,
            "version": stored.version, "address": stored.address, "fields": list(stored.fields),
            "profile": profile.name if profile is not None else None, "forced": force,
        })
    return result


def _not_recorded(event: str, fields: Mapping[str, Any]) -> None:
    """A library caller that passes no recorder: the import records nothing (``credbroker import`` always
    passes its audit log's)."""


def _same(value: object, secret: Secret) -> bool:
    """``value`` (a Secret read back, or text) holds exactly ``secret``'s bytes; compared in constant time."""
    if isinstance(value, Secret):
        return hmac.compare_digest(value.reveal(), secret.reveal())
    return isinstance(value, str) and hmac.compare_digest(value.encode("utf-8"), secret.reveal())


def delete_plaintext(result: ImportResult, *, record: Recorder | None = None) -> Shredded:
    """Shred the imported file; refused while it holds keys that were not imported."""
    if result.left_out:
        raise ConfigError(
            f"not deleting {result.file}: it also holds {', '.join(result.left_out)}, which were not imported",
            "import them with --field, or move them out of the file, then delete it",
        )
    full = str(result.file.resolve())
    shredded = shred(result.file)
    if record is not None:
        record(Event.PLAINTEXT_DELETED, {"file": full, "bytes_overwritten": shredded.bytes_overwritten,
                                         "other_links": shredded.other_links})
    return shredded
