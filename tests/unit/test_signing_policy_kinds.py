"""Denied kinds are refused by their parameters, whatever endpoint the bot declares.

Binance's signature covers the parameters (totalParams), not the URL path: a
bot that gets ``type=UMFUTURE_MAIN&asset=USDT&amount=1000`` signed "for"
``/fapi/v1/order`` can send it to ``/sapi/v1/asset/transfer``. Each case below
is a real parameter set of a value-moving endpoint (from Binance's API docs),
declared under an innocent endpoint, asked of a real socket agent.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from broker.agent.server import Agent
from broker.secret import Secret
from broker.signing.agent import AgentSigner
from broker.signing.hmac_sha256 import HmacSigner
from broker.signing_policy import KINDS, PolicyRefused, SigningPolicy, SignRequest
from tests.helpers.fakelog import FakeLog

INNOCENT = "/fapi/v1/order"

#: (kind, the endpoint the parameters really belong to, the parameters)
CASES: list[tuple[str, str, dict[str, str]]] = [
    ("withdraw", "/sapi/v1/capital/withdraw/apply", {"coin": "USDT", "address": "TXyz", "amount": "1000"}),
    ("withdraw", "/sapi/v1/capital/withdraw/apply",
     {"coin": "USDT", "network": "TRX", "Address": "TXyz", "amount": "1000"}),
    ("withdraw", "/wapi/v3/withdraw.html", {"asset": "USDT", "address": "TXyz", "amount": "1000"}),
    ("withdraw", "/sapi/v1/giftcard/createCode", {"token": "USDT", "amount": "1000"}),
    ("withdraw", "/sapi/v1/giftcard/buyCode", {"baseToken": "USDT", "faceToken": "BTC", "baseTokenAmount": "1000"}),
    ("transfer", "/sapi/v1/asset/transfer", {"type": "UMFUTURE_MAIN", "asset": "USDT", "amount": "1000"}),
    ("transfer", "/sapi/v1/asset/transfer",
     {"type": "ISOLATEDMARGIN_MARGIN", "asset": "USDT", "amount": "1", "fromSymbol": "BTCUSDT"}),
    ("transfer", "/sapi/v1/futures/transfer", {"asset": "USDT", "amount": "1000", "type": "2"}),
    ("transfer", "/sapi/v1/margin/transfer", {"asset": "USDT", "amount": "1000", "type": "1"}),
    ("transfer", "/sapi/v1/margin/isolated/transfer",
     {"asset": "USDT", "symbol": "BTCUSDT", "transFrom": "ISOLATED_MARGIN", "transTo": "SPOT", "amount": "1"}),
    ("transfer", "/sapi/v1/sub-account/transfer/subToSub",
     {"toEmail": "x@example.com", "asset": "USDT", "amount": "1000"}),
    ("transfer", "/sapi/v1/sub-account/transfer/subToMaster", {"asset": "USDT", "amount": "1000"}),
    ("transfer", "/sapi/v1/sub-account/universalTransfer",
     {"fromEmail": "a@example.com", "toEmail": "b@example.com", "fromAccountType": "USDT_FUTURE",
      "toAccountType": "SPOT", "asset": "USDT", "amount": "1000"}),
    ("transfer", "/sapi/v1/sub-account/futures/transfer",
     {"email": "a@example.com", "asset": "USDT", "amount": "1000", "type": "2"}),
    ("transfer", "/sapi/v1/sub-account/margin/transfer",
     {"email": "a@example.com", "asset": "USDT", "amount": "1000", "type": "2"}),
    ("transfer", "/sapi/v1/sub-account/futures/internalTransfer",
     {"fromEmail": "a@example.com", "toEmail": "b@example.com", "futuresType": "1", "asset": "USDT",
      "amount": "1000"}),
    ("transfer", "/sapi/v1/managed-subaccount/withdraw",
     {"fromEmail": "a@example.com", "asset": "USDT", "amount": "1000"}),
    ("transfer", "/sapi/v1/sub-account/futures/move-position",
     {"fromUserEmail": "a@example.com", "toUserEmail": "b@example.com", "productType": "UM",
      "orderArgs": "[]"}),
    ("transfer", "/sapi/v1/asset/dust", {"asset": "BTC"}),
    ("borrow", "/sapi/v1/margin/borrow-repay",
     {"asset": "USDT", "isIsolated": "FALSE", "symbol": "BTCUSDT", "amount": "1000", "type": "BORROW"}),
    ("borrow", "/sapi/v1/margin/loan", {"asset": "USDT", "amount": "1000"}),
    ("borrow", "/sapi/v1/margin/repay", {"asset": "USDT", "amount": "1000", "isIsolated": "TRUE",
                                          "symbol": "BTCUSDT"}),
    ("borrow", "/papi/v1/marginLoan", {"asset": "USDT", "amount": "1000"}),
    ("borrow", "/sapi/v2/loan/flexible/borrow", {"loanCoin": "USDT", "collateralCoin": "BTC", "loanAmount": "9"}),
    ("borrow", "/sapi/v1/loan/repay", {"orderId": "1", "amount": "9"}),
    ("convert", "/sapi/v1/convert/getQuote", {"fromAsset": "USDT", "toAsset": "BTC", "fromAmount": "1000"}),
    ("convert", "/sapi/v1/convert/acceptQuote", {"quoteId": "12415572564"}),
    ("convert", "/sapi/v1/convert/limit/placeOrder",
     {"baseAsset": "BTC", "quoteAsset": "USDT", "limitPrice": "1", "side": "SELL", "expiredType": "7_D",
      "baseAmount": "1"}),
    ("convert", "/fapi/v1/convert/acceptQuote", {"quoteId": "12415572564"}),
    ("api_key_management", "/sapi/v2/sub-account/subAccountApi/ipRestriction",
     {"email": "a@example.com", "subAccountApiKey": "k", "status": "1"}),
    ("api_key_management", "/sapi/v1/margin/apiKey", {"apiName": "x", "ip": "1.2.3.4"}),
    ("api_key_management", "/sapi/v1/margin/apiKey/ip", {"apiKey": "k", "ip": "1.2.3.4"}),
]

#: What a trading bot sends every day: never refused by any kind.
TRADING: list[dict[str, str]] = [
    {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01",
     "price": "30000"},
    {"symbol": "BTCUSDT", "side": "SELL", "type": "MARKET", "quantity": "0.01", "reduceOnly": "true"},
    {"symbol": "BTCUSDT", "positionSide": "LONG", "amount": "10", "type": "1"},  # /fapi/v1/positionMargin
    {"symbol": "BTCUSDT", "leverage": "5"},
    {"symbol": "BTCUSDT", "orderId": "42"},
    {"symbol": "BTCUSDT", "side": "BUY", "type": "MARKET", "quoteOrderQty": "100"},
    {},
    # A WebSocket API order: apiKey is among the signed parameters.
    {"apiKey": "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A", "newOrderRespType": "ACK",
     "price": "52000.00", "quantity": "0.01000000", "recvWindow": "100", "side": "SELL", "symbol": "BTCUSDT",
     "timeInForce": "GTC", "type": "LIMIT"},
]


@pytest.fixture(scope="module")
def agent_for() -> Any:
    agents: list[Agent] = []

    def make(kinds: list[str]) -> AgentSigner:
        ref = HmacSigner("KEY-" + "k" * 20, Secret(b"s3cret-s3cret"))
        agent = Agent(HmacSigner("KEY-" + "k" * 20, Secret(b"s3cret-s3cret")), profile="p",
                      policy=SigningPolicy.from_mapping({"deny_kinds": kinds}, "f: profiles.p.policy"),
                      audit=FakeLog())
        agent.start()
        agent.set_child(os.getpid())
        agents.append(agent)
        assert agent.path is not None
        return AgentSigner(ref.api_key, agent.path, profile="p")

    yield make
    for a in agents:
        a.stop()


@pytest.mark.parametrize("kind,real_endpoint,params", CASES, ids=[f"{k}:{e}" for k, e, _ in CASES])
def test_each_denied_kind_is_refused_under_an_innocent_endpoint_through_the_agent(
        agent_for: Any, kind: str, real_endpoint: str, params: dict[str, str]) -> None:
    signer = agent_for([kind])
    for endpoint in (INNOCENT, "/api/v3/order", None):
        with pytest.raises(PolicyRefused) as info:
            signer.sign_params(dict(params), endpoint=endpoint)
        assert info.value.rule == f"deny_kinds:{kind}"
        assert "\n" not in str(info.value)
    # Declared where it really goes, it is refused as well (by the endpoint or by the parameters).
    with pytest.raises(PolicyRefused) as info:
        signer.sign_params(dict(params), endpoint=real_endpoint)
    assert info.value.rule == f"deny_kinds:{kind}"


def test_the_issue_repro_transfer_declared_as_an_order(agent_for: Any) -> None:
    signer = agent_for(["transfer"])
    with pytest.raises(PolicyRefused) as info:
        signer.sign_params({"type": "UMFUTURE_MAIN", "asset": "USDT", "amount": "1000"}, endpoint="/fapi/v1/order")
    assert "make a valid /sapi/v1/asset/transfer request" in str(info.value) \
        or "make a valid /sapi/v1/asset/dust request" in str(info.value)
    assert "does not cover the URL path" in str(info.value)
    # The raw form (sign(query)) is checked the same way.
    with pytest.raises(PolicyRefused):
        signer.sign("type=UMFUTURE_MAIN&asset=USDT&amount=1000&timestamp=1")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_trading_requests_pass_every_kind(agent_for: Any, kind: str) -> None:
    signer = agent_for([kind])
    for params in TRADING:
        assert signer.sign_params(dict(params), endpoint=INNOCENT)


def test_a_kind_not_denied_is_signed() -> None:
    p = SigningPolicy.from_mapping({"deny_kinds": ["withdraw"]}, "x")
    p.check(SignRequest.from_parts("type=UMFUTURE_MAIN&asset=USDT&amount=1000", "", INNOCENT, "POST"))


def test_every_kind_has_parameter_signatures_and_they_match_its_endpoints() -> None:
    from fnmatch import fnmatchcase

    for name, kind in KINDS.items():
        assert kind.signatures, name
        for endpoint, required in kind.signatures:
            assert required and any(fnmatchcase(endpoint, pat) for pat in kind.endpoints), (name, endpoint)


def test_parameter_names_compare_without_case() -> None:
    p = SigningPolicy.from_mapping({"deny_kinds": ["withdraw", "transfer"], "deny_params": ["newClientOrderId"]}, "x")
    for query, rule in (("coin=USDT&ADDRESS=T&amount=1", "deny_kinds:withdraw"),
                        ("Type=MAIN_UMFUTURE&Asset=USDT&Amount=1", "deny_kinds:transfer"),
                        ("symbol=BTCUSDT&NEWCLIENTORDERID=x", "deny_params")):
        with pytest.raises(PolicyRefused) as info:
            p.check(SignRequest.from_parts(query, "", INNOCENT, "POST"))
        assert info.value.rule == rule
