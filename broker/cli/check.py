"""``credbroker check``: read profiles as a run would (audited) and report what was found, never the values."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from . import EXIT_BROKER_FAILED, json_flag, load_config


@click.command("check")
@click.option("-p", "--profile", "profiles", metavar="NAME", multiple=True,
              help="Profile to check (repeatable: the profiles of one `run -p A -p B`).")
@click.option("--all", "check_all", is_flag=True, help="Check every profile in the config.")
@json_flag("Print JSON.")
@click.pass_context
def check_cmd(ctx: click.Context, profiles: tuple[str, ...], check_all: bool, as_json: bool) -> None:
    """Fetch a profile's secrets and report what was found (never the values).

    Each read is recorded in the audit log, as a run's is. Beyond the read it
    checks what a run needs later: the [signer], [policy] and [rotation]
    tables, and that the token may read the metadata rotation watches. Exit
    status 125 when anything is wrong; warnings (a value ending with a
    newline) do not change it. Several -p are checked as one run would
    take them: a variable two of them set is refused before any read.
    """
    from ..checks import check_many
    from ..errors import ConfigError

    config = load_config(ctx)
    if check_all == bool(profiles):
        raise ConfigError("say what to check", "give -p PROFILE, or --all for every profile in the config")
    several = check_all or len(profiles) > 1
    results = [dict(info) for info in check_many(config, None if check_all else profiles)]
    if as_json:
        click.echo(json.dumps(results if several else results[0], indent=2))
    else:
        for info in results:
            _print_check(info)
    if not all(info["ok"] for info in results):
        sys.exit(EXIT_BROKER_FAILED)


def _print_check(info: dict[str, Any]) -> None:
    if "source" not in info:  # the read itself failed (--all goes on to the next profile)
        click.echo(f"profile {info['profile']}: FAILED: {info['problems'][0]}")
        return
    version = f" v{info['version']}" if info.get("version") is not None else ""
    state = "ok" if info["ok"] else "PROBLEMS"
    click.echo(f"profile {info['profile']}: {state}, {info['source']} {info['path']}{version}")
    for var, field_name in info["env"].items():
        click.echo(f"  {var} <- {field_name} ({info['fields'][field_name]['bytes']} bytes)")
    for line in info["warnings"]:
        click.echo(f"  warning: {line}")
    for line in info["problems"]:
        click.echo(f"  problem: {line}")
