"""`credbroker keyring ...`: put a bot's secret into the OS keyring, safely.

Values are read from a no-echo prompt (typed twice) or, when stdin is not a
terminal, from stdin; never from argv, which every local user can read in
/proc/PID/cmdline.

Every change is recorded in the audit log (``keyring_set``,
``keyring_deleted``: profile, field, service; never the value). The log is
opened before the keyring is touched: a change that cannot be recorded is
not made.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from ..config import Profile
from ..errors import ConfigError
from ..secret import Secret
from ..events import Event


def _audit(ctx: click.Context) -> Any:
    """The audit log's ``record``, checked writable first (fail closed)."""
    from ..audit import open_log
    from ..config import load, with_config_defaults

    config = load(ctx.obj.get("config_path") if ctx.obj else None)
    log = open_log(config.audit or None, env=with_config_defaults(os.environ, config))
    log.check_writable()
    return log.record


def _profile(ctx: click.Context, name: str, service: str | None) -> Profile:
    from ..config import load

    config = load(ctx.obj.get("config_path") if ctx.obj else None)
    if name in config.profiles:
        prof = config.profiles[name]
        if prof.source != "keyring":
            raise ConfigError(f"profile {name!r} reads from {prof.source}, not the keyring",
                              "use a keyring profile, or store the value in Vault")
        if service:
            prof = Profile(name=prof.name, source="keyring", env=prof.env, options={**prof.options, "service": service},
                           sections=prof.sections, origin=prof.origin)
        return prof
    if not service:
        # A typo (`sopt` for `spot`) would store the secret where no profile reads it.
        config.profile(name)  # raises: not found, with the profiles there are and a close match
    # With --service: entries go to that service, whether or not a profile reads it yet.
    return Profile(name=name, source="keyring", env={"_": "_"}, options={"service": service})


def read_secret_input(prompt: str) -> Secret:
    """A secret from a no-echo prompt (twice) or from stdin; never from argv."""
    if sys.stdin.isatty():
        value = click.prompt(prompt, hide_input=True, confirmation_prompt=True, err=True)
        data = value.encode()
        del value
    else:
        data = sys.stdin.buffer.read()
        if data.endswith(b"\r\n"):
            data = data[:-2]
        elif data.endswith(b"\n"):
            data = data[:-1]
    if not data:
        raise ConfigError("no value given (empty input)", "type the value at the prompt, or pipe it on stdin")
    if b"\n" in data:
        raise ConfigError("the value spans several lines", "store one line, e.g. base64 for binary keys")
    secret = Secret(data)
    del data
    return secret


@click.group("keyring")
def keyring_group() -> None:
    """Store and delete a profile's secrets in the OS keyring (values from a prompt or stdin)."""


@keyring_group.command("set")
@click.argument("profile")
@click.argument("field")
@click.option("--service", help="Keyring service (default: the profile's; required for a profile not in "
              "the config).")
@click.pass_context
def set_cmd(ctx: click.Context, profile: str, field: str, service: str | None) -> None:
    """Store FIELD of PROFILE, read from a no-echo prompt or stdin (never argv)."""
    from ..sources.keyring import service_for, store

    prof = _profile(ctx, profile, service)
    record = _audit(ctx)
    secret = read_secret_input(f"Value for {field}")
    try:
        store(prof, field, secret)
    finally:
        secret.wipe()
    record(Event.KEYRING_SET, {"profile": prof.name, "field": field, "service": service_for(prof), "source": "keyring"})
    click.echo(f"stored {field} in keyring service {service_for(prof)!r}", err=True)


@keyring_group.command("delete")
@click.argument("profile")
@click.argument("field")
@click.option("--service", help="Keyring service (default: the profile's; required for a profile not in "
              "the config).")
@click.pass_context
def delete_cmd(ctx: click.Context, profile: str, field: str, service: str | None) -> None:
    """Delete FIELD of PROFILE from the keyring."""
    from ..sources.keyring import delete, service_for

    prof = _profile(ctx, profile, service)
    record = _audit(ctx)
    delete(prof, field)
    record(Event.KEYRING_DELETED, {"profile": prof.name, "field": field, "service": service_for(prof),
                                   "source": "keyring"})
    click.echo(f"deleted {field} from keyring service {service_for(prof)!r}", err=True)
