"""Key preflight: ask the exchange what the key may do before the bot starts (issue 6, item 4).

Binance documents ``GET /sapi/v1/account/apiRestrictions`` ("Get API Key
Permission (USER_DATA)", wallet API, weight 1): a SIGNED request (``timestamp``,
optional ``recvWindow``, the ``X-MBX-APIKEY`` header) answered with a JSON
object such as::

    {"ipRestrict": false, "createTime": 1698645219000, "enableReading": true,
     "enableWithdrawals": false, "enableInternalTransfer": false, "enableFutures": false,
     "enableSpotAndMarginTrading": false, "permitsUniversalTransfer": false, ...}

A trading bot's key should have Read, Trade and Futures rights only: never
Withdraw, never Margin (margin trading borrows against the account, which a
bot's bug or a thief turns into a loss larger than the balance), and it must
be bound to the server's IP (Binance: "You must apply the IP Access
Restriction filter in order to enable withdrawals"). So credbroker refuses to
start the bot when ``enableWithdrawals`` or ``enableMargin`` is true or
``ipRestrict`` is false, unless the operator passes the override named for
exactly that danger (``--unsafe-allow-withdrawals``, ``--unsafe-allow-margin``,
``--unsafe-no-ip-restriction``), which then prints a warning at every start and
is recorded in the audit log.

``tradingAuthorityExpirationTime`` (present when the key's spot and margin
trading permission has an end date; milliseconds since the epoch) is recorded
in the audit log (``trading_authority_expires``, with the masked API key, so
the weekly review can list keys whose trading authority ends within 30 days)
and, when it is less than 14 days away (or past), a warning is printed at
every start: the bot still starts, since the key still works today.

Modes:

* ``on`` (``--preflight``): the check must succeed; anything else stops the
  run (exit 125).
* ``auto`` (the default with ``--agent`` and ``--proxy``): the check runs "when the exchange is
  reachable". Reachable means: the host name resolves and a TCP connection
  (and, for https, a verified TLS handshake) to the base URL succeeds within
  the timeout. Only a failure at that stage (no DNS, refused, connect timeout,
  no route) skips the check, with a warning and a ``preflight`` audit record
  saying ``skipped``. Once the exchange answered, every other outcome is a
  refusal (fail closed): a TLS certificate that does not verify, an HTTP
  error such as -2015 (invalid key or IP), a read timeout, a redirect, a body
  that is not the documented object, a missing or non-boolean field
  (``enableWithdrawals``, ``enableMargin``, ``ipRestrict``).
* ``off`` (``--no-preflight``, and the default without ``--agent`` or ``--proxy``).

The base URL is ``https://api.binance.com`` unless ``--preflight-url`` or
``$CREDBROKER_PREFLIGHT_URL`` names another one; under ``--proxy`` it is the
profile's ``[proxy] spot`` upstream unless one of those names another; plain ``http://`` is
accepted only for a loopback host (the tests' local server), so the API key
never crosses a network in clear text.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from . import units
from .errors import BrokerError, ConfigError
# Error classes live in errors.py; these names stay importable from here too.
from .errors import ExchangeUnreachable as ExchangeUnreachable
from .errors import PreflightError as PreflightError
from .events import Event, Recorder

DEFAULT_BASE_URL = "https://api.binance.com"
PATH = "/sapi/v1/account/apiRestrictions"
URL_VAR = "CREDBROKER_PREFLIGHT_URL"
MODES = ("auto", "on", "off")
#: Warn at every start when the key's trading authority ends sooner than this.
EXPIRY_WARN_DAYS = 14
_DAY_MS = 86_400_000
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def mode_for(*, agent: bool, flag: bool | None, proxy: bool = False) -> str:
    """The preflight mode of a run: "on" (--preflight), "off" (--no-preflight), else "auto" with --agent or
    --proxy (the bot holds no key then, but the key's rights matter as much)."""
    return "on" if flag else "off" if flag is False else ("auto" if agent or proxy else "off")


class PreflightOptions(NamedTuple):
    """How ``credbroker run`` checks the key before starting the bot."""

    mode: str = "auto"
    base_url: str = DEFAULT_BASE_URL
    unsafe_allow_withdrawals: bool = False
    unsafe_no_ip_restriction: bool = False
    timeout: float = 5.0
    recv_window: int = 5000
    unsafe_allow_margin: bool = False
    #: The base URL was named (--preflight-url or $CREDBROKER_PREFLIGHT_URL), not the default.
    url_given: bool = False
    #: Learn the exchange's clock before signing (``--proxy``: the proxy signs with it, so the key never
    #: meets a -1021 from this host's clock); otherwise only after a -1021.
    sync_clock: bool = False

    @classmethod
    def build(cls, *, mode: str, base_url: str | None = None, env: Mapping[str, str] | None = None,
              unsafe_allow_withdrawals: bool = False, unsafe_no_ip_restriction: bool = False,
              timeout: float = 5.0, unsafe_allow_margin: bool = False) -> PreflightOptions:
        """Validated options; the URL from the argument, else ``$CREDBROKER_PREFLIGHT_URL``, else Binance."""
        if mode not in MODES:
            raise ConfigError(f"unknown preflight mode {mode!r}", f"use one of: {', '.join(MODES)}")
        environ = os.environ if env is None else env
        given = base_url or environ.get(URL_VAR)
        url = (given or DEFAULT_BASE_URL).rstrip("/")
        check_base_url(url)
        return cls(mode=mode, base_url=url, unsafe_allow_withdrawals=unsafe_allow_withdrawals,
                   unsafe_no_ip_restriction=unsafe_no_ip_restriction, timeout=timeout,
                   unsafe_allow_margin=unsafe_allow_margin, url_given=bool(given))

    def for_proxy(self, settings: Any) -> PreflightOptions | None:
        """These options for a ``--proxy`` run, ``settings`` its ``ProxySettings``; None: no preflight.

        apiRestrictions is a ``/sapi/`` path, served by the spot API host: unless
        a URL was named, the preflight asks the proxy's spot upstream (the
        exchange the bot's requests go to). Binance's testnets have no ``/sapi/``
        endpoints, so ``auto`` does not run against a testnet upstream.
        """
        if self.url_given:
            return self._replace(sync_clock=True)
        if self.mode == "auto" and settings.testnet:
            return None
        url = str(settings.spot).rstrip("/")
        check_base_url(url)
        return self._replace(base_url=url, sync_clock=True)

    @classmethod
    def for_run(cls, *, agent: bool, flag: bool | None, proxy: bool = False, base_url: str | None = None,
                env: Mapping[str, str] | None = None, unsafe_allow_withdrawals: bool = False,
                unsafe_no_ip_restriction: bool = False, unsafe_allow_margin: bool = False) -> PreflightOptions:
        """``credbroker run``'s options: ``flag`` True (--preflight) requires the check, False (--no-preflight)
        skips it, None leaves it to ``agent``/``proxy``: "auto" (on when the exchange is reachable) with --agent
        or --proxy, else off."""
        return cls.build(mode=mode_for(agent=agent, flag=flag, proxy=proxy), base_url=base_url, env=env,
                         unsafe_allow_withdrawals=unsafe_allow_withdrawals,
                         unsafe_no_ip_restriction=unsafe_no_ip_restriction, unsafe_allow_margin=unsafe_allow_margin)

    @property
    def overrides(self) -> list[str]:
        """The unsafe overrides in force, by flag name."""
        out = []
        if self.unsafe_allow_withdrawals:
            out.append("--unsafe-allow-withdrawals")
        if self.unsafe_allow_margin:
            out.append("--unsafe-allow-margin")
        if self.unsafe_no_ip_restriction:
            out.append("--unsafe-no-ip-restriction")
        return out


class PreflightResult(NamedTuple):
    """What the preflight found: ``passed``, ``overridden`` (ran on an unsafe override) or ``skipped``."""

    outcome: str
    restrictions: Mapping[str, Any]
    warnings: tuple[str, ...] = ()


def check_base_url(url: str) -> None:
    """https anywhere; http only to a loopback host. Raises ConfigError."""
    parts = units.split_url(url)
    if parts is None or parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"preflight URL {url[:80]!r} is not an http(s) URL", "e.g. https://api.binance.com")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        raise ConfigError(f"preflight URL {url!r} would send the API key unencrypted",
                          "use https (plain http is accepted for a loopback test server only)")
    if parts.query or parts.fragment:
        raise ConfigError(f"preflight URL {url!r} has a query or fragment", "give the base URL only")


class _ClockRefused(Exception):
    """The exchange answered -1021: the signed timestamp is outside recvWindow by its clock."""

    def __init__(self, error: PreflightError) -> None:
        super().__init__(error.message)
        self.error = error


def fetch_restrictions(signer: Any, options: PreflightOptions) -> dict[str, Any]:
    """GET apiRestrictions, signed by ``signer``; the decoded JSON object.

    Raises ``ExchangeUnreachable`` when no connection could be made and
    ``PreflightError`` for everything after that (fail closed). A -1021
    (timestamp outside recvWindow: this host's clock is off) is asked once more
    with the exchange's clock (``signer.sync_clock`` on the same base URL), as
    the proxy and ``get_signer()`` sign with it; ``options.sync_clock`` learns
    that clock first, once the exchange is reachable.
    """
    try:
        return _fetch_once(signer, options, sync=options.sync_clock)
    except _ClockRefused as refused:
        try:
            signer.sync_clock(options.base_url, timeout=options.timeout)
        except BrokerError:
            raise refused.error from None
    try:
        return _fetch_once(signer, options)
    except _ClockRefused as refused:
        raise refused.error from None


def _fetch_once(signer: Any, options: PreflightOptions, *, sync: bool = False) -> dict[str, Any]:
    import http.client
    import ssl

    parts = urlsplit(options.base_url)
    host = parts.hostname or ""
    port = parts.port
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=options.timeout, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=options.timeout)
    where = f"{parts.scheme}://{parts.netloc}"
    try:
        try:
            conn.connect()
        except ssl.SSLError as exc:
            # Something answered, but not with a certificate we trust: never "unreachable".
            raise PreflightError(f"key preflight: TLS with {where} failed ({exc.reason or type(exc).__name__})",
                                 "check the preflight URL and the system's CA certificates") from None
        except (OSError, socket.timeout) as exc:
            raise ExchangeUnreachable(f"key preflight: cannot reach {where} ({_why(exc)})",
                                      "check the network, or pass --no-preflight") from None
        if sync:
            try:
                signer.sync_clock(options.base_url, timeout=options.timeout)
            except BrokerError:
                pass  # this host's clock, then; a -1021 asks the clock once more
        query = signer.sign_params({}, recv_window=options.recv_window)
        target = (parts.path.rstrip("/") + PATH) + "?" + query
        try:
            conn.request("GET", target, headers={"X-MBX-APIKEY": str(signer.api_key), "Accept": "application/json",
                                                 "User-Agent": "credbroker-preflight"})
            response = conn.getresponse()
            body = response.read(1 << 20)
        except (OSError, socket.timeout, http.client.HTTPException) as exc:
            raise PreflightError(f"key preflight: {where} did not answer ({_why(exc)})",
                                 "retry, or pass --no-preflight to start without the check") from None
        del query
    finally:
        conn.close()
    if response.status != 200:
        from .signing.binance import parse_error

        code, msg = parse_error(body)
        detail = f"{code} {msg}" if code is not None else (msg or response.reason or "")
        error = PreflightError(f"key preflight: the exchange answered HTTP {response.status} {detail}".strip(),
                               "check the API key and its IP allow-list on the exchange, or pass --no-preflight")
        if code == -1021:
            raise _ClockRefused(error)
        raise error
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise PreflightError("key preflight: the exchange's answer is not a JSON object",
                             "check the preflight URL (it must be Binance's API)")
    return data


def check(restrictions: Mapping[str, Any], options: PreflightOptions) -> PreflightResult:
    """Judge the restrictions; raise PreflightError, or return passed/overridden with warnings."""
    for field in ("enableWithdrawals", "ipRestrict", "enableMargin"):
        if not isinstance(restrictions.get(field), bool):
            raise PreflightError(f"key preflight: the answer has no boolean {field}",
                                 "check the preflight URL (it must be Binance's apiRestrictions)")
    warnings: list[str] = []
    if restrictions["enableWithdrawals"]:
        if not options.unsafe_allow_withdrawals:
            raise PreflightError("key preflight: this API key can withdraw funds (enableWithdrawals is true)",
                                 "turn off \"Enable Withdrawals\" for the key on the exchange "
                                 "(or pass --unsafe-allow-withdrawals, not recommended)")
        warnings.append("UNSAFE: this API key can withdraw funds (enableWithdrawals is true); "
                        "started anyway because of --unsafe-allow-withdrawals")
    # Portfolio margin is margin too (Binance documents the field for keys that have it; judged when given).
    for field, what, switch in (("enableMargin", "trade on margin", "Enable Margin Loan, Repay & Transfer"),
                                ("enablePortfolioMarginTrading", "trade on portfolio margin",
                                 "Enable Portfolio Margin Trading")):
        if restrictions.get(field) is not True:
            continue
        if not options.unsafe_allow_margin:
            raise PreflightError(f"key preflight: this API key can {what} ({field} is true)",
                                 f"turn off \"{switch}\" for the key on the exchange "
                                 "(or pass --unsafe-allow-margin, not recommended)")
        warnings.append(f"UNSAFE: this API key can {what} ({field} is true); "
                        "started anyway because of --unsafe-allow-margin")
    if not restrictions["ipRestrict"]:
        if not options.unsafe_no_ip_restriction:
            raise PreflightError("key preflight: this API key is not restricted to trusted IPs (ipRestrict is false)",
                                 "restrict the key to this server's IP on the exchange "
                                 "(or pass --unsafe-no-ip-restriction, not recommended)")
        warnings.append("UNSAFE: this API key works from any IP address (ipRestrict is false); "
                        "started anyway because of --unsafe-no-ip-restriction")
    return PreflightResult("overridden" if warnings else "passed", dict(restrictions), tuple(warnings))


#: The fields of the answer kept in the audit record (booleans and times only).
_AUDITED = ("ipRestrict", "enableWithdrawals", "enableReading", "enableSpotAndMarginTrading", "enableFutures",
            "enableMargin", "enableInternalTransfer", "permitsUniversalTransfer", "enableVanillaOptions",
            "enablePortfolioMarginTrading", "createTime", "tradingAuthorityExpirationTime")


def run_preflight(
    signer: Any,
    options: PreflightOptions,
    *,
    profile: str,
    record: Recorder,
    warn: Callable[[str], None] | None = None,
    now: Callable[[], float] = time.time,
) -> PreflightResult | None:
    """Run the preflight as ``options.mode`` says; record it; raise PreflightError to stop the run.

    Returns None when the mode is ``off``. Warnings go to ``warn`` (stderr by default), every time.
    ``now`` (seconds since the epoch) dates the trading authority's expiry.
    """
    say = warn or (lambda m: print(f"credbroker: {m}", file=sys.stderr, flush=True))
    if options.mode == "off":
        for flag in options.overrides:
            say(f"WARNING: {flag} is given but the key preflight is off, so it has no effect")
        return None
    base: dict[str, Any] = {"profile": profile, "url": options.base_url + PATH, "mode": options.mode,
                            "overrides": options.overrides}
    api_key = getattr(signer, "api_key", None)
    if api_key:
        from .secret import mask_id

        base["api_key"] = mask_id(str(api_key))
    try:
        restrictions = fetch_restrictions(signer, options)
    except ExchangeUnreachable as exc:
        if options.mode == "on":
            record(Event.PREFLIGHT, {**base, "outcome": "refused", "reason": exc.message})
            raise
        record(Event.PREFLIGHT, {**base, "outcome": "skipped", "reason": exc.message})
        say(f"WARNING: {exc.message}; the key's restrictions were NOT checked (pass --preflight to require it)")
        for flag in options.overrides:
            say(f"WARNING: {flag} is given; it would have let an unsafe key start")
        return PreflightResult("skipped", {}, (exc.message,))
    except PreflightError as exc:
        record(Event.PREFLIGHT, {**base, "outcome": "refused", "reason": exc.message})
        raise
    audited = {k: restrictions[k] for k in _AUDITED if isinstance(restrictions.get(k), (bool, int))}
    try:
        result = check(restrictions, options)
    except PreflightError as exc:
        record(Event.PREFLIGHT, {**base, "outcome": "refused", "reason": exc.message, "restrictions": audited})
        raise
    expiry = trading_authority(restrictions, now() * 1000)
    if expiry is not None:
        base["trading_authority_expires"] = expiry.iso
        base["trading_authority_days_left"] = expiry.days_left
    record(Event.PREFLIGHT, {**base, "outcome": result.outcome, "restrictions": audited})
    for line in result.warnings:
        say(line)
    if expiry is not None and expiry.warning:
        say(expiry.warning)
    # An override that is not needed is still a loaded gun: say so at every start.
    if options.unsafe_allow_withdrawals and not restrictions["enableWithdrawals"]:
        say("WARNING: --unsafe-allow-withdrawals is given but this key cannot withdraw; remove the flag")
    if options.unsafe_allow_margin and not restrictions["enableMargin"]:
        say("WARNING: --unsafe-allow-margin is given but this key cannot trade on margin; remove the flag")
    if options.unsafe_no_ip_restriction and restrictions["ipRestrict"]:
        say("WARNING: --unsafe-no-ip-restriction is given but this key is IP-restricted; remove the flag")
    return result


class Expiry(NamedTuple):
    """When the key's trading authority ends: ISO time (UTC), whole days left (negative: past), a warning."""

    ms: int
    iso: str
    days_left: float
    warning: str | None


def trading_authority(restrictions: Mapping[str, Any], now_ms: float) -> Expiry | None:
    """The expiry of the key's trading authority (``tradingAuthorityExpirationTime``), or None when it has none.

    Binance: "Expiration time for spot and margin trading permission", in ms. A
    warning when it is less than ``EXPIRY_WARN_DAYS`` away or already past.
    """
    value = restrictions.get("tradingAuthorityExpirationTime")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    from datetime import datetime, timezone

    when = datetime.fromtimestamp(value / 1000, tz=timezone.utc)
    iso = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    days = round((value - now_ms) / _DAY_MS, 1)
    warning = None
    if days <= 0:
        warning = (f"WARNING: this API key's trading authority expired on {iso[:10]}: the exchange will refuse "
                   "its orders; renew the trading permission for the key on the exchange")
    elif days < EXPIRY_WARN_DAYS:
        warning = (f"WARNING: this API key's trading authority expires in {days:g} day(s), on {iso} UTC; renew the "
                   "trading permission for the key on the exchange before then")
    return Expiry(value, iso, days, warning)


def _why(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return "name not resolved"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
