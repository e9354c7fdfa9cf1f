"""`credbroker policy ...`: print the Vault policies credbroker ships.

The HCL files in the clone's ``vault-policies/`` are package data too, so a
user who installed credbroker with pip can write them into Vault without a
clone: ``credbroker policy show bot --name alpha | vault policy write
credbroker-bot-alpha -``.
"""

from __future__ import annotations

import re
from importlib import resources

import click

from ..errors import ConfigError

#: short name -> what the policy is for (the file is credbroker-<name>.hcl).
POLICIES = {
    "bot": "what one bot may do: read its own secret (a template: --name BOT fills it in)",
    "admin": "store and rotate bots' keys, manage credbroker-* transit keys",
    "auditor": "the weekly reviewer: KV metadata and audit hashes, never a secret value",
    "audit-anchor": "one host's broker anchors its audit log in Vault (a template: --name HOST)",
}
#: Template policy -> (the placeholder --name fills in, the rule a name must meet, what it names). The same
#: rules as scripts/setup-vault: a name can never widen a path (no "/", "*", "+").
TEMPLATES = {
    "bot": ("__BOT__", re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}\Z"), "bot"),
    "audit-anchor": ("__HOST__", re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z"), "host"),
}


def policy_text(name: str, fill: str | None = None) -> str:
    """The HCL of policy ``name`` (bot, admin, auditor, audit-anchor); a template filled in with ``fill``."""
    short = name.removeprefix("credbroker-").removesuffix(".hcl")
    if short not in POLICIES:
        raise ConfigError(f"no policy named {name!r}", f"use one of: {', '.join(POLICIES)}")
    template = TEMPLATES.get(short)
    if template is not None:
        placeholder, rule, what = template
        if fill is None:
            raise ConfigError(f"the {short} policy is a template", f"give the {what}'s name: --name {what.upper()}")
        if not rule.match(fill):
            raise ConfigError(f"invalid {what} name {fill!r}", "use letters, digits, _ and - (max 63, no /)")
    elif fill is not None:
        raise ConfigError(f"--name is only for a template policy ({', '.join(TEMPLATES)}), not {short!r}",
                          "drop --name")
    text = (resources.files("broker") / "policies" / f"credbroker-{short}.hcl").read_text(encoding="utf-8")
    return text.replace(template[0], fill) if template is not None and fill is not None else text


@click.group("policy")
def policy_group() -> None:
    """Print the Vault policies credbroker needs (shipped with it).

    \b
      credbroker policy list
      credbroker policy show bot --name alpha | vault policy write credbroker-bot-alpha -
    """


@policy_group.command("list")
def list_cmd() -> None:
    """List the shipped policies."""
    for name, what in POLICIES.items():
        click.echo(f"{name:<13} {f'credbroker-{name}.hcl':<28} {what}")


@policy_group.command("show")
@click.argument("name", type=click.Choice(sorted(POLICIES)), metavar="NAME")
@click.option("--name", "bot", metavar="NAME", help="Fills in a template: the bot's name (bot), the host's "
              "(audit-anchor).")
def show_cmd(name: str, bot: str | None) -> None:
    """Print policy NAME (bot, admin, auditor or audit-anchor) as HCL."""
    try:
        text = policy_text(name, bot)
    except ConfigError as err:  # a usage mistake: click's exit status 2 and its "Usage:" hint
        raise click.UsageError(str(err)) from err
    click.echo(text, nl=False)
