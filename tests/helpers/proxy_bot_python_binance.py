"""A bot written against python-binance, run by tests/integration/test_proxy.py from its own venv (.venv-clients/).

python-binance signs values as they are (except ``symbol``) but sends them
form-encoded, so a clientOrderId with ``/`` or a space gets -1022 from
Binance. Straight at the exchange (``direct URL``) this bot shows that bug;
under ``credbroker run --proxy`` (``proxy``) the same calls go through.

    python proxy_bot_python_binance.py STATE proxy
    python proxy_bot_python_binance.py STATE direct BASE_URL
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from binance.client import Client
from binance.exceptions import BinanceAPIException


def main() -> None:
    state, mode = Path(sys.argv[1]), sys.argv[2]
    # In proxy mode the stand-in is also in CREDBROKER_PROXY_SECRET, whichever variable the profile maps.
    secret = os.environ["CREDBROKER_PROXY_SECRET"] if mode == "proxy" else \
        os.environ.get("BINANCE_API_SECRET") or os.environ["BINANCE_PRIVATE_KEY"]
    secret_kwargs: dict[str, Any] = (
        {"api_secret": secret} if os.environ.get("CREDBROKER_KEY_KIND") == "hmac" else {"private_key": secret})
    client = Client(os.environ["BINANCE_API_KEY"], ping=False, **secret_kwargs)
    # The two lines that point python-binance at credbroker:
    base = os.environ["CREDBROKER_PROXY_URL"] if mode == "proxy" else sys.argv[3]
    client.API_URL, client.FUTURES_URL = base + "/api", base + "/fapi"
    results: dict[str, Any] = {}

    def call(name: str, fn: Any, **kwargs: Any) -> Any:
        try:
            results[name] = fn(**kwargs)
        except BinanceAPIException as exc:
            results[name] = {"error": exc.code, "status": exc.status_code}
        except ValueError as exc:  # python-binance's own crash (batch orders with a PEM key), before any request
            results[name] = {"crash": type(exc).__name__}
        return results[name]

    call("order", client.futures_create_order, symbol="BTCUSDT", side="BUY", type="LIMIT", timeInForce="GTC",
         quantity="0.01", price="100", newClientOrderId="cb/1 x")
    call("spot_order", client.create_order, symbol="BTCUSDT", side="BUY", type="LIMIT", timeInForce="GTC",
         quantity="0.01", price="100", newClientOrderId="cb/2 y")
    call("plain_order", client.futures_create_order, symbol="BTCUSDT", side="BUY", type="LIMIT",
         timeInForce="GTC", quantity="0.01", price="100", newClientOrderId="plain1")
    call("batch", client.futures_place_batch_order, batchOrders=[
        {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01",
         "price": "100", "newClientOrderId": "b1"}])
    call("balance", client.futures_account_balance)
    call("account", client.get_account)
    call("cancel", client.futures_cancel_order, symbol="BTCUSDT", orderId=1)
    key = call("listen_key", client.futures_stream_get_listen_key)
    if isinstance(key, str):
        call("listen_key_renew", client.futures_stream_keepalive, listenKey=key)
        call("listen_key_close", client.futures_stream_close, listenKey=key)
    (state / f"result-{mode}.json").write_text(json.dumps({"results": results, "environ": dict(os.environ)}))


if __name__ == "__main__":
    main()
