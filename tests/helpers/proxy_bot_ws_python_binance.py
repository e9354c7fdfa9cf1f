"""A bot using python-binance's WebSocket API client, run by tests/integration/test_proxy_ws.py from its own venv.

Under ``credbroker run --proxy`` it points python-binance's WebSocket API URL
at ``$CREDBROKER_PROXY_WS_URL`` and signs with the proxy secret it was given.

    python proxy_bot_ws_python_binance.py STATE
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
    state = Path(sys.argv[1])
    secret = os.environ["CREDBROKER_PROXY_SECRET"]
    kwargs: dict[str, Any] = (
        {"api_secret": secret} if os.environ.get("CREDBROKER_KEY_KIND") == "hmac" else {"private_key": secret})
    # The two lines that point python-binance's WebSocket API at credbroker:
    Client.WS_API_URL = os.environ["CREDBROKER_PROXY_WS_URL"] + "/ws-api/v3"
    client = Client(os.environ["BINANCE_API_KEY"], ping=False, **kwargs)
    results: dict[str, Any] = {}

    def call(name: str, fn: Any, **params: Any) -> None:
        try:
            results[name] = fn(**params)
        except BinanceAPIException as exc:
            results[name] = {"error": exc.code, "status": exc.status_code, "msg": exc.message}

    order = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01",
             "price": "100"}
    call("order", client.ws_create_order, **order, newClientOrderId="cb/1 x")
    call("plain_order", client.ws_create_order, **order, newClientOrderId="plain1")
    call("other_symbol", client.ws_create_order, **{**order, "symbol": "XRPUSDT"}, newClientOrderId="x1")
    call("account", client.ws_get_account)
    client.close_connection()
    state.joinpath("result.json").write_text(json.dumps({"results": results, "pid": os.getpid(),
                                                         "environ": dict(os.environ)}))


if __name__ == "__main__":
    main()
