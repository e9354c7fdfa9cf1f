"""The ``credbroker`` command: thin, over the ``broker`` library.

It parses, calls the library, prints, and turns a ``BrokerError`` into one
line on stderr and an exit code (125 unless the error says otherwise). A
traceback is printed only with ``--debug``. Subcommand groups live in their
own modules (``cli_audit`` ...) and are imported only when invoked, so
``credbroker run`` loads nothing it does not use.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from . import childenv

from .errors import BrokerError

EXIT_BROKER_FAILED = 125
_F = TypeVar("_F", bound=Callable[..., Any])

#: name -> "module:attribute" of a click command, imported on first use.
_LAZY_COMMANDS = {
    "audit": ("broker.cli_audit:audit", "Verify the audit log and produce the weekly review."),
    "keyring": ("broker.cli_keyring:keyring_group", "Store and delete a profile's secrets in the OS keyring."),
    "import": ("broker.cli_import:import_cmd", "Move a plaintext creds.yml / .env key file into Vault or the keyring."),
    "policy": ("broker.cli_policy:policy_group", "Print the Vault policies credbroker needs (shipped with it)."),
}


class _LazyGroup(click.Group):
    """A click group whose heavier subcommands are imported only when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_COMMANDS:
            target, short = _LAZY_COMMANDS[cmd_name]
            if ctx.resilient_parsing and "--help" not in sys.argv:
                # Listing commands (help of the group) needs only the short text.
                return click.Command(cmd_name, short_help=short, help=short)
            module_name, attr = target.split(":")
            cmd = getattr(importlib.import_module(module_name), attr)
            assert isinstance(cmd, click.Command)
            return cmd
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in _LAZY_COMMANDS:
                rows.append((name, _LAZY_COMMANDS[name][1]))
            else:
                cmd = super().get_command(ctx, name)
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


def _load_config(ctx: click.Context) -> Any:
    from .config import load

    return load(ctx.obj.get("config_path"))


RUN_HELP = """Fetch a profile's secrets and run COMMAND with them in its environment.

\b
  credbroker run --profile um-futures -- python bot.py
  credbroker run --vault-path secret/credbroker/um-futures \\
      --env BINANCE_API_KEY=api_key --env BINANCE_API_SECRET=api_secret -- python bot.py

\b
Behaviour:
  - Fail closed: every field the profile names must be fetched, or COMMAND is
    not started; credbroker exits 125 with one line saying what failed and how
    to fix it.
  - Several profiles (-p spot -p um-futures): all fetched or none; a variable
    two of them set is refused before anything is read; one audit record per
    profile; one restart for a batch of rotations; get_signer("spot") in the
    bot picks that profile's signer (with --agent, its agent). --proxy takes
    one profile.
  - The child's environment is credbroker's own, minus its Vault credentials
    (VAULT_TOKEN, BAO_TOKEN, AppRole role/secret ids) and any stale copies of
    the injected names, plus the profile's variables. CREDBROKER_RUN is set,
    and running credbroker run inside such a child is refused.
  - SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are forwarded to the
    child (a terminal's Ctrl-C reaches the child directly, once). credbroker
    exits with the child's status: 128+N if signal N ended it, 126 if COMMAND
    is not executable, 127 if it is not found.
  - The bot runs in a process group of its own. When the run ends, and when
    credbroker itself dies (even by SIGKILL: a watchdog process acts), every
    process of that group gets SIGTERM, then SIGKILL after --grace (and the
    kernel sends the bot itself SIGTERM: PR_SET_PDEATHSIG): a bot never runs
    on unsupervised, not even behind `sh -c`.
  - Rotation (--on-rotate): every --rotate-interval the secret's KV version
    is checked. restart: the new version is fetched first, then the bot gets
    SIGTERM, --grace to exit, SIGKILL, and starts again with the new values;
    signal:NAME: the bot gets that signal (with --agent the agent first
    switches to the new key, or restarts the bot if the API key changed
    too); ignore: only recorded. One action
    per version; a Vault outage never stops a healthy bot (retried with
    backoff). The broker renews its token, or logs in again with AppRole.
  - --restart on-failure restarts a bot that exits non-zero by itself, with
    backoff (1 s doubling to 60 s), from the secret already in memory.
  - --agent keeps the signing key in credbroker: the bot gets the API key
    and CREDBROKER_AGENT_SOCKET, a private socket (folder 0700, socket 0600)
    that only the bot and its children may use; get_signer() in the bot
    signs through it. The profile's [policy] (rate limit, symbols, quantity
    and notional caps, recvWindow ceiling, denied endpoints and parameters;
    withdrawals denied by default) is checked first; every signature and
    every refusal is an audit record, fsynced before the bot gets its answer.
    When the bot could read credbroker's own Vault token, AppRole files,
    audit key file or keyring, --agent refuses to start unless --user NAME
    (credbroker as root) or --sandbox (bubblewrap) separates them, or
    --unsafe-shared-credentials accepts it (warned at every start).
  - --proxy keeps the signing key in credbroker's signing proxy, for any
    Binance client: the bot gets CREDBROKER_PROXY_URL (a loopback base URL
    for its client), the API key, and a per-run proxy secret of the key's
    kind in the key's variables. The proxy checks that the connection is the
    bot's (its process tree), the proxy secret's signature, and the profile's
    [policy] on the real method, path and parameters; then re-stamps the
    timestamp with the exchange's clock, signs with the real key and forwards
    to the exchange ([proxy] in the profile: spot, futures, testnet).
  - Key preflight (on by default with --agent and --proxy when the exchange
    is reachable; --preflight requires it, --no-preflight skips it): Binance's
    GET /sapi/v1/account/apiRestrictions must show enableWithdrawals and
    enableMargin false and ipRestrict true, or the bot is not started,
    unless --unsafe-allow-withdrawals / --unsafe-allow-margin /
    --unsafe-no-ip-restriction (warned at every start). A trading authority
    (tradingAuthorityExpirationTime) ending within 14 days is warned about
    at every start and recorded. Base URL: --preflight-url or
    CREDBROKER_PREFLIGHT_URL; under --proxy else the profile's [proxy] spot
    upstream (not run by default against a testnet or with a transit key).
  - --mask replaces every injected secret value in the child's stdout and
    stderr with [credbroker:masked], also when a value is split across
    writes (a tail that may start a value is held until the next write, the
    end of the output, or a pause: 0.1 s on a terminal, 1 s on pipes; a
    value written in pieces further apart is not recognised). When
    credbroker's stdout is a terminal, the child gets a pseudo-terminal
    (isatty() is true; colours and full-screen programs work; keys and
    window size are passed on, the terminal is restored at exit);
    otherwise pipes. Not with --agent.
  - Hardening: core dumps off (also for the child), credbroker not dumpable or
    ptrace-able by other processes, secret memory locked (mlock) where the
    limits allow, and wiped once the child has started.

\b
Vault settings come from VAULT_ADDR, VAULT_TOKEN (or ~/.vault-token),
VAULT_CACERT, VAULT_NAMESPACE (BAO_* too), or [vault] in the config; AppRole
from VAULT_ROLE_ID/VAULT_SECRET_ID or role_id_file/secret_id_file.
"""


@cli.command("run", help=RUN_HELP, context_settings={"ignore_unknown_options": False})
@click.option("-p", "--profile", "profiles", metavar="NAME", multiple=True, envvar=childenv.PROFILE,
              show_envvar=True, help="Profile to use from the config file; repeat it to give the bot several "
              "(all fetched or none; a variable two of them set is refused).")
@click.option("--vault-path", metavar="MOUNT/PATH", help="One-off: KV v2 secret to read (no config needed).")
@click.option("--vault-version", type=click.IntRange(min=1), metavar="N", help="Pin a KV v2 version.")
@click.option("--transit-key", metavar="NAME", help="Transit key that decrypts vault:v1:... fields.")
@click.option("--keyring-service", metavar="SERVICE", help="One-off: OS keyring service to read.")
@click.option("-e", "--env", "env_items", multiple=True, metavar="VAR=FIELD",
              help="Inject secret FIELD as VAR (repeatable; adds to the profile's mapping). "
                   "VAR alone means field var, lower-cased: -e BINANCE_API_SECRET reads binance_api_secret.")
@click.option("-v", "--verbose", is_flag=True, help="Say which variables were injected (names, never values).")
@click.option("--on-rotate", metavar="POLICY",
              help="Follow key rotation in Vault: restart | signal:NAME | ignore (default: the profile's "
                   "[rotation] on_rotate; unset = do not watch).")
@click.option("--rotate-interval", metavar="DURATION", help="How often to check the secret's version (default 60s).")
@click.option("--grace", metavar="DURATION", help="When the bot's process group is stopped (the run ends, a "
              "rotation restart, credbroker's death): time between SIGTERM and SIGKILL (default 10s).")
@click.option("--restart", "restart_policy", type=click.Choice(["no", "on-failure"]), default="no",
              show_default=True, help="Restart a bot that fails by itself, with backoff, from the secret in memory.")
@click.option("--mask", is_flag=True, help="Replace injected secret values in the bot's stdout and stderr with "
              "[credbroker:masked] (a pseudo-terminal when stdout is a terminal).")
@click.option("--agent", is_flag=True, help="Keep the signing key in credbroker; the bot signs through a private "
              "socket (get_signer()), checked by the profile's [policy]. The bot gets the API key only.")
@click.option("--proxy", is_flag=True, help="Keep the signing key in credbroker's signing proxy: the bot's Binance "
              "client points at $CREDBROKER_PROXY_URL and signs with a per-run proxy secret.")
@click.option("--preflight/--no-preflight", "preflight_flag", default=None,
              help="Check the key's restrictions on the exchange before starting (default: on with --agent or "
                   "--proxy when the exchange is reachable, off otherwise).")
@click.option("--preflight-url", metavar="URL", help="Exchange base URL for the preflight (default "
              "$CREDBROKER_PREFLIGHT_URL, else with --proxy the [proxy] spot upstream, else https://api.binance.com).")
@click.option("--unsafe-allow-withdrawals", is_flag=True,
              help="UNSAFE: start even though the key can withdraw funds (warned at every start).")
@click.option("--unsafe-allow-margin", is_flag=True,
              help="UNSAFE: start even though the key can trade on margin (warned at every start).")
@click.option("--unsafe-no-ip-restriction", is_flag=True,
              help="UNSAFE: start even though the key is not restricted to trusted IPs (warned at every start).")
@click.option("--user", "as_user", metavar="NAME", help="Run the bot as this user (credbroker must be root or "
              "hold CAP_SETUID); with --agent the socket admits that user only.")
@click.option("--group", "as_group", metavar="NAME", help="With --user: the bot's group (default: the user's own).")
@click.option("--sandbox", is_flag=True, help="Run the bot under bubblewrap (bwrap) with credbroker's credential "
              "files (~/.vault-token, AppRole id files, audit key file) hidden from it.")
@click.option("--unsafe-shared-credentials", is_flag=True,
              help="UNSAFE: with --agent, start even though the bot could read credbroker's own Vault credential "
                   "(warned at every start).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def run_cmd(
    ctx: click.Context,
    profiles: tuple[str, ...],
    vault_path: str | None,
    vault_version: int | None,
    transit_key: str | None,
    keyring_service: str | None,
    env_items: tuple[str, ...],
    verbose: bool,
    on_rotate: str | None,
    rotate_interval: str | None,
    grace: str | None,
    restart_policy: str,
    mask: bool,
    agent: bool,
    proxy: bool,
    preflight_flag: bool | None,
    preflight_url: str | None,
    unsafe_allow_withdrawals: bool,
    unsafe_allow_margin: bool,
    unsafe_no_ip_restriction: bool,
    as_user: str | None,
    as_group: str | None,
    sandbox: bool,
    unsafe_shared_credentials: bool,
    command: tuple[str, ...],
) -> None:
    from .config import Profile, parse_env_mapping

    config = _load_config(ctx)
    one_off = bool(env_items or vault_path or vault_version or transit_key or keyring_service)
    if len(profiles) > 1:
        from .errors import ConfigError

        if one_off:
            raise ConfigError("the one-off flags (--env, --vault-path, --vault-version, --transit-key, "
                              "--keyring-service) shape one profile, and this run names several",
                              "put each profile's mapping in the config file, or run one profile with the flags")
        profs = [config.profile(name) for name in profiles]
    else:
        base = config.profile(profiles[0]) if profiles else None
        if base is not None and not one_off:
            profs = [base]
        else:
            profs = [Profile.adhoc(
                env=parse_env_mapping(env_items),
                vault_path=vault_path,
                vault_version=vault_version,
                transit_key=transit_key,
                keyring_service=keyring_service,
                base=base,
            )]
    prof = profs[0]
    if any(p.source == "vault" for p in profs):
        from .daemon import prefork

        prefork(os.environ)  # the fetch child loads hvac while the checks below and the run's own proceed
    policies: list[Any] = [None] * len(profs)
    if on_rotate or any(p.sections.get("rotation") for p in profs):
        from .rotation import policy_from

        policies = [policy_from(p, on_rotate, rotate_interval, grace) for p in profs]
    policy = policies[0]
    preflight = None
    if agent and ctx.params.get("mask"):
        from .errors import ConfigError

        raise ConfigError("--agent and --mask exclude each other",
                          "with --agent the bot holds no secret to mask; drop --mask")
    if (agent or proxy or preflight_flag or preflight_url or unsafe_allow_withdrawals or unsafe_allow_margin
            or unsafe_no_ip_restriction):
        from .preflight import PreflightOptions

        mode = "on" if preflight_flag else "off" if preflight_flag is False else ("auto" if agent or proxy else "off")
        preflight = PreflightOptions.build(mode=mode, base_url=preflight_url,
                                           unsafe_allow_withdrawals=unsafe_allow_withdrawals,
                                           unsafe_no_ip_restriction=unsafe_no_ip_restriction,
                                           unsafe_allow_margin=unsafe_allow_margin)
    if len(profs) > 1 and proxy:
        from .errors import ConfigError

        raise ConfigError(f"--proxy serves one profile per run, and this run names {len(profs)}",
                          "start one `credbroker run --proxy -p PROFILE` per profile, or use --agent "
                          '(get_signer("PROFILE") signs for each profile of the run)')
    if proxy:
        from .errors import ConfigError
        from .proxy import check_profile

        if agent:
            raise ConfigError("--proxy and --agent exclude each other",
                              "--proxy serves any Binance client; --agent serves get_signer(): pick one")
        if policy is not None and policy.action != "ignore":
            raise ConfigError("--on-rotate does not apply to --proxy: the proxy follows key rotation itself and "
                              "the bot, which holds only the proxy secret, never needs a restart for it",
                              "run without --on-rotate; set how often the proxy checks with [proxy] "
                              "rotation_interval")
        check_profile(prof)  # a typo in [proxy] is one line, before any secret is fetched
    stop_grace = None
    if grace:
        from . import units

        stop_grace = units.seconds(grace, "--grace")
    from . import runner

    status = runner.run(profs if len(profs) > 1 else prof, list(command), config=config, verbose=verbose,
                        rotation=policies if len(profs) > 1 else policy,
                        restart=restart_policy, agent=agent, preflight=preflight, mask=mask, grace=stop_grace,
                        user=as_user, group=as_group, sandbox=sandbox,
                        unsafe_shared_credentials=unsafe_shared_credentials, proxy=proxy)
    global _RUN_ENDED
    _RUN_ENDED = True
    sys.exit(status)


#: Set once `run` has torn everything down and has the bot's status: the console script may then exit
#: without the interpreter's finalization (see ``_exit_now``).
_RUN_ENDED = False


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


@cli.command("check")
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
    from .access import check
    from .errors import ConfigError

    config = _load_config(ctx)
    if check_all == bool(profiles):
        raise ConfigError("say what to check", "give -p PROFILE, or --all for every profile in the config")
    names = sorted(config.profiles) if check_all else list(profiles)
    if check_all and not names:
        raise ConfigError(f"no profiles in {config.path or 'the config (none found)'}", "add [profiles.NAME]")
    several = check_all or len(names) > 1
    if len(profiles) > 1:  # the profiles of one run: a collision is refused as run refuses it, nothing read
        from .runner import check_profiles

        check_profiles([config.profile(name) for name in names])
    results: list[dict[str, Any]] = []
    for name in names:
        try:
            results.append(dict(check(config.profile(name), config=config)))
        except BrokerError as exc:
            if not several:
                raise
            results.append({"profile": name, "ok": False, "problems": [str(exc)], "warnings": []})
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


@cli.command("profiles")
@json_flag("Print JSON.")
@click.pass_context
def profiles_cmd(ctx: click.Context, as_json: bool) -> None:
    """List the configured profiles and where the config was found."""
    config = _load_config(ctx)
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


@cli.command("daemon")
@click.option("--socket", "socket_path", metavar="PATH",
              help="Socket path (default: $CREDBROKER_DAEMON_SOCKET, else $XDG_RUNTIME_DIR/credbroker/daemon.sock).")
def daemon_cmd(socket_path: str | None) -> None:
    """Keep the Vault client loaded so `credbroker run` starts fast.

    Optional. Runs in the foreground (use your service manager, e.g. a systemd
    user unit). `credbroker run` uses it when it is running and fetches
    in-process otherwise; CREDBROKER_DAEMON=0 turns it off for one run. It
    holds no credential between requests: each fetch carries the caller's own
    Vault settings, and only the same user may connect (SO_PEERCRED).
    """
    from pathlib import Path

    from . import daemon

    daemon.main_loop(Path(socket_path) if socket_path else daemon.socket_path(os.environ))


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
                takes_value = {"--config"} | {opt for p in run_cmd.params if isinstance(p, click.Option)
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
        if (isinstance(exc, click.NoSuchOption) and ctx is not None and ctx.command is run_cmd
                and "--" not in args):
            hint = " (the bot's command goes after --: credbroker run -p PROFILE -- python -u bot.py)"
        click.echo(f"credbroker: {exc.format_message()}{hint}", err=True)
        sys.exit(EXIT_BROKER_FAILED)
    except KeyboardInterrupt:
        click.echo("credbroker: interrupted", err=True)
        sys.exit(130)
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
        if argv is None and _RUN_ENDED and isinstance(exc.code, int):
            _exit_now(exc.code)  # the console script's `run`, finished: skip the interpreter's teardown
        raise
    sys.exit(0)
