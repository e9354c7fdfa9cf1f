"""`credbroker import FILE`: move a plaintext creds.yml / .env into Vault or the keyring.

Thin: parsing, storing, verifying and shredding live in ``broker.migrate``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from . import json_flag
from ..config import Profile
from ..errors import ConfigError

IMPORT_HELP = """Move the API keys in a plaintext FILE (creds.yml or .env) into Vault or the OS keyring.

\b
  credbroker import creds.yml --vault-path secret/credbroker/alpha
  credbroker import .env --profile um-futures --delete
  credbroker import creds.yml --keyring-service credbroker/spot --field api_secret=api_secret

\b
Steps:
  1. Read FILE: YAML as flat `key: value` lines, or .env `KEY=value` lines
     (the format from the name, or --format). Anything else (nesting, lists,
     multi-line values, anchors, $VAR expansion, unquoted YAML numbers) is
     refused with one line naming the line, never showing it.
  2. Choose what to store: --field FILEKEY=FIELD (repeatable); else, with
     --profile, the profile's fields (found in the file under the profile's
     variable name, e.g. BINANCE_API_SECRET, or under the field's own name);
     else every key under its canonical field name (BINANCE_API_KEY ->
     api_key, BINANCE_API_SECRET or secret_key -> api_secret, others
     lower-cased), and the profile block to paste is printed.
  3. Store: Vault KV v2 as a new secret (refused if one exists, unless
     --force writes a new version), or one keyring entry per field.
  4. Verify: read the stored copy back and compare every byte.
  5. Offer to delete FILE: overwrite it with random bytes, flush, unlink.
     --delete (or --yes) does it without asking, --keep never; with neither,
     a terminal asks, and anything else keeps the file. A file that also
     holds keys that were not imported is never deleted.
  The audit log records secret_imported and plaintext_deleted (file, store,
  version, field names; never a value).

Copy-on-write filesystems, SSDs, snapshots and backups may keep old copies
of the file whatever any program does: if the key was ever copied, treat it
as exposed and rotate it at the exchange.
"""


def _target(config: Any, profile_name: str | None, vault_path: str | None, keyring_service: str | None
            ) -> tuple[Profile | None, str, str, str]:
    """(profile or None, "vault"|"keyring", mount or "", path or service)."""
    if sum(x is not None for x in (profile_name, vault_path, keyring_service)) != 1:
        raise ConfigError("say where to store the keys", "give one of --profile, --vault-path, --keyring-service")
    prof: Profile | None = None
    if profile_name is not None:
        prof = config.profile(profile_name)
        if prof.source == "vault":
            from ..sources.vault import split_path

            mount, path = split_path(prof)
            return prof, "vault", mount, path
        if prof.source == "keyring":
            from ..sources.keyring import service_for

            return prof, "keyring", "", service_for(prof)
        raise ConfigError(f"profile {prof.name!r} uses source {prof.source}", "import into a vault or keyring profile")
    if vault_path is not None:
        from ..sources.vault import split_path

        mount, path = split_path(Profile(name="import", source="vault", env={}, options={"path": vault_path}))
        return None, "vault", mount, path
    assert keyring_service is not None
    if not keyring_service.strip():
        raise ConfigError("--keyring-service is empty", "name the service, e.g. credbroker/spot")
    return None, "keyring", "", keyring_service


def _parse_mapping(items: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, fld = item.partition("=")
        key, fld = key.strip(), fld.strip()
        if not key or (sep and not fld):
            raise ConfigError(f"--field {item!r} is not FILEKEY=FIELD", "e.g. --field BINANCE_API_SECRET=api_secret")
        if key in out:
            raise ConfigError(f"--field names {key} twice", "name each file key once")
        out[key] = fld or key
    return out


@click.command("import", help=IMPORT_HELP)
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("-p", "--profile", "profile_name", metavar="NAME", help="Store where this profile reads from.")
@click.option("--vault-path", metavar="MOUNT/PATH", help="Store in this Vault KV v2 secret.")
@click.option("--keyring-service", metavar="SERVICE", help="Store in the OS keyring under this service.")
@click.option("--format", "fmt", type=click.Choice(["yaml", "env"]), help="File format (default: from the name).")
@click.option("--field", "field_items", multiple=True, metavar="FILEKEY=FIELD",
              help="Import FILEKEY as FIELD (repeatable; only these are imported).")
@click.option("--force", is_flag=True, help="Replace an existing Vault secret (new version) or keyring entries.")
@click.option("--delete/--keep", "delete", default=None, help="Delete FILE after a verified import, or keep it.")
@click.option("-y", "--yes", is_flag=True, help="Answer yes to deleting FILE (same as --delete).")
@json_flag("Print the result as JSON.")
@click.pass_context
def import_cmd(ctx: click.Context, file: str, profile_name: str | None, vault_path: str | None,
               keyring_service: str | None, fmt: str | None, field_items: tuple[str, ...], force: bool,
               delete: bool | None, yes: bool, as_json: bool) -> None:
    import os

    from .. import migrate
    from ..audit import open_log
    from ..config import load
    from ..config import with_config_defaults

    if yes and delete is False:
        raise ConfigError("--yes and --keep contradict each other", "give one of them")
    if yes:
        delete = True
    mapping = _parse_mapping(field_items)
    config = load(ctx.obj.get("config_path") if ctx.obj else None)
    prof, target, mount, location = _target(config, profile_name, vault_path, keyring_service)
    env = with_config_defaults(os.environ, config)
    # Open the audit log first: an import that cannot be recorded does not start.
    record = open_log(config.audit or None, env=env).record

    result = migrate.import_plaintext(file, target=target, location=location, mount=mount, env=env, profile=prof,
                                      mapping=mapping or None, fmt=fmt, force=force, record=record)
    stored = result.stored
    names = ", ".join(f"{result.sources[f]}->{f}" if result.sources[f] != f else f for f in stored.fields)
    version = f" version {stored.version}" if stored.version is not None else ""
    def log(message: str) -> None:
        # With --json, stdout holds only the JSON object; the sentences go to stderr.
        click.echo(message, err=as_json)

    log(f"imported {len(stored.fields)} field(s) ({names}) from {result.file} into {target} {stored.location}"
        f"{version}; read back and verified")

    out: dict[str, Any] = {**result.to_dict(), "deleted": False}
    if prof is None:
        # No profile reads this yet: the block to paste, with the fields as they were stored.
        name = stored.location.rstrip("/").rsplit("/", 1)[-1] or "bot"
        snippet = migrate.profile_snippet(name, target, stored.location, result.sources)
        log("add this profile to credbroker.toml (rename it as you like):\n" + snippet.rstrip("\n"))
        out["profile_snippet"] = snippet
    shredded = _maybe_delete(result, delete, log, record)
    if shredded is not None:
        out.update(deleted=True, bytes_overwritten=shredded.bytes_overwritten, other_links=shredded.other_links)
    if as_json:
        click.echo(json.dumps(out, indent=2))


def _interactive() -> bool:
    """True when a person can answer the delete question (stdin is a terminal)."""
    return sys.stdin.isatty()


def _maybe_delete(result: Any, delete: bool | None, log: Callable[[str], None], record: Any) -> Any:
    from .. import migrate

    path = result.file
    if delete is False:
        log(f"kept {path}; delete it once the bot runs from the store (credbroker import --delete, or by hand)")
        return None
    if result.left_out and not delete:
        log(f"kept {path}: it also holds {', '.join(result.left_out)}, which were not imported "
            "(import them with --field, or move them out of the file, then delete it)")
        return None
    if delete is None:
        if not _interactive():
            log(f"kept {path}; pass --delete to overwrite and remove it")
            return None
        click.echo(migrate.SHRED_WARNING, err=True)
        if not click.confirm(f"Overwrite and delete {path} now?", default=False, err=True):
            log(f"kept {path}")
            return None
    shredded = migrate.delete_plaintext(result, record=record)
    links = (f"; {shredded.other_links} other hard link(s) to it remain (now empty): remove them too"
             if shredded.other_links else "")
    log(f"deleted {path} ({shredded.bytes_overwritten} bytes overwritten, flushed, unlinked){links}")
    if delete:  # the warning was not shown at a prompt: always say it
        click.echo(f"warning: {migrate.SHRED_WARNING}", err=True)
    return shredded
