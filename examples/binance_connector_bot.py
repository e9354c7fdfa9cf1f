#!/usr/bin/env python3
"""A bot using a popular client library (binance-connector) with the keys `credbroker run` injected.

    pip install binance-connector
    credbroker run --profile spot -- python examples/binance_connector_bot.py

The profile maps the secret fields to the variables this bot reads, e.g.::

    [profiles.spot]
    source = "vault"
    path = "secret/credbroker/spot"
    env = { BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }
    # an Ed25519/RSA key instead: BINANCE_PRIVATE_KEY = "private_key" (PEM)

The library signs the requests itself, so credbroker cannot see the answers:
the bot reports key trouble with one call, `broker.signing.report_response`,
and it lands in the audit log as a `signature_failure` event.
"""

from __future__ import annotations

import os
import sys

from binance.error import ClientError
from binance.spot import Spot

from broker.signing import report_response

# Spot testnet by default; BINANCE_BASE_URL for another (https://api.binance.com).
BASE_URL = os.environ.get("BINANCE_BASE_URL", "https://testnet.binance.vision")


def main() -> int:
    api_key = os.environ.get("BINANCE_API_KEY")
    secret = os.environ.get("BINANCE_API_SECRET")
    private_key = os.environ.get("BINANCE_PRIVATE_KEY")  # PEM: Ed25519 or RSA
    if not api_key or not (secret or private_key):
        print("bot: BINANCE_API_KEY and BINANCE_API_SECRET (or BINANCE_PRIVATE_KEY) are not set; "
              "start me with `credbroker run --profile NAME -- python examples/binance_connector_bot.py`",
              file=sys.stderr)
        return 2
    if private_key:
        client = Spot(api_key=api_key, private_key=private_key, base_url=BASE_URL, timeout=10)
    else:
        client = Spot(api_key=api_key, api_secret=secret, base_url=BASE_URL, timeout=10)
    del secret, private_key  # the client holds them now; keep no other copy around

    try:
        account = client.account(recvWindow=5000)
    except ClientError as e:
        # One documented call records key trouble (-1022, -2014, -2015, -1021, HTTP 401); other errors are ignored.
        failure = report_response(e.status_code, {"code": e.error_code, "msg": e.error_message},
                                  BASE_URL + "/api/v3/account", method="GET",
                                  profile=os.environ.get("CREDBROKER_PROFILE"), api_key=api_key)
        note = f" (recorded as signature_failure: {failure.reason})" if failure else ""
        print(f"bot: GET /api/v3/account failed: {e.status_code} {e.error_code} {e.error_message}{note}",
              file=sys.stderr)
        return 1
    print(f"bot: account ok ({len(account.get('balances', []))} balances)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
