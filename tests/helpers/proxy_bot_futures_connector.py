"""A bot written against binance-futures-connector (UMFutures), run by tests/integration/test_proxy.py from its own venv.

binance-futures-connector signs with HMAC or RSA only; under ``credbroker
run --proxy`` with ``[proxy] client_key = "hmac"`` it trades with an Ed25519
key too (the bot signs with an HMAC stand-in, the proxy with the real key).

    python proxy_bot_futures_connector.py STATE
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from binance.error import ClientError
from binance.um_futures import UMFutures


def main() -> None:
    state = Path(sys.argv[1])
    # The two lines that point binance-futures-connector at credbroker:
    # Under --proxy: the proxy's URL and secret; in env mode (argv[2] = the exchange's URL): the key itself.
    url = os.environ.get("CREDBROKER_PROXY_URL") or sys.argv[2]
    secret = os.environ.get("CREDBROKER_PROXY_SECRET") or os.environ.get("BINANCE_API_SECRET") or \
        os.environ["BINANCE_PRIVATE_KEY"]
    client = UMFutures(key=os.environ["BINANCE_API_KEY"], base_url=url,
                       **({"secret": secret} if os.environ["CREDBROKER_KEY_KIND"] == "hmac" else {"private_key": secret}))
    results: dict[str, Any] = {}

    def call(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            results[name] = fn(*args, **kwargs)
        except ClientError as exc:
            results[name] = {"error": exc.error_code, "status": exc.status_code}
        return results[name]

    call("order", client.new_order, symbol="BTCUSDT", side="BUY", type="LIMIT", timeInForce="GTC",
         quantity="0.01", price="100", newClientOrderId="cb/1 x")
    call("batch", client.new_batch_order, batchOrders=[
        {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01",
         "price": "100", "newClientOrderId": "b1"}])
    call("balance", client.balance)
    call("cancel", client.cancel_order, symbol="BTCUSDT", orderId=1)
    key = call("listen_key", client.new_listen_key)
    if isinstance(key, dict) and "listenKey" in key:
        call("listen_key_renew", client.renew_listen_key, key["listenKey"])
        call("listen_key_close", client.close_listen_key, key["listenKey"])
    (state / "result.json").write_text(json.dumps({"results": results, "environ": dict(os.environ)}))


if __name__ == "__main__":
    main()
