"""A bot written against ccxt (``binance`` and ``binanceusdm``), run by tests/integration/test_proxy.py from its own venv.

Uses ccxt's implicit API methods (one per Binance endpoint; the unified
methods would first load the exchange's market list, which the fake exchange
does not serve).

    python proxy_bot_ccxt.py STATE
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import ccxt


def main() -> None:
    state = Path(sys.argv[1])
    # Under --proxy: the proxy's URL and secret; in env mode (argv[2] = the exchange's URL): the key itself.
    url = os.environ.get("CREDBROKER_PROXY_URL") or sys.argv[2]
    secret = os.environ.get("CREDBROKER_PROXY_SECRET") or os.environ.get("BINANCE_API_SECRET") or \
        os.environ["BINANCE_PRIVATE_KEY"]
    results: dict[str, Any] = {}
    clients = {}
    for name in ("binance", "binanceusdm"):
        # The two lines that point ccxt at credbroker:
        ex = getattr(ccxt, name)({"apiKey": os.environ["BINANCE_API_KEY"],
                                  "secret": secret})
        ex.urls["api"] = {k: v.replace("https://fapi.binance.com", url).replace("https://api.binance.com", url)
                          for k, v in ex.urls["api"].items()}
        clients[name] = ex
    spot, usdm = clients["binance"], clients["binanceusdm"]

    def call(name: str, fn: Any, params: dict[str, Any] | None = None) -> Any:
        try:
            results[name] = fn(params or {})
        except ccxt.BaseError as exc:
            results[name] = {"error": type(exc).__name__, "msg": str(exc)[:200]}
        return results[name]

    order = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01",
             "price": "100", "newClientOrderId": "cb/1 x"}
    call("order", usdm.fapiPrivatePostOrder, order)
    call("spot_order", spot.privatePostOrder, {**order, "newClientOrderId": "cb/2 y"})
    batch = [{"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01",
              "price": "100", "newClientOrderId": "b1"}]
    call("batch", usdm.fapiPrivatePostBatchOrders, {"batchOrders": batch})  # ccxt JSON-encodes the list
    call("balance", usdm.fapiPrivateV2GetBalance)
    call("account", spot.privateGetAccount)
    call("cancel", usdm.fapiPrivateDeleteOrder, {"symbol": "BTCUSDT", "orderId": 1})
    key = call("listen_key", usdm.fapiPrivatePostListenKey)
    if isinstance(key, dict) and "listenKey" in key:
        call("listen_key_renew", usdm.fapiPrivatePutListenKey)
        call("listen_key_close", usdm.fapiPrivateDeleteListenKey)
    call("withdraw", spot.sapiPostCapitalWithdrawApply, {"coin": "BTC", "address": "x", "amount": "1"})
    (state / "result.json").write_text(json.dumps({"results": results, "environ": dict(os.environ)}))


if __name__ == "__main__":
    main()
