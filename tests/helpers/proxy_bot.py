"""A bot written against binance-connector, run by tests/integration/test_proxy.py under `credbroker run --proxy`.

It knows nothing of credbroker but the two lines the README gives: the base
URL from ``CREDBROKER_PROXY_URL`` and the proxy secret from
``CREDBROKER_PROXY_SECRET`` (``CREDBROKER_KEY_KIND`` says which constructor
argument takes it). It
places an order (a clientOrderId with ``/`` and a space), a futures batch
order, reads the balance and the account, cancels, and walks the listenKey
calls; then it writes what it got and its own environment to ``STATE/result.json``.

    python proxy_bot.py STATE
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from binance.error import ClientError
from binance.spot import Spot


def main() -> None:
    state = Path(sys.argv[1])
    # The two lines that point binance-connector at credbroker:
    # Under --proxy: the proxy's URL and secret; in env mode (argv[2] = the exchange's URL): the key itself.
    base_url = os.environ.get("CREDBROKER_PROXY_URL") or sys.argv[2]
    secret = os.environ.get("CREDBROKER_PROXY_SECRET") or os.environ.get("BINANCE_API_SECRET") or \
        os.environ["BINANCE_PRIVATE_KEY"]
    if os.environ["CREDBROKER_KEY_KIND"] == "hmac":
        client = Spot(api_key=os.environ["BINANCE_API_KEY"], api_secret=secret, base_url=base_url)
    else:
        client = Spot(api_key=os.environ["BINANCE_API_KEY"], private_key=secret,
                      private_key_pass=os.environ.get("BINANCE_PRIVATE_KEY_PASSPHRASE"), base_url=base_url)
    results: dict[str, Any] = {}

    def call(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            results[name] = fn(*args, **kwargs)
        except ClientError as exc:
            results[name] = {"error": exc.error_code, "status": exc.status_code, "msg": exc.error_message}
        return results[name]

    call("order", client.new_order, symbol="BTCUSDT", side="BUY", type="LIMIT", timeInForce="GTC",
         quantity="0.01", price="100", newClientOrderId="cb/1 x")
    batch = [{"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01",
              "price": "100", "newClientOrderId": "b/1 y"},
             {"symbol": "ETHUSDT", "side": "SELL", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.1",
              "price": "5000"}]
    call("batch", client.sign_request, "POST", "/fapi/v1/batchOrders",
         {"batchOrders": json.dumps(batch, separators=(",", ":"))})
    call("balance", client.sign_request, "GET", "/fapi/v2/balance")
    call("account", client.account)
    call("cancel", client.cancel_order, symbol="BTCUSDT", orderId=1)
    key = call("listen_key", client.new_listen_key)
    if isinstance(key, dict) and "listenKey" in key:
        call("listen_key_renew", client.renew_listen_key, key["listenKey"])
        call("listen_key_close", client.close_listen_key, key["listenKey"])
    call("futures_listen_key", client.limit_request, "POST", "/fapi/v1/listenKey")
    call("futures_listen_key_renew", client.limit_request, "PUT", "/fapi/v1/listenKey")
    call("withdraw", client.sign_request, "POST", "/sapi/v1/capital/withdraw/apply",
         {"coin": "BTC", "address": "x", "amount": "1"})
    call("other_symbol", client.new_order, symbol="DOGEUSDT", side="BUY", type="LIMIT", timeInForce="GTC",
         quantity="1", price="0.1")
    out = {"results": results, "pid": os.getpid(), "environ": dict(os.environ)}
    (state / "result.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
