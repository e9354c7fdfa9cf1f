"""The signing policy (``[profiles.NAME.policy]``): validation and every rule, as pure logic.

The end-to-end refusals (a bot under ``credbroker run --agent``, audit records)
are in tests/integration/test_agent.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from broker.config import Profile
from broker.errors import ConfigError, SigningError
from broker.signing_policy import PolicyRefused, RateLimiter, SigningPolicy, SignRequest

WHERE = "/etc/credbroker.toml: profiles.bot.policy"


def policy(table: dict[str, Any] | None, **kw: Any) -> SigningPolicy:
    return SigningPolicy.from_mapping(table, WHERE, **kw)


def req(query: str, endpoint: str | None = "/fapi/v1/order", body: str = "", method: str = "POST") -> SignRequest:
    return SignRequest.from_parts(query, body, endpoint, method)


def refused(p: SigningPolicy, r: SignRequest) -> PolicyRefused:
    with pytest.raises(PolicyRefused) as info:
        p.check(r)
    assert isinstance(info.value, SigningError)
    assert "\n" not in str(info.value)
    return info.value


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("table,key,fragment", [
    ({"rate": 1}, "rate", "unknown key"),
    ({"rate_limit": "fast"}, "rate_limit", 'expected "COUNT/s"'),
    ({"rate_limit": 10}, "rate_limit", 'expected "COUNT/s"'),
    ({"rate_limit": "0/s"}, "rate_limit", 'expected "COUNT/s"'),
    ({"burst": 3}, "burst", "without rate_limit"),
    ({"rate_limit": "1/s", "burst": 0}, "burst", "whole number"),
    ({"symbols": []}, "symbols", "non-empty list"),
    ({"symbols": "BTCUSDT"}, "symbols", "non-empty list"),
    ({"max_quantity": -1}, "max_quantity", "positive number"),
    ({"max_quantity": "lots"}, "max_quantity", "positive number"),
    ({"max_quantity": True}, "max_quantity", "positive number"),
    ({"max_notional": {"BTCUSDT": 0}}, "max_notional.BTCUSDT", "positive number"),
    ({"max_notional": {}}, "max_notional", "empty table"),
    ({"max_recv_window": 70000}, "max_recv_window", "1..60000"),
    ({"deny_kinds": ["teleport"]}, "deny_kinds", "unknown kind"),
    ({"deny_kinds": "withdraw"}, "deny_kinds", "list of names"),
    ({"deny_params": [""]}, "deny_params", "list of names"),
    ({"deny_endpoints": ["sapi/v1/x"]}, "deny_endpoints", "not a URL path"),
    ({"require_endpoint": "yes"}, "require_endpoint", "true or false"),
    ({"symbols": ["BTCUSDT"], "max_quantity": {"ETHUSDT": 1}}, "max_quantity", "ETHUSDT not in symbols"),
])
def test_bad_tables_are_one_line_config_errors_naming_file_and_key(table: dict[str, Any], key: str,
                                                                   fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        policy(table)
    message = info.value.message
    assert message.startswith(f"{WHERE}.{key}"), message
    assert fragment in message and "\n" not in str(info.value)


def test_policy_from_a_profile_and_its_defaults() -> None:
    prof = Profile(name="bot", source="vault", env={}, sections={"policy": {"symbols": ["btcusdt"]}},
                   origin="/etc/credbroker.toml")
    p = SigningPolicy.for_profile(prof)
    assert p.symbols == frozenset({"BTCUSDT"})
    bare = SigningPolicy.for_profile(Profile(name="bot", source="vault", env={}))
    d = bare.describe()
    # No table at all: withdrawals are still denied (deny_kinds defaults to ["withdraw"]).
    assert d["deny_kinds"] == ["withdraw"] and "address" in d["deny_params"] and d["rate_limit"] is None
    assert policy({"deny_kinds": []}).describe()["deny_endpoints"] == []


# -- rules ------------------------------------------------------------------------------------


def test_symbols_rule_covers_symbol_symbols_and_batch_orders() -> None:
    p = policy({"symbols": ["BTCUSDT", "ETHUSDT"]})
    p.check(req("symbol=BTCUSDT&side=BUY&quantity=1"))
    p.check(req("symbol=ethusdt"))
    p.check(req("timestamp=1", "/fapi/v2/account", method="GET"))  # no symbol: an account query passes
    assert refused(p, req("symbol=DOGEUSDT")).rule == "symbols"
    assert refused(p, req('symbols=%5B%22BTCUSDT%22%2C%22XRPUSDT%22%5D', "/api/v3/ticker/price")).rule == "symbols"
    batch = '[{"symbol":"BTCUSDT","quantity":"1"},{"symbol":"SOLUSDT","quantity":"1"}]'
    from urllib.parse import quote

    err = refused(p, req("batchOrders=" + quote(batch, safe=""), "/fapi/v1/batchOrders"))
    assert err.rule == "symbols" and "SOLUSDT" in err.message
    assert refused(p, req("batchOrders=notjson", "/fapi/v1/batchOrders")).rule == "batchOrders"


def test_max_quantity_global_and_per_symbol() -> None:
    p = policy({"max_quantity": {"BTCUSDT": 0.01, "default": 5}})
    p.check(req("symbol=BTCUSDT&quantity=0.01"))
    p.check(req("symbol=ETHUSDT&quantity=5"))
    err = refused(p, req("symbol=BTCUSDT&quantity=0.011"))
    assert err.rule == "max_quantity" and "quantity 0.011 is above the cap 0.01 for BTCUSDT" in err.message
    assert refused(p, req("symbol=ETHUSDT&quantity=5.1")).rule == "max_quantity"
    assert refused(p, req("symbol=ETHUSDT&quantity=NaN")).rule == "max_quantity"
    assert refused(p, req("symbol=ETHUSDT&quantity=1e999")).rule == "max_quantity"
    only_btc = policy({"max_quantity": {"BTCUSDT": 1}})
    only_btc.check(req("symbol=ETHUSDT&quantity=1000"))  # no cap for ETHUSDT


def test_max_notional_uses_price_quote_qty_or_refuses_a_market_order() -> None:
    p = policy({"max_notional": 1000})
    p.check(req("symbol=BTCUSDT&quantity=0.01&price=50000"))  # 500
    assert refused(p, req("symbol=BTCUSDT&quantity=0.03&price=50000")).rule == "max_notional"  # 1500
    p.check(req("symbol=BTCUSDT&quoteOrderQty=999", "/api/v3/order"))
    assert refused(p, req("symbol=BTCUSDT&quoteOrderQty=1001", "/api/v3/order")).rule == "max_notional"
    assert refused(p, req("symbol=BTCUSDT&type=STOP_MARKET&quantity=1&stopPrice=2000")).rule == "max_notional"
    err = refused(p, req("symbol=BTCUSDT&type=MARKET&quantity=0.001"))
    assert err.rule == "max_notional" and "no price" in err.message
    # With a quantity cap for the symbol, that cap bounds a market order instead.
    both = policy({"max_notional": 1000, "max_quantity": {"BTCUSDT": 0.01}})
    both.check(req("symbol=BTCUSDT&type=MARKET&quantity=0.001"))
    p.check(req("symbol=BTCUSDT&closePosition=true&type=STOP_MARKET&stopPrice=1"))  # no quantity at all
    from urllib.parse import quote

    batch = quote('[{"symbol":"BTCUSDT","quantity":"1","price":"2000"}]', safe="")
    assert refused(p, req("batchOrders=" + batch, "/fapi/v1/batchOrders")).rule == "max_notional"


def test_max_recv_window_counts_a_missing_one_as_binance_default() -> None:
    p = policy({"max_recv_window": 3000})
    p.check(req("symbol=BTCUSDT&recvWindow=3000"))
    err = refused(p, req("symbol=BTCUSDT&recvWindow=3001"))
    assert err.rule == "max_recv_window" and "send recvWindow=3000 or less" in str(err)
    err = refused(p, req("symbol=BTCUSDT"))
    assert "5000 (Binance's default, none sent)" in err.message
    policy({"max_recv_window": 5000}).check(req("symbol=BTCUSDT"))
    assert refused(p, req("recvWindow=abc")).rule == "max_recv_window"


def test_withdrawals_denied_by_endpoint_or_parameter_by_default() -> None:
    p = policy(None)
    err = refused(p, req("coin=USDT&address=T1&amount=5", "/sapi/v1/capital/withdraw/apply"))
    assert err.rule == "deny_kinds:withdraw" and "is a denied endpoint" in err.message
    # Without the URL path (sign_params without endpoint=), the withdrawal's parameters give it away.
    assert refused(p, req("coin=USDT&address=T1&amount=5", None)).rule == "deny_kinds:withdraw"
    p.check(req("symbol=BTCUSDT&side=BUY&quantity=1"))
    # An operator who really wants it must say so.
    policy({"deny_kinds": []}).check(req("coin=USDT&address=T1&amount=5", "/sapi/v1/capital/withdraw/apply"))


def test_transfer_and_custom_denies() -> None:
    p = policy({"deny_kinds": ["withdraw", "transfer"], "deny_params": ["reduceOnly"],
                "deny_endpoints": ["/fapi/v1/leverage"]})
    assert refused(p, req("type=MAIN_UMFUTURE&asset=USDT&amount=1", "/sapi/v1/asset/transfer")).rule \
        == "deny_kinds:transfer"
    assert refused(p, req("symbol=BTCUSDT&leverage=125", "/fapi/v1/leverage")).rule == "deny_endpoints"
    assert refused(p, req("symbol=BTCUSDT&reduceOnly=true")).rule == "deny_params"
    # Paths match exactly (fnmatch on the path, case-sensitive), query strings are ignored.
    assert refused(p, req("a=1", "/fapi/v1/leverage?x=1")).rule == "deny_endpoints"


def test_require_endpoint() -> None:
    p = policy({"require_endpoint": True})
    assert refused(p, req("symbol=BTCUSDT", None)).rule == "require_endpoint"
    p.check(req("symbol=BTCUSDT", "/fapi/v1/order"))


def test_duplicates_signatures_and_glued_payloads_are_refused() -> None:
    p = policy(None)
    assert refused(p, req("symbol=BTCUSDT&symbol=DOGEUSDT")).rule == "duplicate_param"
    # The same name in query and body: the exchange reads one, we might read the other.
    assert refused(p, req("symbol=BTCUSDT", body="symbol=DOGEUSDT")).rule == "duplicate_param"
    assert refused(p, req("a=1&signature=abc")).rule == "already_signed"
    with pytest.raises(PolicyRefused, match="not NAME=VALUE"):
        req("symbol=BTCUSDT&timeInForce=GTCquantity=100")
    with pytest.raises(PolicyRefused, match="not NAME=VALUE"):
        req("symbol=BTCUSDT&flag")
    # Percent-encoded values are decoded before the rules look at them.
    r = req("symbol=BTC%55SDT&quantity=1%2E5")
    assert dict(r.params) == {"symbol": "BTCUSDT", "quantity": "1.5"}


def test_rate_limit_token_bucket_with_a_fake_clock() -> None:
    now = [0.0]
    p = policy({"rate_limit": "2/s", "burst": 3}, clock=lambda: now[0])
    for _ in range(3):
        p.check(req("symbol=BTCUSDT"))
    err = refused(p, req("symbol=BTCUSDT"))
    assert err.rule == "rate_limit" and "more than 2 signatures per second" in err.message
    now[0] += 0.5  # one token back
    p.check(req("symbol=BTCUSDT"))
    assert refused(p, req("symbol=BTCUSDT")).rule == "rate_limit"
    # A request refused by another rule does not use up a token.
    now[0] += 10
    sym = policy({"rate_limit": "1/m", "symbols": ["BTCUSDT"]}, clock=lambda: now[0])
    for _ in range(5):
        refused(sym, req("symbol=XRPUSDT"))
    sym.check(req("symbol=BTCUSDT"))
    assert refused(sym, req("symbol=BTCUSDT")).rule == "rate_limit"


def test_rate_limiter_refills_up_to_burst_only() -> None:
    now = [0.0]
    rl = RateLimiter(rate=1.0, burst=2, clock=lambda: now[0])
    assert rl.take() and rl.take() and not rl.take()
    now[0] = 100.0
    assert rl.take() and rl.take() and not rl.take()


def test_summary_keeps_names_and_order_fields_but_no_timestamp() -> None:
    r = req("symbol=BTCUSDT&side=BUY&type=LIMIT&quantity=1&price=2&recvWindow=5000&timestamp=1700000000000")
    s = r.summary()
    assert s["params"] == "symbol,side,type,quantity,price,recvWindow"
    assert s["symbol"] == "BTCUSDT" and s["quantity"] == "1" and s["price"] == "2"
    assert "1700000000000" not in repr(s)


def test_from_wire_keeps_the_brokers_message() -> None:
    exc = PolicyRefused.from_wire("symbols", "signing policy refused the request (symbols): nope", "fix it")
    assert exc.rule == "symbols" and exc.message == "signing policy refused the request (symbols): nope"
    assert str(exc) == "signing policy refused the request (symbols): nope; fix: fix it"


def test_compiled_endpoint_rules_decide_as_each_fnmatch_pattern_does() -> None:
    """The deny_endpoints patterns are matched with one compiled expression; the verdict and the
    rule named are those of trying each pattern in order with fnmatchcase."""
    from fnmatch import fnmatchcase

    from broker.signing_policy import KINDS

    p = policy({"deny_kinds": list(KINDS), "deny_endpoints": ["/sapi/v1/sub-account/*", "/x/[ab]?/y*"]})
    paths = ["/fapi/v1/order", "/sapi/v1/capital/withdraw/apply", "/wapi/v3/withdraw.html", "/sapi/v1/asset/dust",
             "/sapi/v1/sub-account/list", "/sapi/v2/sub-account/subAccountApi/ipRestriction", "/x/a1/yz",
             "/x/c1/y", "/sapi/v1/margin/apiKeyList", "/SAPI/v1/capital/withdraw/apply", "/sapi/v1/convert/x\n",
             "/sapi/v1/pay/transactions", "/api/v3/order", ""]
    for path in paths:
        first = next((pat for pat in p.deny_endpoints if fnmatchcase(path, pat)), None)
        if first is None:
            p.check(req("symbol=BTCUSDT&timestamp=1", endpoint=path or None))
        else:
            err = refused(p, req("symbol=BTCUSDT&timestamp=1", endpoint=path))
            assert err.rule == p._rule_for_endpoint(first) and "is a denied endpoint" in err.message


def test_the_parse_accepts_and_refuses_what_the_item_rule_does() -> None:
    """Random query strings and bodies over the characters that matter: the parse gives the pairs, or
    the refusal naming the first bad item, that the documented item-by-item rule gives."""
    import random
    from urllib.parse import unquote

    def item_by_item(query: str, body: str) -> list[tuple[str, str]]:
        params = []
        for part in (query, body):
            for item in part.split("&") if part else []:
                name, sep, value = item.partition("=")
                if not sep or not name or "=" in value:
                    raise PolicyRefused("malformed", f"the parameter {item[:40]!r} is not NAME=VALUE")
                if "%" in item or "+" in item:
                    name, value = unquote(name.replace("+", " ")), unquote(value.replace("+", " "))
                params.append((name, value))
        return params

    rng = random.Random(13)
    accepted = 0
    for _ in range(20000):
        query = "".join(rng.choice("ab=&%+2 \n") for _ in range(rng.randint(0, 12)))
        body = "".join(rng.choice("ab=&%+2 \n") for _ in range(rng.randint(0, 6)))
        try:
            expected: Any = item_by_item(query, body)
        except PolicyRefused as exc:
            expected = exc.message
        try:
            got: Any = list(SignRequest.from_parts(query, body).params)
        except PolicyRefused as exc:
            got = exc.message
        assert got == expected, (query, body)
        accepted += isinstance(expected, list)
    assert accepted > 500  # both branches were exercised
