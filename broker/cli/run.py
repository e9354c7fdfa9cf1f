"""``credbroker run``: fetch a profile's secrets and run the bot with them (the runner does the work)."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from .. import childenv
from . import load_config

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


@click.command("run", help=RUN_HELP, context_settings={"ignore_unknown_options": False})
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
    from ..config import run_profiles

    config = load_config(ctx)
    profs = run_profiles(config, profiles, env_items=env_items, vault_path=vault_path, vault_version=vault_version,
                         transit_key=transit_key, keyring_service=keyring_service)
    prof = profs[0]
    if any(p.source == "vault" for p in profs):
        from ..daemon import prefork

        prefork(os.environ)  # the fetch child loads hvac while the checks below and the run's own proceed
    policies: list[Any] = [None] * len(profs)
    if on_rotate or any(p.sections.get("rotation") for p in profs):
        from ..rotation import policy_from

        policies = [policy_from(p, on_rotate, rotate_interval, grace) for p in profs]
    policy = policies[0]
    preflight = None
    if agent and ctx.params.get("mask"):
        from ..errors import ConfigError

        raise ConfigError("--agent and --mask exclude each other",
                          "with --agent the bot holds no secret to mask; drop --mask")
    if (agent or proxy or preflight_flag or preflight_url or unsafe_allow_withdrawals or unsafe_allow_margin
            or unsafe_no_ip_restriction):
        from ..preflight import PreflightOptions

        preflight = PreflightOptions.for_run(agent=agent, flag=preflight_flag, proxy=proxy, base_url=preflight_url,
                                             unsafe_allow_withdrawals=unsafe_allow_withdrawals,
                                             unsafe_no_ip_restriction=unsafe_no_ip_restriction,
                                             unsafe_allow_margin=unsafe_allow_margin)
    if len(profs) > 1 and proxy:
        from ..errors import ConfigError

        raise ConfigError(f"--proxy serves one profile per run, and this run names {len(profs)}",
                          "start one `credbroker run --proxy -p PROFILE` per profile, or use --agent "
                          '(get_signer("PROFILE") signs for each profile of the run)')
    if proxy:
        from ..errors import ConfigError
        from ..proxy import check_profile

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
        from .. import units

        stop_grace = units.seconds(grace, "--grace")
    from ..run.options import RunOptions
    from ..run.pipeline import run

    options = RunOptions.build(profs, command, config=config, verbose=verbose, rotation=policies,
                               restart=restart_policy, agent=agent, preflight=preflight, mask=mask, grace=stop_grace,
                               user=as_user, group=as_group, sandbox=sandbox,
                               unsafe_shared_credentials=unsafe_shared_credentials, proxy=proxy)
    status = run(options)
    global RUN_ENDED
    RUN_ENDED = True
    sys.exit(status)


#: Set once `run` has torn everything down and has the bot's status: the console script may then exit
#: without the interpreter's finalization (see ``broker.cli.main``).
RUN_ENDED = False

