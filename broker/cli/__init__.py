"""The ``credbroker`` command: thin, over the ``broker`` library.

This module holds the root group (global options), ``main`` (one line per
error on stderr and an exit code: 125 unless the error says otherwise; a
traceback only with ``--debug``) and what every subcommand shares. Each
subcommand or group is a module of its own (``run``, ``check``, ``profiles``,
``daemon``, ``audit``, ``import_``, ``keyring``, ``policy``), imported only
when invoked, so ``credbroker run`` loads nothing it does not use.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click
from ..errors import BrokerError

EXIT_BROKER_FAILED = 125
_F = TypeVar("_F", bound=Callable[..., Any])

#: name -> ("module:attribute" of a click command, imported on first use; its short help for the group's
#: listing, or None to take it from the command itself). Every subcommand is a module of this package.
_LAZY_COMMANDS: dict[str, tuple[str, str | None]] = {
    "audit": ("broker.cli.audit:audit", "Verify the audit log and produce the weekly review."),
    "check": ("broker.cli.check:check_cmd", None),
    "daemon": ("broker.cli.daemon:daemon_cmd", None),
    "import": ("broker.cli.import_:import_cmd", "Move a plaintext creds.yml / .env key file into Vault or the keyring."),
    "keyring": ("broker.cli.keyring:keyring_group", "Store and delete a profile's secrets in the OS keyring."),
    "policy": ("broker.cli.policy:policy_group", "Print the Vault policies credbroker needs (shipped with it)."),
    "profiles": ("broker.cli.profiles:profiles_cmd", None),
    "run": ("broker.cli.run:run_cmd", None),
}


def _import_command(cmd_name: str) -> click.Command:
    module_name, attr = _LAZY_COMMANDS[cmd_name][0].split(":")
    cmd = getattr(importlib.import_module(module_name), attr)
    assert isinstance(cmd, click.Command)
    return cmd


class _LazyGroup(click.Group):
    """A click group whose subcommands are imported only when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_COMMANDS:
            short = _LAZY_COMMANDS[cmd_name][1]
            if short is not None and ctx.resilient_parsing and "--help" not in sys.argv:
                # Listing commands (help of the group) needs only the short text.
                return click.Command(cmd_name, short_help=short, help=short)
            return _import_command(cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            short = _LAZY_COMMANDS[name][1] if name in _LAZY_COMMANDS else None
            if short is not None:
                rows.append((name, short))
            else:
                cmd = self.get_command(ctx, name)
                if cmd is not None and not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _note_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    """Remember that the user asked for JSON, so that ``main`` prints an error as JSON too.

    Only an option click parsed as credbroker's own counts: a ``--json`` among the bot's
    arguments (``credbroker run -p P -- bot --json``) or as another option's value never does."""
    if value and isinstance(ctx.obj, dict):
        ctx.obj["json"] = True
    return value


def json_flag(help_text: str) -> Callable[[_F], _F]:
    """The ``--json`` option of a subcommand (its errors are JSON too)."""
    return click.option("--json", "as_json", is_flag=True, help=help_text, callback=_note_json)


def fail(err: BrokerError, *, as_json: bool = False) -> NoReturn:
    """Print one line (or a JSON object) for ``err`` and exit with its code."""
    if as_json:
        click.echo(json.dumps(err.to_dict()), err=True)
    else:
        click.echo(f"credbroker: {err}", err=True)
    sys.exit(err.exit_code)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="FILE", help="Config file (default: $CREDBROKER_CONFIG, "
              "./credbroker.toml, ~/.config/credbroker/config.toml).")
@click.option("--debug", is_flag=True, help="Print tracebacks for errors (never secret values).")
@click.option("--json", "as_json", is_flag=True, callback=_note_json, expose_value=False,
              help="Print an error as one JSON object on stderr (a subcommand's own --json does too).")
@click.version_option(package_name="credbroker", prog_name="credbroker")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, debug: bool) -> None:
    """Run trading bots with exchange API secrets from Vault/OpenBao or the OS keyring.

    Secrets are fetched into memory only, injected into the bot's environment
    (or kept in the broker), and every access is written to an audit log.
    """
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    ctx.obj["debug"] = debug


def load_config(ctx: click.Context) -> Any:
    from ..config import load

    return load(ctx.obj.get("config_path"))


def _exit_now(code: int) -> NoReturn:
    """Exit as ``sys.exit`` would, minus the interpreter's teardown of every module and object (about
    0.1 s of CPU after a run, measured): output flushed, ``atexit`` handlers run (the audit log's final
    flush), then ``os._exit``. Only once the run has ended and cleaned up after itself."""
    import atexit

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    atexit._run_exitfuncs()
    os._exit(code)


def _own_args(args: list[str]) -> tuple[list[str], list[str]]:
    """``args`` split into credbroker's own arguments and the child's command.

    The child's part starts at ``--``, or at the first word of ``run``'s COMMAND: a child's ``--json``
    or ``--debug`` is the child's, never credbroker's. Global options given after the subcommand
    (``credbroker run --debug ...``) are moved before it, where click reads them."""
    own: list[str] = []
    front: list[str] = []
    i, sub = 0, None
    takes_value = {"--config"}
    while i < len(args):
        arg = args[i]
        if arg == "--":
            break
        if sub is None and not arg.startswith("-"):
            sub = arg
            own.append(arg)
            if sub == "run":
                takes_value = {"--config"} | {opt for p in _import_command("run").params if isinstance(p, click.Option)
                                              and not p.is_flag and not p.count for opt in p.opts}
            i += 1
            continue
        if sub is not None and arg == "--debug":
            front.append(arg)
            i += 1
            continue
        if sub is not None and (arg == "--config" or arg.startswith("--config=")):
            front.extend(args[i:i + (1 if "=" in arg else 2)])
            i += 1 if "=" in arg else 2
            continue
        if sub == "run" and not arg.startswith("-"):
            break  # the bot's command: `credbroker run -p P python bot.py --json`
        own.append(arg)
        if arg in takes_value and "=" not in arg:
            own.extend(args[i + 1:i + 2])
            i += 1
        i += 1
    return front + own, args[i:]


def _run_command() -> click.Command | None:
    """``run``'s command when it was loaded (it is whenever ``run`` was invoked), else None."""
    return _import_command("run") if "broker.cli.run" in sys.modules else None


def _run_ended() -> bool:
    """True once ``run`` has torn everything down and has the bot's status (``broker.cli.run.RUN_ENDED``)."""
    module = sys.modules.get("broker.cli.run")
    return bool(getattr(module, "RUN_ENDED", False))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one line per error, tracebacks only with --debug."""
    own, rest = _own_args(sys.argv[1:] if argv is None else list(argv))
    args = own + rest
    debug = "--debug" in own
    #: what click parsed: ``json`` is set only by an option of credbroker's own (``_note_json``)
    state: dict[str, Any] = {}
    if not args:  # bare `credbroker`: the help, as help, not as an error
        click.echo(cli.get_help(click.Context(cli, info_name="credbroker", **cli.context_settings)))
        sys.exit(0)
    try:
        cli.main(args=args, prog_name="credbroker", standalone_mode=False, obj=state)
    except BrokerError as err:
        if debug:
            import traceback

            traceback.print_exc()
        fail(err, as_json=bool(state.get("json")))
    except click.exceptions.Abort:
        # click turns Ctrl-C (KeyboardInterrupt) into Abort: exit like any interrupted command.
        click.echo("credbroker: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        # Usage errors: one line, exit 125 (credbroker failed before any child ran).
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        if (isinstance(exc, click.NoSuchOption) and ctx is not None and ctx.command is _run_command()
                and "--" not in args):
            hint = " (the bot's command goes after --: credbroker run -p PROFILE -- python -u bot.py)"
        # click's own messages may span lines (a Choice lists its values one per line): one line here.
        click.echo(f"credbroker: {' '.join(exc.format_message().split())}{hint}", err=True)
        sys.exit(EXIT_BROKER_FAILED)
    except KeyboardInterrupt:
        click.echo("credbroker: interrupted", err=True)
        sys.exit(130)
    except OSError as exc:
        # A path the system refused (too long, a loop, not a folder, ...) that no BrokerError named:
        # the environment's error, not a bug, said in one line.
        if debug:
            raise
        name = "" if exc.filename is None else str(exc.filename)
        where = f" ({name if len(name) <= 120 else name[:60] + '...' + name[-40:]!r})" if name else ""
        click.echo(f"credbroker: {exc.strerror or type(exc).__name__}{where}: check the path and its permissions",
                   err=True)
        sys.exit(EXIT_BROKER_FAILED)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no tracebacks for users
        if debug:
            raise
        click.echo(
            f"credbroker: internal error (run with --debug for the traceback): {type(exc).__name__}; "
            "this is a bug in credbroker, please report it",
            err=True,
        )
        sys.exit(EXIT_BROKER_FAILED)
    except SystemExit as exc:
        if argv is None and _run_ended() and isinstance(exc.code, int):
            _exit_now(exc.code)  # the console script's `run`, finished: skip the interpreter's teardown
        raise
    sys.exit(0)
