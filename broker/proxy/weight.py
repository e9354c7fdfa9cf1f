"""Request weight and order rate: the proxy keeps the bot under the exchange's limits.

Binance limits each IP by *request weight* per interval (every endpoint has a
weight; the answer's ``X-MBX-USED-WEIGHT-<n><unit>`` header tells the weight
used so far in the current interval) and each account by *order count*
(``X-MBX-ORDER-COUNT-<n><unit>``). Over a limit the exchange answers HTTP 429;
"repeatedly violating rate limits and/or failing to back off after receiving
429s will result in an automated IP ban (HTTP status 418)" (Binance's
"General Info: Limits", spot and USDⓈ-M futures). Its 429 and 418 answers carry
``Retry-After`` (seconds).

So the proxy, per upstream:

- counts each request it forwards by the weight of its endpoint (``weight_of``:
  a small table for the common endpoints, ``DEFAULT_WEIGHT`` otherwise) in
  fixed windows aligned to the exchange's clock, as Binance's are;
- takes the exchange's own figure from the answer's headers (it includes what
  other processes on the same IP used), plus what it has sent since;
- refuses a request that would go over a limit itself, with Binance's own 429
  JSON (``-1003`` for weight, ``-1015`` for orders) and ``Retry-After`` up to
  the end of the window, so the exchange never sees the excess;
- after an exchange 429 or 418, refuses every request to that upstream
  locally until its ``Retry-After`` has passed.

The limits are the exchange's as ``exchangeInfo``'s ``rateLimits`` lists them
(learned from any exchangeInfo answer that passes through the proxy), the
defaults below before that, or the profile's ``[proxy.rate_limits.<upstream>]``
table, which wins over both.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

WEIGHT = "weight"
ORDERS = "orders"

#: Interval letters as Binance's headers write them (X-MBX-USED-WEIGHT-1M) -> seconds.
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: exchangeInfo's rateLimits ``interval`` -> unit letter.
_INTERVALS = {"SECOND": "s", "MINUTE": "m", "HOUR": "h", "DAY": "d"}
_HEADER = re.compile(r"^x-mbx-(used-weight|order-count)-(\d+)([smhd])\Z", re.IGNORECASE)
_KEY = re.compile(r"^(weight|orders)_(\d+)([smhd])\Z")

#: Binance's published limits (exchangeInfo ``rateLimits``, 2025): used until an exchangeInfo answer is seen.
DEFAULT_LIMITS: dict[str, dict[tuple[str, str], int]] = {
    "futures": {(WEIGHT, "1m"): 2400, (ORDERS, "10s"): 300, (ORDERS, "1m"): 1200},
    "spot": {(WEIGHT, "1m"): 6000, (ORDERS, "10s"): 100, (ORDERS, "1d"): 200000},
}

#: The weight of an endpoint the table does not list: as heavy as the heaviest common account reads.
DEFAULT_WEIGHT = {"futures": 10, "spot": 20}

# (method or "*", path) -> weight, from the endpoints' "Weight" lines in Binance's REST docs.
# A callable entry takes the parameters (e.g. depth's weight grows with ``limit``).
_FIXED: dict[tuple[str, str], int] = {
    # USDⓈ-M futures
    ("*", "/fapi/v1/ping"): 1, ("*", "/fapi/v1/time"): 1, ("*", "/fapi/v1/exchangeInfo"): 1,
    ("POST", "/fapi/v1/order"): 0, ("PUT", "/fapi/v1/order"): 1, ("DELETE", "/fapi/v1/order"): 1,
    ("GET", "/fapi/v1/order"): 1, ("POST", "/fapi/v1/batchOrders"): 5, ("PUT", "/fapi/v1/batchOrders"): 5,
    ("DELETE", "/fapi/v1/batchOrders"): 1, ("DELETE", "/fapi/v1/allOpenOrders"): 1,
    ("*", "/fapi/v2/balance"): 5, ("*", "/fapi/v3/balance"): 5, ("*", "/fapi/v2/account"): 5,
    ("*", "/fapi/v3/account"): 5, ("*", "/fapi/v2/positionRisk"): 5, ("*", "/fapi/v3/positionRisk"): 5,
    ("*", "/fapi/v1/userTrades"): 5, ("*", "/fapi/v1/allOrders"): 5, ("*", "/fapi/v1/income"): 30,
    ("*", "/fapi/v1/listenKey"): 1, ("*", "/fapi/v1/leverage"): 1, ("*", "/fapi/v1/marginType"): 1,
    ("*", "/fapi/v1/positionSide/dual"): 30, ("*", "/fapi/v1/premiumIndex"): 1,
    ("*", "/fapi/v1/fundingRate"): 1,
    # spot
    ("*", "/api/v3/ping"): 1, ("*", "/api/v3/time"): 1, ("*", "/api/v3/exchangeInfo"): 20,
    ("POST", "/api/v3/order"): 1, ("DELETE", "/api/v3/order"): 1, ("GET", "/api/v3/order"): 4,
    ("POST", "/api/v3/order/test"): 1, ("DELETE", "/api/v3/openOrders"): 1,
    ("POST", "/api/v3/order/cancelReplace"): 1, ("*", "/api/v3/account"): 20, ("*", "/api/v3/allOrders"): 20,
    ("*", "/api/v3/myTrades"): 20, ("*", "/api/v3/userDataStream"): 2, ("*", "/api/v3/klines"): 2,
    ("*", "/api/v3/avgPrice"): 2,
}

# Endpoints whose weight depends on one symbol or all: (with symbol, without).
_BY_SYMBOL: dict[str, tuple[int, int]] = {
    "/fapi/v1/openOrders": (1, 40), "/fapi/v1/ticker/price": (1, 2), "/fapi/v2/ticker/price": (1, 2),
    "/fapi/v1/ticker/24hr": (1, 40), "/fapi/v1/ticker/bookTicker": (2, 5),
    "/api/v3/openOrders": (6, 80), "/api/v3/ticker/price": (2, 4), "/api/v3/ticker/24hr": (2, 80),
    "/api/v3/ticker/bookTicker": (2, 4),
}

# Order book depth: (largest limit, weight) steps; Binance's default limit is 500 (futures) and 100 (spot).
_DEPTH = {"/fapi/v1/depth": (500, ((50, 2), (100, 5), (500, 10), (1000, 20))),
          "/api/v3/depth": (100, ((100, 5), (500, 25), (1000, 50), (5000, 250)))}
_KLINES = {"/fapi/v1/klines": ((99, 1), (499, 2), (1000, 5), (1500, 10))}

#: Requests that count as orders (X-MBX-ORDER-COUNT-*): POST creates, PUT modifies (futures).
_ORDER_PATHS = frozenset({"/fapi/v1/order", "/api/v3/order", "/api/v3/order/oco", "/api/v3/orderList/oco",
                          "/api/v3/orderList/oto", "/api/v3/orderList/otoco", "/api/v3/order/cancelReplace",
                          "/api/v3/sor/order"})


def _step(value: int, steps: Iterable[tuple[int, int]]) -> int:
    last = 0
    for top, weight in steps:
        last = weight
        if value <= top:
            return weight
    return last


def weight_of(upstream: str, method: str, path: str, params: Mapping[str, str]) -> int:
    """The request weight of one request (the table, else ``DEFAULT_WEIGHT``); 0 for ``/sapi/`` (own limits)."""
    if path.startswith("/sapi/"):
        return 0  # SAPI endpoints have their own per-IP and per-UID limits, not the /api/ weight
    fixed = _FIXED.get((method, path), _FIXED.get(("*", path)))
    if fixed is not None:
        return fixed
    if path in _BY_SYMBOL:
        one, every = _BY_SYMBOL[path]
        return one if params.get("symbol") else every
    if path in _DEPTH:
        default, steps = _DEPTH[path]
        return _step(_int(params.get("limit"), default), steps)
    if path in _KLINES:
        return _step(_int(params.get("limit"), 500), _KLINES[path])
    return DEFAULT_WEIGHT.get(upstream, 20)


def orders_of(method: str, path: str, params: Mapping[str, str]) -> int:
    """How many orders a request places (the order-rate limits count them)."""
    if path in ("/fapi/v1/batchOrders",) and method in ("POST", "PUT"):
        try:
            batch = json.loads(params.get("batchOrders", "[]"))
        except ValueError:
            return 5  # the most a batch may hold
        return max(1, len(batch)) if isinstance(batch, list) else 5
    if path in _ORDER_PATHS and method in ("POST", "PUT"):
        return 1
    return 0


def _int(raw: str | None, default: int) -> int:
    try:
        return int(raw) if raw is not None else default
    except ValueError:
        return default


def interval_seconds(interval: str) -> int:
    """``"1m"`` -> 60; ``"10s"`` -> 10."""
    return int(interval[:-1]) * _UNIT_SECONDS[interval[-1]]


def parse_limits(table: Any, where: str) -> dict[tuple[str, str], int]:
    """A ``[proxy.rate_limits.<upstream>]`` table: ``weight_1m = 2400``, ``orders_10s = 300``... Raises ConfigError."""
    from ..errors import ConfigError

    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table", "e.g. [profiles.NAME.proxy.rate_limits.futures]")
    out: dict[tuple[str, str], int] = {}
    for key, value in table.items():
        m = _KEY.match(str(key))
        if m is None:
            raise ConfigError(f"{where}.{key}: unknown key", "expected weight_<N><s|m|h|d> or orders_<N><s|m|h|d>, "
                              "e.g. weight_1m = 2400")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{where}.{key}: expected a positive whole number, got {value!r}",
                              f"e.g. {key} = 1000")
        out[(m.group(1), f"{m.group(2)}{m.group(3)}")] = value
    return out


class Verdict(NamedTuple):
    """A refusal by the limiter: HTTP status, Binance code, message, seconds to wait, and the audit rule."""

    status: int
    code: int
    message: str
    retry_after: int
    rule: str


@dataclass
class _Window:
    limit: int
    seconds: int
    start: int = 0  # window start, exchange time (ms)
    used: int = 0


class Ticket(NamedTuple):
    """What a forwarded request reserved: handed back with the answer's headers."""

    marks: dict[tuple[str, str], tuple[int, int]]  # (kind, interval) -> (window start, reserved total after it)


class Limiter:
    """One upstream's windows. Thread-safe: ``acquire`` before sending, ``observe`` with the answer."""

    def __init__(self, upstream: str, limits: Mapping[tuple[str, str], int] | None = None,
                 fixed: Mapping[tuple[str, str], int] | None = None) -> None:
        self.upstream = upstream
        self._lock = threading.Lock()
        self._fixed = dict(fixed or {})  # the profile's: never replaced by exchangeInfo
        self._windows: dict[tuple[str, str], _Window] = {}
        self._reserved: dict[tuple[str, str], int] = {}
        #: Per window: (its start, the reservation mark of the newest request whose answer was seen, the
        #: highest figure an answer gave). Answers that come back out of order are judged against these.
        self._seen: dict[tuple[str, str], tuple[int, int, int]] = {}
        self._blocked_until = 0.0  # monotonic
        self._blocked_status = 429
        self.set_limits({**dict(limits if limits is not None else DEFAULT_LIMITS.get(upstream, {})), **self._fixed})

    def set_limits(self, limits: Mapping[tuple[str, str], int]) -> None:
        """Replace the limits (the profile's own stay)."""
        merged = {**dict(limits), **self._fixed}
        with self._lock:
            self._windows = {key: self._windows.get(key, _Window(limit, interval_seconds(key[1])))
                             for key, limit in merged.items()}
            for key, limit in merged.items():
                self._windows[key].limit = limit

    def limits(self) -> dict[str, int]:
        """The limits in force, as ``{"weight_1m": 2400, ...}`` (for the audit record)."""
        with self._lock:
            return {f"{kind}_{interval}": w.limit for (kind, interval), w in sorted(self._windows.items())}

    def learn_exchange_info(self, body: bytes) -> bool:
        """Take the limits from an exchangeInfo answer's ``rateLimits``; True when some were found."""
        try:
            info = json.loads(body)
        except ValueError:
            return False
        found: dict[tuple[str, str], int] = {}
        for item in info.get("rateLimits", []) if isinstance(info, dict) else []:
            if not isinstance(item, dict):
                continue
            kind = {"REQUEST_WEIGHT": WEIGHT, "ORDERS": ORDERS}.get(str(item.get("rateLimitType")))
            unit = _INTERVALS.get(str(item.get("interval")))
            num, limit = item.get("intervalNum"), item.get("limit")
            if kind and unit and isinstance(num, int) and isinstance(limit, int) and num > 0 and limit > 0:
                found[(kind, f"{num}{unit}")] = limit
        if found:
            self.set_limits(found)
        return bool(found)

    def acquire(self, weight: int, orders: int, now_ms: int) -> Ticket | Verdict:
        """Reserve ``weight`` and ``orders`` in every window, or say why not (nothing reserved then)."""
        with self._lock:
            wait = self._blocked_until - time.monotonic()
            if wait > 0:
                status = self._blocked_status
                return Verdict(status, -1003, f"Way too many requests; the exchange answered {status} and asked to "
                               f"wait {math.ceil(wait)} s (credbroker proxy: refused locally until then)",
                               math.ceil(wait), "rate_limit:retry_after")
            wanted = {WEIGHT: weight, ORDERS: orders}
            for key, w in self._windows.items():
                self._roll(key, w, now_ms)
                amount = wanted[key[0]]
                if not amount:
                    continue
                if w.used + amount > w.limit:
                    retry = max(1, math.ceil((w.start + w.seconds * 1000 - now_ms) / 1000))
                    unit = _unit_name(key[1])
                    if key[0] == WEIGHT:
                        msg = (f"Too much request weight used; current limit is {w.limit} request weight per "
                               f"{unit}. Please use WebSocket Streams for live updates to avoid polling the API. "
                               "(credbroker proxy: refused before the exchange would ban the IP)")
                        return Verdict(429, -1003, msg, retry, f"rate_limit:weight_{key[1]}")
                    msg = (f"Too many new orders; current limit is {w.limit} orders per {unit}. "
                           "(credbroker proxy: refused before the exchange would)")
                    return Verdict(429, -1015, msg, retry, f"rate_limit:orders_{key[1]}")
            marks = {}
            for key, w in self._windows.items():
                amount = wanted[key[0]]
                if amount:
                    w.used += amount
                    self._reserved[key] = self._reserved.get(key, 0) + amount
                marks[key] = (w.start, self._reserved.get(key, 0))
            return Ticket(marks)

    def observe(self, ticket: Ticket | None, status: int, headers: Iterable[tuple[str, str]]) -> None:
        """Learn from an answer: used weight and order counts, and a 429/418's ``Retry-After``."""
        seen: dict[tuple[str, str], int] = {}
        retry_after: str | None = None
        for name, value in headers:
            m = _HEADER.match(name)
            if m is not None:
                kind = WEIGHT if m.group(1).lower() == "used-weight" else ORDERS
                try:
                    seen[(kind, f"{m.group(2)}{m.group(3).lower()}")] = int(value)
                except ValueError:
                    continue
            elif name.lower() == "retry-after":
                retry_after = value
        with self._lock:
            if status in (418, 429):
                seconds = _int(retry_after, 60 if status == 429 else 120)
                self._blocked_until = max(self._blocked_until, time.monotonic() + max(1, seconds))
                self._blocked_status = status
            for key, used in seen.items():
                w = self._windows.get(key)
                if w is None:  # an interval the limits do not name yet: count it against nothing
                    continue
                start, reserved_then = ticket.marks.get(key, (None, 0)) if ticket is not None else (w.start, 0)
                if start != w.start:
                    continue  # the answer belongs to a window that has passed
                if ticket is None:
                    w.used = used
                    continue
                # The exchange's figure (other processes on this IP included) plus what was sent after the
                # request it answers. An answer that comes back after the answer to a later request is
                # stale: what was sent after *it* includes requests the later answer's figure already
                # counts, so the later request's mark is kept, with the higher of the two figures
                # (the request processed last counted every one answered before it).
                last = self._seen.get(key)
                if last is not None and last[0] == w.start:
                    used, reserved_then = max(used, last[2]), max(reserved_then, last[1])
                self._seen[key] = (w.start, reserved_then, used)
                w.used = used + self._reserved.get(key, 0) - reserved_then

    def rate_limits(self) -> list[dict[str, Any]]:
        """The limits and what is counted in each, as Binance's WebSocket API ``rateLimits`` array writes them."""
        names = {"s": "SECOND", "m": "MINUTE", "h": "HOUR", "d": "DAY"}
        with self._lock:
            return [{"rateLimitType": "REQUEST_WEIGHT" if kind == WEIGHT else "ORDERS",
                     "interval": names[interval[-1]], "intervalNum": int(interval[:-1]), "limit": w.limit,
                     "count": w.used}
                    for (kind, interval), w in sorted(self._windows.items())]

    @staticmethod
    def _roll(key: tuple[str, str], w: _Window, now_ms: int) -> None:
        span = w.seconds * 1000
        start = now_ms - now_ms % span
        if start != w.start:
            w.start, w.used = start, 0


def _unit_name(interval: str) -> str:
    """``"1m"`` -> ``"1 MINUTE"`` (Binance's wording)."""
    names = {"s": "SECOND", "m": "MINUTE", "h": "HOUR", "d": "DAY"}
    return f"{interval[:-1]} {names[interval[-1]]}"


#: Paths whose weight or order count depends on the parameters (parsed only for these).
_PARAM_PATHS = frozenset({*_BY_SYMBOL, *_DEPTH, *_KLINES, "/fapi/v1/batchOrders"})


def cost(upstream: str, method: str, path: str, query: str, body: str) -> tuple[int, int]:
    """(request weight, orders) of one request as sent."""
    params: Mapping[str, str] = {}
    if path in _PARAM_PATHS:
        params = {**dict(parse_qsl(body, keep_blank_values=True)), **dict(parse_qsl(query, keep_blank_values=True))}
    return weight_of(upstream, method, path, params), orders_of(method, path, params)


def headers_from_rate_limits(items: Any) -> list[tuple[str, str]]:
    """A WebSocket API answer's ``rateLimits`` array as the REST headers ``Limiter.observe`` reads
    (``X-MBX-USED-WEIGHT-1M``, ``X-MBX-ORDER-COUNT-10S``); anything malformed is left out."""
    out: list[tuple[str, str]] = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        name = {"REQUEST_WEIGHT": "USED-WEIGHT", "ORDERS": "ORDER-COUNT"}.get(str(item.get("rateLimitType")))
        unit = _INTERVALS.get(str(item.get("interval")))
        num, count = item.get("intervalNum"), item.get("count")
        if name and unit and isinstance(num, int) and isinstance(count, int) and num > 0 and count >= 0:
            out.append((f"X-MBX-{name}-{num}{unit.upper()}", str(count)))
    return out
