"""The signing policy: what the signing agent agrees to sign for a profile (issue 6, item 3).

In agent mode (``credbroker run --agent``) the bot never holds the secret; it
asks the broker to sign. Before signing, the broker checks the request against
the profile's ``[profiles.NAME.policy]`` table::

    [profiles.um-futures.policy]
    rate_limit = "20/s"            # signatures per s | m | h (token bucket)
    burst = 40                     # bucket size (default: the count in rate_limit)
    symbols = ["BTCUSDT", "ETHUSDT"]           # allowed symbols (unset: any)
    max_quantity = 0.5                          # or per symbol: { BTCUSDT = 0.01, ETHUSDT = 0.5 }
    max_notional = 5000                         # quote asset; or per symbol, like max_quantity
    max_recv_window = 5000                      # ms; a request without recvWindow counts as 5000
    deny_kinds = ["withdraw", "transfer"]       # default ["withdraw"]; [] allows everything; see KINDS
    deny_params = ["address"]                   # parameter names never signed
    deny_endpoints = ["/sapi/v1/sub-account/*"] # fnmatch patterns on the URL path
    require_endpoint = false                    # true: refuse requests whose URL path is unknown

How each rule reads a request (Binance REST conventions; the parameters are
those of totalParams, i.e. the query string and the form body):

- a parameter name that occurs twice is refused: Binance itself answers -1101
  ("Duplicate values for a parameter detected"), and a policy that read the
  first copy while the exchange read the second would be bypassed;
- ``symbol``, ``symbols`` (a JSON array) and every order inside ``batchOrders``
  (a JSON array of orders, USDⓈ-M futures ``POST /fapi/v1/batchOrders``) are
  checked against ``symbols``; a request without a symbol (account queries)
  passes that rule;
- ``quantity`` is checked against ``max_quantity``; the notional is
  ``quoteOrderQty`` (spot), else ``quantity`` x ``price`` (else ``stopPrice``).
  An order with a quantity but no price (a MARKET order) has no notional the
  agent can compute (it has no market data): with ``max_notional`` set it is
  refused, unless ``max_quantity`` also bounds that symbol, which then is the
  limit that applies;
- ``deny_kinds`` names built-in groups of requests that a trading bot never
  needs (``KINDS`` below: withdraw, transfer, borrow, convert,
  api_key_management). "withdraw" is denied by default, also when a profile
  has no policy table: an operator must write ``deny_kinds = []`` to let the
  agent sign a withdrawal. A kind is refused by its URL paths, and, because
  Binance's HMAC/RSA/Ed25519 signature covers the parameters but not the URL
  path (the bot could send what was signed for ``/fapi/v1/order`` to
  ``/sapi/v1/asset/transfer``), also by its parameters: a parameter set that
  holds every required parameter of one of the kind's value-moving endpoints
  is refused whatever endpoint the bot declares. Names compare without case;
- ``rate_limit`` counts every signature the agent would otherwise give.

Every refusal raises ``PolicyRefused`` (a ``SigningError``) naming the rule;
the agent records it as a ``policy_refused`` audit event and the bot gets the
same one-line error.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase, translate
from typing import Any, NamedTuple

from . import units
from .errors import ConfigError
# Error classes live in errors.py; these names stay importable from here too.
from .errors import PolicyRefused as PolicyRefused

#: Binance's default recvWindow (ms), used when a request carries none.
DEFAULT_RECV_WINDOW = 5000

class Kind(NamedTuple):
    """A built-in ``deny_kinds`` group: what the requests of that kind look like."""

    #: fnmatch patterns on the URL path (the endpoints of the kind, reads included)
    endpoints: tuple[str, ...]
    #: parameter names no trading request needs (refused alone)
    params: tuple[str, ...]
    #: (endpoint, the parameters it requires) for each endpoint of the kind that moves value or
    #: changes the key's powers. Binance's signature covers the parameters, not the URL path, so a
    #: bot that declares an innocent endpoint could still send what it got signed to this one:
    #: a parameter set holding every required name of one of these is refused, whatever endpoint
    #: is declared. Extra parameters do not help (the exchange is assumed to ignore unknown ones).
    signatures: tuple[tuple[str, frozenset[str]], ...]


def _sig(endpoint: str, *required: str) -> tuple[str, frozenset[str]]:
    return endpoint, frozenset(name.lower() for name in required)


#: Built-in request kinds for ``deny_kinds``. Endpoints and required parameters from Binance's
#: API docs (developers.binance.com): wallet "Withdraw" (POST /sapi/v1/capital/withdraw/apply:
#: coin, address, amount), the retired POST /wapi/v3/withdraw.html, travel-rule withdrawals
#: (/sapi/v1/localentity/withdraw/apply), Gift Card "Create a single-token gift card" (token,
#: amount) and "Create a dual-token gift card" (baseToken, faceToken, baseTokenAmount): a code
#: anyone can redeem is a withdrawal. "User Universal Transfer" (POST /sapi/v1/asset/transfer: type,
#: asset, amount), "New Future Account Transfer" (POST /sapi/v1/futures/transfer: asset, amount,
#: type), cross and isolated margin transfers, "Dust Transfer" (POST /sapi/v1/asset/dust: asset),
#: the sub-account transfers (subToSub: toEmail, asset, amount; subToMaster: asset, amount;
#: universalTransfer: fromAccountType, toAccountType, asset, amount; futures/margin transfer:
#: email, asset, amount, type; futures internalTransfer; managed sub-account deposit/withdraw;
#: futures move-position: fromUserEmail, toUserEmail), margin "Borrow/Repay" (POST
#: /sapi/v1/margin/borrow-repay: asset, isIsolated, symbol, amount, type; the older loan and repay:
#: asset, amount; portfolio margin marginLoan/repayLoan), crypto loans (loanCoin, collateralCoin;
#: repay: orderId, amount), Convert (getQuote: fromAsset, toAsset; acceptQuote: quoteId; limit
#: placeOrder: baseAsset, quoteAsset, limitPrice, side, expiredType; the same under /fapi/v1/convert),
#: and the "API Key Management" endpoints that change a key's own powers (subAccountApiKey,
#: apiName, apiKey + ip).
KINDS: Mapping[str, Kind] = {
    "withdraw": Kind(
        ("/sapi/v1/capital/withdraw/*", "/wapi/*/withdraw*", "/sapi/v1/localentity/withdraw/*",
         "/sapi/v1/giftcard/*"),
        ("address", "addressTag", "withdrawOrderId"),
        (_sig("/sapi/v1/capital/withdraw/apply", "coin", "address", "amount"),
         _sig("/wapi/v3/withdraw.html", "asset", "address", "amount"),
         _sig("/sapi/v1/localentity/withdraw/apply", "coin", "address", "amount", "questionnaire"),
         _sig("/sapi/v1/giftcard/createCode", "token", "amount"),
         _sig("/sapi/v1/giftcard/buyCode", "baseToken", "faceToken", "baseTokenAmount")),
    ),
    "transfer": Kind(
        ("/sapi/v1/asset/transfer", "/sapi/v1/futures/transfer", "/sapi/v1/sub-account/*transfer*",
         "/sapi/v1/sub-account/*Transfer*", "/sapi/v*/sub-account/*/transfer", "/sapi/v1/margin/transfer", "/sapi/v1/margin/isolated/transfer",
         "/sapi/v1/asset/dust", "/sapi/v1/pay/*", "/sapi/v1/managed-subaccount/deposit",
         "/sapi/v1/managed-subaccount/withdraw", "/sapi/v1/sub-account/futures/move-position"),
        (),
        (_sig("/sapi/v1/asset/transfer", "type", "asset", "amount"),
         _sig("/sapi/v1/futures/transfer", "asset", "amount", "type"),
         _sig("/sapi/v1/margin/transfer", "asset", "amount", "type"),
         _sig("/sapi/v1/margin/isolated/transfer", "asset", "symbol", "transFrom", "transTo", "amount"),
         _sig("/sapi/v1/sub-account/transfer/subToSub", "toEmail", "asset", "amount"),
         _sig("/sapi/v1/sub-account/transfer/subToMaster", "asset", "amount"),
         _sig("/sapi/v1/sub-account/universalTransfer", "fromAccountType", "toAccountType", "asset", "amount"),
         _sig("/sapi/v1/sub-account/futures/transfer", "email", "asset", "amount", "type"),
         _sig("/sapi/v1/sub-account/margin/transfer", "email", "asset", "amount", "type"),
         _sig("/sapi/v1/sub-account/futures/internalTransfer", "fromEmail", "toEmail", "futuresType", "asset",
              "amount"),
         _sig("/sapi/v1/managed-subaccount/deposit", "toEmail", "asset", "amount"),
         _sig("/sapi/v1/managed-subaccount/withdraw", "fromEmail", "asset", "amount"),
         _sig("/sapi/v1/sub-account/futures/move-position", "fromUserEmail", "toUserEmail"),
         # Dust takes one parameter: with "transfer" denied, any request naming an asset is refused.
         _sig("/sapi/v1/asset/dust", "asset")),
    ),
    "borrow": Kind(
        ("/sapi/v1/margin/loan", "/sapi/v1/margin/repay", "/sapi/v1/margin/borrow-repay", "/papi/v1/marginLoan",
         "/papi/v1/repayLoan", "/sapi/v*/loan/*"),
        (),
        (_sig("/sapi/v1/margin/borrow-repay", "asset", "isIsolated", "symbol", "amount", "type"),
         _sig("/sapi/v1/margin/loan", "asset", "amount"),
         _sig("/sapi/v1/margin/repay", "asset", "amount"),
         _sig("/papi/v1/marginLoan", "asset", "amount"),
         _sig("/papi/v1/repayLoan", "asset", "amount"),
         _sig("/sapi/v2/loan/flexible/borrow", "loanCoin", "collateralCoin"),
         _sig("/sapi/v1/loan/borrow", "loanCoin", "collateralCoin", "loanTerm"),
         _sig("/sapi/v2/loan/flexible/repay", "loanCoin", "collateralCoin", "repayAmount"),
         _sig("/sapi/v1/loan/repay", "orderId", "amount")),
    ),
    "convert": Kind(
        ("/sapi/v1/convert/*", "/fapi/v1/convert/*", "/sapi/v1/asset/dust"),
        (),
        (_sig("/sapi/v1/convert/getQuote", "fromAsset", "toAsset"),
         _sig("/sapi/v1/convert/acceptQuote", "quoteId"),
         _sig("/sapi/v1/convert/limit/placeOrder", "baseAsset", "quoteAsset", "limitPrice", "side", "expiredType"),
         _sig("/fapi/v1/convert/getQuote", "fromAsset", "toAsset"),
         _sig("/fapi/v1/convert/acceptQuote", "quoteId"),
         _sig("/sapi/v1/asset/dust", "asset")),
    ),
    "api_key_management": Kind(
        ("/sapi/v1/sub-account/subAccountApi/*", "/sapi/v*/sub-account/subAccountApi/*", "/sapi/v1/margin/apiKey*"),
        (),
        (_sig("/sapi/v2/sub-account/subAccountApi/ipRestriction", "email", "subAccountApiKey", "status"),
         _sig("/sapi/v1/sub-account/subAccountApi/ipRestriction/ipList", "email", "subAccountApiKey"),
         _sig("/sapi/v1/margin/apiKey", "apiName"),
         # Not apiKey alone: every WebSocket API request carries it in its signed parameters.
         _sig("/sapi/v1/margin/apiKey/ip", "apiKey", "ip")),
    ),
}

_KNOWN = frozenset({"rate_limit", "burst", "symbols", "max_quantity", "max_notional", "max_recv_window",
                    "deny_kinds", "deny_params", "deny_endpoints", "require_endpoint"})


class SignRequest(NamedTuple):
    """What the agent is asked to sign: the parameters of totalParams, and where they go."""

    params: Sequence[tuple[str, str]]
    endpoint: str | None = None  # the URL path, when the client told it
    method: str | None = None

    @classmethod
    def from_parts(cls, query: str, body: str = "", endpoint: str | None = None,
                   method: str | None = None) -> SignRequest:
        """Parse the query string and the form body (percent-decoded, order kept)."""
        params: list[tuple[str, str]] = []
        for part in (query, body):
            if not part:
                continue
            encoded = "%" in part or "+" in part  # most requests: nothing to decode anywhere
            for item in part.split("&"):
                # Strict, unlike parse_qsl: each parameter is exactly NAME=VALUE with a non-empty name.
                # A raw sign(query + body) glues the last query value to the first body item; a value
                # holding '=' (or an item without one) is how that shows, and what the exchange would
                # parse differently from us, so it is refused rather than guessed.
                name, sep, value = item.partition("=")
                if not sep or not name or "=" in value:
                    raise PolicyRefused("malformed", f"the parameter {item[:40]!r} is not NAME=VALUE",
                                        "percent-encode values, and sign query and body through sign_params "
                                        "or the requests auth hook")
                if encoded and ("%" in item or "+" in item):  # most Binance parameters need no decoding
                    # Imported here, not at the top of the call: a function-level import costs as much
                    # as the rest of this parse, on every signature.
                    from urllib.parse import unquote

                    name, value = unquote(name.replace("+", " ")), unquote(value.replace("+", " "))
                params.append((name, value))
        return cls(params, endpoint or None, (method or "").upper() or None)

    def summary(self) -> dict[str, Any]:
        """What the audit record keeps: parameter names and the order's public fields, never timestamps."""
        return self._summary([k for k, _ in self.params], dict(self.params))

    def _summary(self, names: list[str], values: dict[str, str]) -> dict[str, Any]:
        # Parameter names as one comma-separated string: one field for the audit writer to check, not a list.
        listed = ",".join([k for k in names if k != "timestamp" and k != "signature"])
        out: dict[str, Any] = {"endpoint": self.endpoint, "method": self.method, "params": listed}
        for key in ("symbol", "side", "type", "quantity", "price", "quoteOrderQty"):
            if key in values:
                out[key] = values[key][:64]
        if "batchOrders" in values:
            out["batch_orders"] = len(_batch_orders(values["batchOrders"]) or [])
        return out


class Limit(NamedTuple):
    """A cap that is either global or per symbol."""

    default: Decimal | None
    per_symbol: Mapping[str, Decimal]

    def for_symbol(self, symbol: str | None) -> Decimal | None:
        if symbol is not None and symbol in self.per_symbol:
            return self.per_symbol[symbol]
        return self.default

    @property
    def set(self) -> bool:
        return self.default is not None or bool(self.per_symbol)


_NO_LIMIT = Limit(None, {})


class RateLimiter:
    """A token bucket: ``rate`` tokens a second, at most ``burst`` saved up. Thread-safe."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Take one token; False when the bucket is empty."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


class SigningPolicy:
    """A validated ``[policy]`` table; ``check(request)`` raises ``PolicyRefused`` or returns."""

    def __init__(
        self,
        *,
        rate: tuple[int, float] | None = None,
        burst: int | None = None,
        symbols: frozenset[str] | None = None,
        max_quantity: Limit = _NO_LIMIT,
        max_notional: Limit = _NO_LIMIT,
        max_recv_window: int | None = None,
        deny_kinds: tuple[str, ...] = ("withdraw",),
        deny_params: frozenset[str] = frozenset(),
        deny_endpoints: tuple[str, ...] = (),
        require_endpoint: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.symbols = symbols
        self.max_quantity = max_quantity
        self.max_notional = max_notional
        self.max_recv_window = max_recv_window
        self.deny_kinds = deny_kinds
        self.require_endpoint = require_endpoint
        params = set(deny_params)
        endpoints = list(deny_endpoints)
        signatures: list[tuple[str, str, frozenset[str]]] = []
        for kind in deny_kinds:
            endpoints.extend(KINDS[kind].endpoints)
            params.update(KINDS[kind].params)
            signatures.extend((kind, endpoint, required) for endpoint, required in KINDS[kind].signatures)
        self.deny_params = frozenset(params)
        # Parameter names compared without case: a policy must not depend on the exchange
        # reading "Address" differently from "address".
        self._deny_params_folded = {name.lower(): name for name in params}
        self.deny_endpoints = tuple(endpoints)
        # Compiled once, for every request: one regular expression that matches where any of
        # the patterns does (fnmatchcase is re.match of fnmatch.translate); the first pattern
        # that matches is looked up only for a refusal's rule name.
        self._deny_endpoint_match = (re.compile("|".join(f"(?:{translate(p)})" for p in endpoints)).match
                                     if endpoints else None)
        self._signatures = tuple(signatures)
        self._orders_unbounded = symbols is None and not max_quantity.set and not max_notional.set
        self.limiter: RateLimiter | None = None
        if rate is not None:
            count, per = rate
            self.limiter = RateLimiter(count / per, burst or count, clock)

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, table: Mapping[str, Any] | None, where: str, *,
                     clock: Callable[[], float] = time.monotonic) -> SigningPolicy:
        """Validate a raw ``[policy]`` table; ``where`` names it in errors (``FILE: profiles.X.policy``)."""
        if table is None:
            return cls(clock=clock)
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table", "write [profiles.NAME.policy]")
        for key in table:
            if key not in _KNOWN:
                raise ConfigError(f"{where}.{key}: unknown key", f"expected one of: {', '.join(sorted(_KNOWN))}")
        rate = None
        if "rate_limit" in table:
            rate = units.rate(table["rate_limit"], f"{where}.rate_limit")
        burst = table.get("burst")
        if burst is not None:
            if rate is None:
                raise ConfigError(f"{where}.burst: set without rate_limit", 'add rate_limit = "20/s", or remove burst')
            if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
                raise ConfigError(f"{where}.burst: expected a whole number >= 1, got {burst!r}", "e.g. burst = 40")
        symbols = None
        if "symbols" in table:
            raw = table["symbols"]
            if not isinstance(raw, list) or not raw or not all(isinstance(s, str) and s.strip() for s in raw):
                raise ConfigError(f"{where}.symbols: expected a non-empty list of symbols",
                                  'e.g. symbols = ["BTCUSDT"]; remove the key to allow any symbol')
            symbols = frozenset(s.strip().upper() for s in raw)
        max_quantity = _limit(table, "max_quantity", where)
        max_notional = _limit(table, "max_notional", where)
        max_rw = table.get("max_recv_window")
        if max_rw is not None and (isinstance(max_rw, bool) or not isinstance(max_rw, int) or not 0 < max_rw <= 60000):
            raise ConfigError(f"{where}.max_recv_window: expected milliseconds 1..60000, got {max_rw!r}",
                              "e.g. max_recv_window = 5000")
        deny_kinds = table.get("deny_kinds", ["withdraw"])
        if not isinstance(deny_kinds, list) or not all(isinstance(k, str) for k in deny_kinds):
            raise ConfigError(f"{where}.deny_kinds: expected a list of names", f"use some of: {', '.join(KINDS)}")
        for kind in deny_kinds:
            if kind not in KINDS:
                raise ConfigError(f"{where}.deny_kinds: unknown kind {kind!r}", f"use some of: {', '.join(KINDS)}")
        deny_params = _names(table, "deny_params", where)
        deny_endpoints = _names(table, "deny_endpoints", where)
        for pattern in deny_endpoints:
            if not pattern.startswith("/"):
                raise ConfigError(f"{where}.deny_endpoints: {pattern!r} is not a URL path",
                                  'write paths like "/sapi/v1/capital/*"')
        require = table.get("require_endpoint", False)
        if not isinstance(require, bool):
            raise ConfigError(f"{where}.require_endpoint: expected true or false, got {require!r}",
                              "e.g. require_endpoint = true")
        if symbols is not None:
            for lim, key in ((max_quantity, "max_quantity"), (max_notional, "max_notional")):
                stray = sorted(set(lim.per_symbol) - symbols)
                if stray:
                    raise ConfigError(f"{where}.{key}: {', '.join(stray)} not in symbols",
                                      "add the symbol to symbols, or remove its limit")
        return cls(rate=rate, burst=burst, symbols=symbols, max_quantity=max_quantity, max_notional=max_notional,
                   max_recv_window=max_rw, deny_kinds=tuple(dict.fromkeys(deny_kinds)),
                   deny_params=frozenset(deny_params), deny_endpoints=tuple(deny_endpoints),
                   require_endpoint=require, clock=clock)

    @classmethod
    def for_profile(cls, profile: Any, *, clock: Callable[[], float] = time.monotonic) -> SigningPolicy:
        """The policy of a ``broker.config.Profile`` (defaults when it has no ``[policy]`` table)."""
        sections = getattr(profile, "sections", None) or {}
        return cls.from_mapping(sections.get("policy"), profile.where("policy"), clock=clock)

    def describe(self) -> dict[str, Any]:
        """The policy as plain data (for the audit record of an agent start and ``--verbose``)."""
        def lim(limit: Limit) -> Any:
            if not limit.set:
                return None
            return {"default": str(limit.default) if limit.default is not None else None,
                    **{s: str(v) for s, v in limit.per_symbol.items()}}
        return {
            "rate_limit": f"{self.rate[0]}/{_per(self.rate[1])}" if self.rate else None,
            "burst": self.limiter.burst if self.limiter else None,
            "symbols": sorted(self.symbols) if self.symbols is not None else None,
            "max_quantity": lim(self.max_quantity),
            "max_notional": lim(self.max_notional),
            "max_recv_window": self.max_recv_window,
            "deny_kinds": list(self.deny_kinds),
            "deny_params": sorted(self.deny_params),
            "deny_endpoints": list(self.deny_endpoints),
            "require_endpoint": self.require_endpoint,
        }

    # -- checking ---------------------------------------------------------------------------
    def review(self, request: SignRequest) -> tuple[dict[str, Any], PolicyRefused | None]:
        """``(request.summary(), the refusal or None)``: ``check`` and the summary from one pass over the
        parameters (the signing agent's path: both for every signature)."""
        names = [k for k, _ in request.params]
        values = dict(request.params)
        summary = request._summary(names, values)
        try:
            self._check(request, names, values)
        except PolicyRefused as exc:
            return summary, exc
        return summary, None

    def check(self, request: SignRequest) -> None:
        """Raise ``PolicyRefused`` when ``request`` breaks a rule; the rate limit is checked last."""
        self._check(request, [k for k, _ in request.params], dict(request.params))

    def _check(self, request: SignRequest, names: list[str], values: dict[str, str]) -> None:
        if len(values) != len(names):
            seen: set[str] = set()
            for name in names:
                if name in seen:
                    raise PolicyRefused("duplicate_param", f"parameter {name!r} appears more than once",
                                        "send each parameter once (Binance refuses duplicates with -1101)")
                seen.add(name)
        if "signature" in values:
            raise PolicyRefused("already_signed", "the request already carries a signature",
                                "do not pass signature= yourself")
        endpoint = request.endpoint
        if endpoint is None and self.require_endpoint:
            raise PolicyRefused("require_endpoint", "the request's URL path is unknown",
                                "sign through the requests auth hook (auth=signer) or pass endpoint= to sign_params")
        if endpoint is not None and self._deny_endpoint_match is not None:
            path = endpoint.split("?", 1)[0]
            if self._deny_endpoint_match(path) is not None:
                for pattern in self.deny_endpoints:
                    if fnmatchcase(path, pattern):
                        raise PolicyRefused(self._rule_for_endpoint(pattern), f"{path} is a denied endpoint")
        folded = {name.lower() for name in names}
        for kind, target, required in self._signatures:
            if required <= folded:
                shown = ", ".join(sorted(n for n in names if n.lower() in required))
                declared = f"declared endpoint {endpoint.split('?', 1)[0]}" if endpoint else "no declared endpoint"
                raise PolicyRefused(
                    f"deny_kinds:{kind}",
                    f"the parameters {shown} make a valid {target} request ({kind}); Binance's signature "
                    f"does not cover the URL path, so the {declared} cannot make it safe",
                    f"send the order without these parameters, or remove {kind!r} from the profile's "
                    "[policy] deny_kinds if this request is intended")
        if not self._deny_params_folded.keys().isdisjoint(folded):
            for name in names:
                denied = self._deny_params_folded.get(name.lower())
                if denied is not None:
                    raise PolicyRefused(self._rule_for_param(denied), f"parameter {name!r} is denied")
        if self.max_recv_window is not None:
            self._check_recv_window(values)
        orders: list[Mapping[str, Any]] = [values]
        if "batchOrders" in values:
            batch = _batch_orders(values["batchOrders"])
            if batch is None:
                raise PolicyRefused("batchOrders", "batchOrders is not a JSON list of orders",
                                    "send batchOrders as Binance documents it: a JSON array of order objects")
            orders.extend(batch)
        if "symbols" in values and self.symbols is not None:
            try:
                listed = json.loads(values["symbols"])
            except ValueError:
                listed = None
            if not isinstance(listed, list) or not all(isinstance(s, str) for s in listed):
                raise PolicyRefused("symbols", "the symbols parameter is not a JSON list of symbols")
            for sym in listed:
                self._check_symbol(sym)
        if self._orders_unbounded:
            # No symbols, no caps: of the order rules only the quantity's form applies (what
            # _check_order comes down to then).
            for order in orders:
                _decimal(order, "quantity")
        else:
            for order in orders:
                self._check_order(order)
        if self.limiter is not None and not self.limiter.take():
            assert self.rate is not None
            raise PolicyRefused("rate_limit", f"more than {self.rate[0]} signatures per {_per(self.rate[1])}",
                                "slow the bot down, or raise rate_limit / burst in the profile's [policy]")

    def _rule_for_endpoint(self, pattern: str) -> str:
        for kind in self.deny_kinds:
            if pattern in KINDS[kind].endpoints:
                return f"deny_kinds:{kind}"
        return "deny_endpoints"

    def _rule_for_param(self, name: str) -> str:
        for kind in self.deny_kinds:
            if name in KINDS[kind].params:
                return f"deny_kinds:{kind}"
        return "deny_params"

    def _check_recv_window(self, values: Mapping[str, str]) -> None:
        if self.max_recv_window is None:
            return
        raw = values.get("recvWindow")
        try:
            window = Decimal(raw) if raw is not None else Decimal(DEFAULT_RECV_WINDOW)
        except InvalidOperation:
            raise PolicyRefused("max_recv_window", "recvWindow is not a number") from None
        if not window.is_finite() or window > self.max_recv_window:
            shown = raw if raw is not None else f"{DEFAULT_RECV_WINDOW} (Binance's default, none sent)"
            raise PolicyRefused("max_recv_window", f"recvWindow {shown} is above the ceiling {self.max_recv_window}",
                                f"send recvWindow={self.max_recv_window} or less")

    def _check_symbol(self, symbol: Any) -> None:
        if self.symbols is None:
            return
        if not isinstance(symbol, str) or symbol.strip().upper() not in self.symbols:
            raise PolicyRefused("symbols", f"symbol {str(symbol)[:32]!r} is not allowed "
                                           f"(allowed: {', '.join(sorted(self.symbols))})",
                                "trade an allowed symbol, or add it to the profile's [policy] symbols")

    def _check_order(self, order: Mapping[str, Any]) -> None:
        symbol = order.get("symbol")
        if symbol is not None:
            self._check_symbol(symbol)
        sym = str(symbol).strip().upper() if symbol is not None else None
        quantity = _decimal(order, "quantity")
        cap = self.max_quantity.for_symbol(sym)
        if quantity is not None and cap is not None and quantity > cap:
            raise PolicyRefused("max_quantity", f"quantity {quantity} is above the cap {cap}"
                                + (f" for {sym}" if sym else ""), "send a smaller order, or raise max_quantity")
        notional_cap = self.max_notional.for_symbol(sym)
        if notional_cap is None:
            return
        notional = _decimal(order, "quoteOrderQty")
        if notional is None and quantity is not None:
            price = _decimal(order, "price")
            if price is None or price == 0:
                price = _decimal(order, "stopPrice")
            if price is not None and price != 0:
                notional = quantity * price
            elif cap is None:
                raise PolicyRefused("max_notional", "the order has a quantity but no price, so its notional "
                                    "cannot be checked", "send a price (LIMIT), quoteOrderQty, or also set "
                                    "max_quantity for this symbol")
        if notional is not None and notional > notional_cap:
            raise PolicyRefused("max_notional", f"notional {notional.normalize():f} is above the cap {notional_cap}"
                                + (f" for {sym}" if sym else ""), "send a smaller order, or raise max_notional")


def _per(seconds: float) -> str:
    return {1.0: "second", 60.0: "minute", 3600.0: "hour"}.get(seconds, f"{seconds:g} s")


def _decimal(order: Mapping[str, Any], key: str) -> Decimal | None:
    raw = order.get(key)
    if raw is None or raw == "":
        return None
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise PolicyRefused("max_quantity" if key == "quantity" else "max_notional",
                            f"{key} {str(raw)[:32]!r} is not a number") from None
    if not value.is_finite() or value < 0:
        raise PolicyRefused("max_quantity" if key == "quantity" else "max_notional",
                            f"{key} {str(raw)[:32]!r} is not a finite, non-negative number")
    return value


def _batch_orders(raw: str) -> list[Mapping[str, Any]] | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, list) or not all(isinstance(o, dict) for o in data):
        return None
    return data


def _limit(table: Mapping[str, Any], key: str, where: str) -> Limit:
    raw = table.get(key)
    if raw is None:
        return _NO_LIMIT
    if isinstance(raw, Mapping):
        per: dict[str, Decimal] = {}
        default = None
        for sym, value in raw.items():
            number = _positive(value, f"{where}.{key}.{sym}")
            if sym == "default":
                default = number
            else:
                per[str(sym).strip().upper()] = number
        if not per and default is None:
            raise ConfigError(f"{where}.{key}: empty table", "give a number, or { BTCUSDT = 0.01 }")
        return Limit(default, per)
    return Limit(_positive(raw, f"{where}.{key}"), {})


def _positive(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: expected a positive number, got {value!r}", "e.g. 0.5")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(f"{where}: expected a positive number, got {value!r}", "e.g. 0.5") from None
    if not number.is_finite() or number <= 0:
        raise ConfigError(f"{where}: expected a positive number, got {value!r}", "e.g. 0.5")
    return number


def _names(table: Mapping[str, Any], key: str, where: str) -> list[str]:
    raw = table.get(key, [])
    if not isinstance(raw, list) or not all(isinstance(v, str) and v.strip() for v in raw):
        raise ConfigError(f"{where}.{key}: expected a list of names", f'e.g. {key} = ["..."]')
    return [v.strip() for v in raw]

