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

from .errors import ConfigError

#: short name -> what the policy is for (the file is credbroker-<name>.hcl).
POLICIES = {
    "bot": "what one bot may do: read its own secret (a template: --name BOT fills it in)",
    "admin": "store and rotate bots' keys, manage credbroker-* transit keys",
    "auditor": "the weekly reviewer: KV metadata and audit hashes, never a secret value",
}
#: Same rule as scripts/setup-vault: a bot name can never widen a path.
BOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


def policy_text(name: str, bot: str | None = None) -> str:
    """The HCL of policy ``name`` (bot, admin, auditor); the bot template filled in with ``bot``."""
    short = name.removeprefix("credbroker-").removesuffix(".hcl")
    if short not in POLICIES:
        raise ConfigError(f"no policy named {name!r}", f"use one of: {', '.join(POLICIES)}")
    if short == "bot":
        if bot is None:
            raise ConfigError("the bot policy is a template", "give the bot's name: --name BOT")
        if not BOT_NAME.match(bot):
            raise ConfigError(f"invalid bot name {bot!r}", "use letters, digits, _ and - (max 63, no /)")
    elif bot is not None:
        raise ConfigError(f"--name is only for the bot policy, not {short!r}", "drop --name")
    text = (resources.files("broker") / "policies" / f"credbroker-{short}.hcl").read_text(encoding="utf-8")
    return text.replace("__BOT__", bot) if bot is not None else text


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
        click.echo(f"{name:<8} {f'credbroker-{name}.hcl':<23} {what}")


@policy_group.command("show")
@click.argument("name", type=click.Choice(sorted(POLICIES)), metavar="NAME")
@click.option("--name", "bot", metavar="BOT", help="The bot's name (bot policy only).")
def show_cmd(name: str, bot: str | None) -> None:
    """Print policy NAME (bot, admin or auditor) as HCL."""
    try:
        text = policy_text(name, bot)
    except ConfigError as err:  # a usage mistake: click's exit status 2 and its "Usage:" hint
        raise click.UsageError(str(err)) from err
    click.echo(text, nl=False)
