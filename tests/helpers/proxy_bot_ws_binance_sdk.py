"""A bot using the WebSocket API client of Binance's modular SDK (binance-sdk-derivatives-trading-usds-futures),
run by tests/integration/test_proxy_ws.py from its own venv under `credbroker run --proxy`.

    python proxy_bot_ws_binance_sdk.py STATE [STREAM_URL]

With STREAM_URL the bot talks to that URL with the key it finds in the
environment (env mode); without, to ``$CREDBROKER_PROXY_WS_URL/ws-fapi/v1``
with the proxy secret.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from binance_common.configuration import ConfigurationWebSocketAPI
from binance_sdk_derivatives_trading_usds_futures.derivatives_trading_usds_futures import (
    DerivativesTradingUsdsFutures,
)


def _plain(data: Any) -> Any:
    to_dict = getattr(data, "to_dict", None)
    return to_dict() if to_dict is not None else data


async def main() -> None:
    state = Path(sys.argv[1])
    direct = sys.argv[2] if len(sys.argv) > 2 else None
    secret = os.environ["BINANCE_API_SECRET"] if direct else os.environ["CREDBROKER_PROXY_SECRET"]
    # The two lines that point the SDK's WebSocket API at credbroker:
    config = ConfigurationWebSocketAPI(api_key=os.environ["BINANCE_API_KEY"], api_secret=secret,
                                       stream_url=direct or os.environ["CREDBROKER_PROXY_WS_URL"] + "/ws-fapi/v1")
    connection = await DerivativesTradingUsdsFutures(config_ws_api=config).websocket_api.create_connection()
    results: dict[str, Any] = {}

    async def call(name: str, coro: Any) -> None:
        try:
            results[name] = _plain((await coro).data())
        except Exception as exc:  # noqa: BLE001 - the SDK raises its own types and plain ones; the test reads them
            results[name] = {"error": type(exc).__name__, "msg": str(exc)[:200]}

    order = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "time_in_force": "GTC", "quantity": 0.01,
             "price": 100}
    try:
        await call("order", connection.new_order(**order, new_client_order_id="cb/1 x"))
        await call("plain_order", connection.new_order(**order, new_client_order_id="plain1"))
        await call("account", connection.account_information_v2())
    finally:
        await connection.close_connection()
    (state / f"result-{'direct' if direct else 'proxy'}.json").write_text(
        json.dumps({"results": results, "environ": dict(os.environ)}, default=str))


if __name__ == "__main__":
    asyncio.run(main())
