"""A bot written against Binance's modular spot SDK (binance-sdk-spot), run by tests/integration/test_proxy_clients.py
from its own venv.

    python proxy_bot_binance_sdk_spot.py STATE [EXCHANGE_URL]

Under ``credbroker run --proxy`` it signs with the proxy secret and talks to
``$CREDBROKER_PROXY_URL``; in env mode (plain ``credbroker run``) it holds the
key itself and talks to EXCHANGE_URL. Spot has no batch-order endpoint, and
its REST user-data-stream (listenKey) endpoints were retired on 2026-02-20
(spot user data needs the WebSocket API): this SDK has no calls for them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from binance_common.configuration import ConfigurationRestAPI
from binance_common.errors import Error as SdkError
from binance_sdk_spot.spot import Spot


def _plain(data: Any) -> Any:
    if isinstance(data, list):
        return [_plain(d) for d in data]
    to_dict = getattr(data, "to_dict", None)
    return to_dict() if to_dict is not None else data


def main() -> None:
    state = Path(sys.argv[1])
    url = os.environ.get("CREDBROKER_PROXY_URL") or sys.argv[2]
    secret = os.environ.get("CREDBROKER_PROXY_SECRET") or os.environ.get("BINANCE_API_SECRET") or \
        os.environ["BINANCE_PRIVATE_KEY"]
    key = {"api_secret": secret} if os.environ["CREDBROKER_KEY_KIND"] == "hmac" else {"private_key": secret}
    # The two lines that point the SDK at credbroker:
    config = ConfigurationRestAPI(api_key=os.environ["BINANCE_API_KEY"], base_path=url, retries=0, **key)
    client = Spot(config_rest_api=config).rest_api
    results: dict[str, Any] = {}

    def call(name: str, fn: Any, **kwargs: Any) -> Any:
        try:
            response = fn(**kwargs)
            results[name] = {"status": response.status, "data": _plain(response.data())}
        except SdkError as exc:
            results[name] = {"error": type(exc).__name__, "msg": str(exc)[:200]}
        return results[name]

    call("order", client.new_order, symbol="BTCUSDT", side="BUY", type="LIMIT", time_in_force="GTC",
         quantity=0.01, price=100, new_client_order_id="cb/1 x")
    call("balance", client.get_account)
    call("cancel", client.delete_order, symbol="BTCUSDT", order_id=1)
    (state / "result.json").write_text(json.dumps({"results": results, "environ": dict(os.environ)}))


if __name__ == "__main__":
    main()
