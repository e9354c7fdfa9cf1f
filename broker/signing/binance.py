"""Binance's request-signing rules, from Binance's API documentation.

Sources (spot REST API docs, "SIGNED (TRADE and USER_DATA) Endpoint security"
and "Timing security"; the USDⓈ-M futures docs state the same rules):

- ``totalParams`` is the query string concatenated with the request body, with
  nothing in between (example 3 of "SIGNED Endpoint Examples for POST
  /api/v3/order": "There is no & between "GTC" and "quantity=1"").
- The signature covers exactly those bytes as sent; it goes in a ``signature``
  parameter, in the query string or the body.
- ``timestamp`` is the millisecond time the request was made; ``recvWindow``
  (default 5000, at most 60000) is how long after it the request stays valid.
- The API key travels in the ``X-MBX-APIKEY`` header.
- RSA and Ed25519 signatures are base64 and case sensitive; base64 carries
  ``+``, ``/`` and ``=``, so they are percent-encoded in a query string.
- Error payloads are ``{"code": -1022, "msg": "..."}``; errors.md lists the
  codes below.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from ..errors import SigningError

API_KEY_HEADER = "X-MBX-APIKEY"
DEFAULT_RECV_WINDOW = 5000
MAX_RECV_WINDOW = 60000

#: Error codes that mean key trouble (errors.md), recorded as ``signature_failure``.
KEY_TROUBLE_CODES: Mapping[int, str] = {
    -1021: "timestamp outside recvWindow",
    -1022: "invalid signature",
    -2014: "API-key format invalid",
    -2015: "invalid API-key, IP, or permissions for action",
}

Params = Mapping[str, Any] | Iterable[tuple[str, Any]]


def timestamp_ms(clock: Any = time.time) -> int:
    """Milliseconds since the epoch, as Binance's ``timestamp`` parameter wants."""
    return int(clock() * 1000)


def check_recv_window(value: object) -> int:
    """Validate a ``recvWindow`` (milliseconds, 1..60000) or raise SigningError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_RECV_WINDOW:
        raise SigningError(
            f"recvWindow must be a whole number of milliseconds from 1 to {MAX_RECV_WINDOW}, got {value!r}",
            "Binance recommends 5000 or less",
        )
    return value


def _value(name: str, value: Any) -> str:
    if isinstance(value, bool):  # Binance spells booleans in lower case
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        # Binance takes arrays as compact JSON (e.g. symbols=["BTCUSDT","BNBUSDT"]).
        return json.dumps(list(value), separators=(",", ":"))
    # Decimal and the like: their str() is what a person expects to send.
    if type(value).__name__ == "Decimal":
        return str(value)
    raise SigningError(f"parameter {name!r} has a value of type {type(value).__name__}", "pass str, int, float or bool")


def param_items(params: Params | None) -> list[tuple[str, str]]:
    """Params as (name, value) strings, in the caller's order, None values dropped."""
    if params is None:
        return []
    items = params.items() if isinstance(params, Mapping) else params
    out: list[tuple[str, str]] = []
    for name, value in items:
        if value is None:
            continue
        if name == "signature":
            raise SigningError("the parameters already contain a signature", "pass the parameters unsigned")
        if type(value) is str and type(name) is str:  # the usual case: str() would return them as they are
            out.append((name, value))
        else:
            out.append((str(name), _value(str(name), value)))
    return out


#: Text made of RFC 3986's unreserved characters only: what ``quote(text, safe="")`` leaves unchanged.
_unreserved = re.compile(r"[A-Za-z0-9_.~-]*").fullmatch


def _quote(text: str) -> str:
    # Most Binance values (symbols, numbers, enums) need no escaping: skip quote() for them.
    return text if _unreserved(text) else quote(text, safe="")


def encode(items: Iterable[tuple[str, str]]) -> str:
    """``name=value&...`` percent-encoded per RFC 3986 (space as %20), order kept."""
    plain = _unreserved  # inline, not _quote per name and value: this runs on every signature
    return "&".join([f"{k if plain(k) else quote(k, safe='')}={v if plain(v) else quote(v, safe='')}"
                     for k, v in items])


def total_params(query: str, body: str = "") -> str:
    """What is signed: the query string followed by the body, with no separator."""
    return query + body


def quote_signature(signature: str) -> str:
    """A signature as it goes into a query string or form body (base64's + / = escaped)."""
    return signature if _unreserved(signature) else quote(signature, safe="")  # hex needs no escaping


def parse_error(body: Any) -> tuple[int | None, str | None]:
    """(code, msg) of a Binance error payload; (None, None) when it is not one."""
    data = body
    if isinstance(body, (bytes, bytearray)):
        try:
            data = json.loads(bytes(body).decode("utf-8", "replace"))
        except ValueError:
            return None, None
    elif isinstance(body, str):
        try:
            data = json.loads(body)
        except ValueError:
            return None, None
    if not isinstance(data, Mapping):
        return None, None
    code = data.get("code")
    msg = data.get("msg")
    if isinstance(code, str):
        try:
            code = int(code)
        except ValueError:
            code = None
    if isinstance(code, bool) or not isinstance(code, int):
        code = None
    return code, (str(msg) if msg is not None else None)


def is_key_trouble(status: int | None, code: int | None) -> bool:
    """True for the answers that mean key trouble: the codes above, or HTTP 401."""
    return status == 401 or (code is not None and code in KEY_TROUBLE_CODES)


#: Each API's unsigned "Check Server Time" endpoint (spot and USDⓈ-M futures docs).
TIME_PATHS = {"spot": "/api/v3/time", "futures": "/fapi/v1/time"}


def time_url(url: str) -> str:
    """The time endpoint of the exchange ``url`` belongs to: futures paths ask /fapi/v1/time, others /api/v3/time."""
    from urllib.parse import urlunsplit

    from .. import units

    parts = units.split_url(url)
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise SigningError(f"{url[:80]!r} is not an exchange URL", 'e.g. "https://fapi.binance.com"')
    path = TIME_PATHS["futures" if parts.path.startswith("/fapi/") or "fapi" in parts.netloc else "spot"]
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def clock_offset_ms(url: str, *, clock: Any = time.time, timeout: float = 5.0) -> int:
    """The exchange's clock minus ours (ms), from its time endpoint (``timestamp < serverTime + 1000`` rule).

    The server read its clock somewhere between sending and receiving: the
    midpoint is the best estimate. No API key travels with this request.
    """
    import urllib.error
    import urllib.request

    target = time_url(url)
    t0 = clock()
    try:
        with urllib.request.urlopen(target, timeout=timeout) as resp:  # noqa: S310 - http(s) checked above
            data = resp.read(4096)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SigningError(f"cannot read the exchange's time at {target}: {type(exc).__name__}",
                           "check the network and the exchange URL") from None
    t1 = clock()
    server_time = None
    try:
        server_time = json.loads(data)["serverTime"]
    except (ValueError, KeyError, TypeError):
        pass
    if isinstance(server_time, bool) or not isinstance(server_time, int):
        raise SigningError(f"the exchange at {target} did not tell its time", "check the exchange URL")
    return server_time - int((t0 + t1) / 2 * 1000)


# -- WebSocket API --------------------------------------------------------------------------------
#
# Binance's WebSocket API signs differently from REST (spot "WebSocket API" docs, "SIGNED request
# security" and "SIGNED request example (HMAC)"; the USDⓈ-M futures "WebSocket API General Info"
# states the same rule): take every request parameter except ``signature``, sort them by name, and
# join them as ``name=value`` with ``&``, without percent-encoding. ``apiKey`` and ``timestamp`` are
# parameters like any other, so they are signed. HMAC signatures are lower-case hex; RSA and
# Ed25519 signatures are base64, sent as they are (a JSON string needs no escaping of + / =).

#: Binance's WebSocket API endpoints (spot "General API Information"; USDⓈ-M futures "WebSocket API
#: General Info"): production and testnet.
WS_API_URLS = {
    "spot": "wss://ws-api.binance.com:443/ws-api/v3",
    "futures": "wss://ws-fapi.binance.com/ws-fapi/v1",
}
WS_API_TESTNET_URLS = {
    "spot": "wss://ws-api.testnet.binance.vision/ws-api/v3",
    "futures": "wss://testnet.binancefuture.com/ws-fapi/v1",
}
#: The method that authenticates a WebSocket session; Binance accepts only Ed25519 keys for it.
WS_LOGON = "session.logon"

#: Each signed WebSocket API method and the REST endpoint that does the same thing, so the signing
#: policy's endpoint rules (``deny_endpoints``, ``deny_kinds``) read a WebSocket request as they read
#: the REST one. From the spot WebSocket API docs (trading, account, user data stream requests) and
#: the USDⓈ-M futures WebSocket API docs. Methods without a REST twin map to ``wsapi:METHOD``.
WS_METHOD_ENDPOINTS: Mapping[str, Mapping[str, str]] = {
    "spot": {
        "order.place": "/api/v3/order", "order.test": "/api/v3/order/test", "order.status": "/api/v3/order",
        "order.cancel": "/api/v3/order", "order.cancelReplace": "/api/v3/order/cancelReplace",
        "order.amend.keepPriority": "/api/v3/order/amend/keepPriority",
        "order.amendments": "/api/v3/order/amendments",
        "openOrders.status": "/api/v3/openOrders", "openOrders.cancelAll": "/api/v3/openOrders",
        "orderList.place": "/api/v3/order/oco", "orderList.place.oco": "/api/v3/orderList/oco",
        "orderList.place.oto": "/api/v3/orderList/oto", "orderList.place.otoco": "/api/v3/orderList/otoco",
        "orderList.status": "/api/v3/orderList", "orderList.cancel": "/api/v3/orderList",
        "openOrderLists.status": "/api/v3/openOrderList",
        "sor.order.place": "/api/v3/sor/order", "sor.order.test": "/api/v3/sor/order/test",
        "account.status": "/api/v3/account", "account.rateLimits.orders": "/api/v3/rateLimit/order",
        "account.commission": "/api/v3/account/commission",
        "allOrders": "/api/v3/allOrders", "allOrderLists": "/api/v3/allOrderList", "myTrades": "/api/v3/myTrades",
        "myPreventedMatches": "/api/v3/myPreventedMatches", "myAllocations": "/api/v3/myAllocations",
        "userDataStream.start": "/api/v3/userDataStream", "userDataStream.ping": "/api/v3/userDataStream",
        "userDataStream.stop": "/api/v3/userDataStream",
        "userDataStream.subscribe": "wsapi:userDataStream.subscribe",
        "userDataStream.subscribe.signature": "wsapi:userDataStream.subscribe.signature",
        "userDataStream.unsubscribe": "wsapi:userDataStream.unsubscribe",
        "session.logon": "wsapi:session.logon", "session.status": "wsapi:session.status",
        "session.logout": "wsapi:session.logout",
    },
    "futures": {
        "order.place": "/fapi/v1/order", "order.modify": "/fapi/v1/order", "order.cancel": "/fapi/v1/order",
        "order.status": "/fapi/v1/order",
        "account.position": "/fapi/v3/positionRisk", "v2/account.position": "/fapi/v2/positionRisk",
        "account.balance": "/fapi/v3/balance", "v2/account.balance": "/fapi/v2/balance",
        "account.status": "/fapi/v3/account", "v2/account.status": "/fapi/v2/account",
        "userDataStream.start": "/fapi/v1/listenKey", "userDataStream.ping": "/fapi/v1/listenKey",
        "userDataStream.stop": "/fapi/v1/listenKey",
        "session.logon": "wsapi:session.logon", "session.status": "wsapi:session.status",
        "session.logout": "wsapi:session.logout",
    },
}


def ws_base_method(method: str) -> str:
    """``method`` without a version prefix (``v3/session.logon`` -> ``session.logon``)."""
    return method.split("/", 1)[1] if "/" in method else method


def ws_method_endpoint(method: str, api: str = "spot") -> str | None:
    """The REST endpoint a WebSocket API ``method`` stands for (``wsapi:...`` if none); None if unknown.

    A spot method may carry a version prefix (``v3/order.place``); futures
    ``v2/account.status`` is a method of its own.
    """
    table = WS_METHOD_ENDPOINTS.get(api)
    if table is None:
        raise SigningError(f"unknown WebSocket API {api!r}", 'use "spot" or "futures"')
    found = table.get(method)
    if found is None and "/" in method:
        found = table.get(method.split("/", 1)[1])
    return found


def ws_value(name: str, value: Any) -> str:
    """One WebSocket API parameter as it is written into the signature payload.

    Strings as they are, integers in decimal, booleans as ``true``/``false``,
    arrays as compact JSON (the REST form): what the exchange reads from the
    JSON request. ``None`` (JSON null) is not a value: drop the parameter.
    """
    if type(value) is str:  # the usual case (Binance wants DECIMALs as JSON strings)
        return value
    if isinstance(value, dict):
        raise SigningError(f"WebSocket API parameter {name!r} is an object",
                           "send each parameter as a string, number, boolean or array")
    return _value(name, value)


def ws_payload(params: Mapping[str, Any]) -> str:
    """The WebSocket API signature payload: every parameter but ``signature``, sorted by name, as
    ``name=value`` joined by ``&``, with no percent-encoding (parameters whose value is null are left out)."""
    return "&".join(f"{name}={ws_value(name, params[name])}"
                    for name in sorted(params) if name != "signature" and params[name] is not None)
