#!/usr/bin/env python3
"""A bot that signs its own Binance requests with plain `requests` and credbroker's get_signer().

Run it under the broker (no key file anywhere, the key never in this process's argv or on disk):

    credbroker run --profile um-futures -- python examples/signed_requests_bot.py

or outside it, fetching through the same config (and audited):

    python examples/signed_requests_bot.py --profile um-futures

With a transit profile ([profiles.NAME.signer] type = "transit") the private key
stays inside Vault: this process only holds a token that can sign with it.

Answers that mean key trouble (-1022 bad signature, -2014/-2015 bad key, IP or
permissions, -1021 clock, HTTP 401) are recorded in credbroker's audit log as
signature_failure events by the signer itself; review them with
`credbroker audit report`.
"""

from __future__ import annotations

import argparse
import os
import sys

import requests

from broker import BrokerError, get_signer

# USDⓈ-M futures testnet by default; BINANCE_BASE_URL or --base-url for another (https://fapi.binance.com).
DEFAULT_BASE = os.environ.get("BINANCE_BASE_URL", "https://testnet.binancefuture.com")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="credbroker profile (default: the one `credbroker run` started us with)")
    parser.add_argument("--base-url", default=DEFAULT_BASE)
    parser.add_argument("--symbol", default="BTCUSDT")
    args = parser.parse_args()

    try:
        signer = get_signer(profile=args.profile)
    except BrokerError as err:
        print(f"bot: cannot get a signer: {err}", file=sys.stderr)
        return 2
    print(f"bot: signing as {signer!r}")  # the API key shows masked, the secret never

    session = requests.Session()
    session.headers["User-Agent"] = "credbroker-example-bot"
    failed = False

    # 1. A signed GET: `auth=signer` adds recvWindow, timestamp and signature and sets X-MBX-APIKEY.
    r = session.get(f"{args.base_url}/fapi/v2/balance", auth=signer, timeout=10)
    print(f"bot: GET /fapi/v2/balance -> {r.status_code}")
    failed |= r.status_code != 200

    # 2. A signed POST with a form body (signature computed over query string + body, as sent).
    order = {"symbol": args.symbol, "side": "BUY", "type": "LIMIT", "timeInForce": "GTC",
             "quantity": "0.001", "price": "10000"}
    r = session.post(f"{args.base_url}/fapi/v1/order/test", data=order, auth=signer, timeout=10)
    print(f"bot: POST /fapi/v1/order/test -> {r.status_code}")
    failed |= r.status_code != 200

    # 3. By hand, for code that builds its own URLs: sign_params() returns the whole signed query.
    query = signer.sign_params({"symbol": args.symbol})
    r = session.get(f"{args.base_url}/fapi/v1/openOrders?{query}", headers=signer.headers(), timeout=10)
    signer.check_response(r)  # not sent with auth=signer: record key trouble explicitly
    print(f"bot: GET /fapi/v1/openOrders -> {r.status_code}")
    failed |= r.status_code != 200

    if signer.last_failure is not None:
        f = signer.last_failure
        print(f"bot: key trouble recorded in the audit log: {f.code} {f.reason} at {f.endpoint}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
