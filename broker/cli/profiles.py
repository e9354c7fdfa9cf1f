"""``credbroker profiles``: the configured profiles and where the config was found."""

from __future__ import annotations

import json
from typing import Any

import click

from . import json_flag, load_config


@click.command("profiles")
@json_flag("Print JSON.")
@click.pass_context
def profiles_cmd(ctx: click.Context, as_json: bool) -> None:
    """List the configured profiles and where the config was found."""
    config = load_config(ctx)
    rows = [_profile_row(p) for p in config.profiles.values()]
    where = str(config.path.resolve()) if config.path else None
    if as_json:
        click.echo(json.dumps({"config": where, "profiles": rows}, indent=2))
        return
    click.echo(f"config: {where or 'none found (see credbroker --help for where it is looked for)'}")
    if not rows:
        return
    table = [("PROFILE", "SOURCE", "READS", "VARIABLES", "SIGNER", "ROTATION", "POLICY")] + [
        (r["name"], r["source"], r["reads"], ", ".join(r["env"]), r["signer"], r["rotation"], r["policy"])
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        click.echo("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def _profile_row(p: Any) -> dict[str, Any]:
    """What `profiles` shows of one profile (no secret: where it is read from and how it is used)."""
    opts = p.options
    reads = opts.get("path") or opts.get("service") or f"credbroker/{p.name}"
    if opts.get("version"):
        reads += f" v{opts['version']}"
    signer = p.sections.get("signer")
    rotation = p.sections.get("rotation")
    policy = p.sections.get("policy")
    return {
        "name": p.name, "source": p.source, **dict(opts), "reads": reads, "env": list(p.env),
        "signer": str(signer.get("type", "auto")) if isinstance(signer, dict) else "auto",
        "rotation": str(rotation.get("on_rotate", "-")) if isinstance(rotation, dict) else "-",
        "policy": ", ".join(sorted(policy)) if isinstance(policy, dict) and policy else "-",
    }
