"""A bot that speaks Binance's WebSocket API through `credbroker run --proxy`, signing with get_signer().

In a proxy child get_signer() signs with the proxy's stand-in key; the bot
logs on (when its key is Ed25519), places an order in the session and one
signed order, and writes what it got to STATE/result.json.

    python proxy_bot_ws.py STATE
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

from broker import get_signer


def main() -> None:
    state = Path(sys.argv[1])
    signer = get_signer()
    results: dict[str, Any] = {}
    order = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01",
             "price": "100"}
    with connect(os.environ["CREDBROKER_PROXY_WS_URL"] + "/ws-api/v3") as ws:
        def call(name: str, request: dict[str, Any]) -> None:
            ws.send(json.dumps(request))
            results[name] = json.loads(ws.recv(timeout=30))

        call("signed_order", {"id": 1, "method": "order.place",
                              "params": signer.sign_ws_params({**order, "newClientOrderId": "a b+c/=d"},
                                                              method="order.place")})
        if os.environ.get("CREDBROKER_KEY_KIND") == "ed25519":
            call("logon", signer.ws_logon(request_id=2))
            call("subscribe", {"id": 3, "method": "userDataStream.subscribe"})
            results["event"] = json.loads(ws.recv(timeout=30))
            call("session_order", {"id": 4, "method": "order.place",
                                   "params": {**order, "timestamp": signer.timestamp()}})
        call("other_symbol", {"id": 5, "method": "order.place",
                              "params": signer.sign_ws_params({**order, "symbol": "XRPUSDT"})})
    state.joinpath("result.json").write_text(json.dumps({"results": results, "pid": os.getpid(),
                                                         "environ": dict(os.environ)}))


if __name__ == "__main__":
    main()
