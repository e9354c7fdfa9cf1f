"""A bot written against Binance's modular SDK (binance-sdk-derivatives-trading-usds-futures), run by
tests/integration/test_proxy.py from its own venv.

    python proxy_bot_binance_sdk.py STATE
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from binance_common.configuration import ConfigurationRestAPI
from binance_common.errors import Error as SdkError
from binance_sdk_derivatives_trading_usds_futures.derivatives_trading_usds_futures import (
    DerivativesTradingUsdsFutures,
)
from binance_sdk_derivatives_trading_usds_futures.rest_api.models import PlaceMultipleOrdersBatchOrdersParameterInner


def _plain(data: Any) -> Any:
    """The SDK's typed models as plain JSON data."""
    if isinstance(data, list):
        return [_plain(d) for d in data]
    to_dict = getattr(data, "to_dict", None)
    return to_dict() if to_dict is not None else data


def main() -> None:
    state = Path(sys.argv[1])
    # Under --proxy: the proxy's URL and secret; in env mode (argv[2] = the exchange's URL): the key itself.
    url = os.environ.get("CREDBROKER_PROXY_URL") or sys.argv[2]
    secret = os.environ.get("CREDBROKER_PROXY_SECRET") or os.environ.get("BINANCE_API_SECRET") or \
        os.environ["BINANCE_PRIVATE_KEY"]
    key = {"api_secret": secret} if os.environ["CREDBROKER_KEY_KIND"] == "hmac" else {"private_key": secret}
    # The two lines that point the SDK at credbroker:
    config = ConfigurationRestAPI(api_key=os.environ["BINANCE_API_KEY"], base_path=url,
                                  retries=0, **key)
    client = DerivativesTradingUsdsFutures(config_rest_api=config).rest_api
    results: dict[str, Any] = {}

    def call(name: str, fn: Any, **kwargs: Any) -> Any:
        try:
            response = fn(**kwargs)
            data = response.data()
            results[name] = {"status": response.status, "data": _plain(data)}
        except SdkError as exc:
            results[name] = {"error": type(exc).__name__, "msg": str(exc)[:200]}
        return results[name]

    call("order", client.new_order, symbol="BTCUSDT", side="BUY", type="LIMIT", time_in_force="GTC",
         quantity=0.01, price=100, new_client_order_id="cb/1 x")
    call("batch", client.place_multiple_orders, batch_orders=[PlaceMultipleOrdersBatchOrdersParameterInner(
        symbol="BTCUSDT", side="BUY", type="LIMIT", time_in_force="GTC", quantity=0.01, price=100,
        new_client_order_id="b1")])
    call("balance", client.futures_account_balance_v2)
    call("cancel", client.cancel_order, symbol="BTCUSDT", order_id=1)
    call("listen_key", client.start_user_data_stream)
    call("listen_key_renew", client.keepalive_user_data_stream)
    call("listen_key_close", client.close_user_data_stream)
    (state / "result.json").write_text(json.dumps({"results": results, "environ": dict(os.environ)}))


if __name__ == "__main__":
    main()
