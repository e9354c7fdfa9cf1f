#!/usr/bin/env python3
"""A test bot for `credbroker run --agent` (tests/integration/test_agent.py).

    agent_bot.py BASE_URL STATE_DIR MODE

MODE "sign": signs requests through get_signer() (requests auth GET, form-body
POST, sign_params, and one from a child process of the bot), prints one line
per answer, writes its pid to STATE_DIR/pid and waits until STATE_DIR/go
exists, so the test can read /proc/PID/environ and the bot's memory meanwhile.

MODE "policy": tries one request per policy rule and prints the rule of each
refusal (``refused RULE``), or ``signed NAME`` when a request was signed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from broker import BrokerError, get_signer


def sign_mode(base: str, state: Path) -> int:
    signer = get_signer()
    print(f"bot: signer {signer!r} remote={signer.remote_kind}")  # type: ignore[attr-defined]
    session = requests.Session()
    ok = True
    r = session.get(f"{base}/fapi/v2/balance", auth=signer, timeout=10)
    print(f"bot: GET /fapi/v2/balance -> {r.status_code}")
    ok &= r.status_code == 200
    order = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC",
             "quantity": "0.001", "price": "10000"}
    r = session.post(f"{base}/fapi/v1/order", data=order, auth=signer, timeout=10)
    print(f"bot: POST /fapi/v1/order -> {r.status_code}")
    ok &= r.status_code == 200
    query = signer.sign_params({"symbol": "BTCUSDT"}, endpoint="/fapi/v1/openOrders")  # type: ignore[call-arg]
    r = session.get(f"{base}/fapi/v1/openOrders?{query}", headers=signer.headers(), timeout=10)
    print(f"bot: GET /fapi/v1/openOrders -> {r.status_code}")
    ok &= r.status_code == 200
    # A grandchild of the broker (the bot's own child) may sign too.
    child = subprocess.run([sys.executable, "-c", (
        "import requests, sys\n"
        "from broker import get_signer\n"
        "s = get_signer()\n"
        f"r = requests.get('{base}/fapi/v2/account', auth=s, timeout=10)\n"
        "print('bot-child: GET /fapi/v2/account ->', r.status_code)\n"
        "sys.exit(0 if r.status_code == 200 else 1)\n")], capture_output=True, text=True, timeout=60)
    print(child.stdout.strip(), child.stderr.strip()[-400:])
    ok &= child.returncode == 0
    (state / "pid").write_text(str(os.getpid()))
    # The test reads this process's memory meanwhile, which is slow on a loaded machine; it
    # always touches "go", so this bound only ends a bot whose test died.
    deadline = time.monotonic() + 600
    while not (state / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return 0 if ok else 1


def policy_mode(base: str) -> int:
    signer = get_signer()
    attempts: list[tuple[str, dict[str, str], str | None]] = [
        ("allowed", {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "quantity": "0.01", "price": "1000",
                     "recvWindow": "3000"}, "/fapi/v1/order"),
        ("symbols", {"symbol": "DOGEUSDT", "side": "BUY", "quantity": "1", "price": "0.1", "recvWindow": "3000"},
         "/fapi/v1/order"),
        ("max_quantity", {"symbol": "BTCUSDT", "side": "BUY", "quantity": "5", "price": "1", "recvWindow": "3000"},
         "/fapi/v1/order"),
        ("max_notional", {"symbol": "BTCUSDT", "side": "BUY", "quantity": "0.05", "price": "60000",
                          "recvWindow": "3000"}, "/fapi/v1/order"),
        ("max_recv_window", {"symbol": "BTCUSDT", "recvWindow": "60000"}, "/fapi/v1/openOrders"),
        ("withdraw", {"coin": "USDT", "address": "TXYZ", "amount": "100", "recvWindow": "3000"},
         "/sapi/v1/capital/withdraw/apply"),
        ("deny_params", {"symbol": "BTCUSDT", "newClientOrderId": "x", "recvWindow": "3000"}, "/fapi/v1/order"),
    ]
    for name, params, endpoint in attempts:
        try:
            signer.sign_params(params, endpoint=endpoint)  # type: ignore[call-arg]
            print(f"signed {name}")
        except BrokerError as err:
            print(f"refused {getattr(err, 'rule', type(err).__name__)} | {err}")
    # The rate limit: burst 3 at 1/s after the attempts above have used it up.
    for _ in range(5):
        try:
            signer.sign_params({"symbol": "BTCUSDT", "recvWindow": "3000"}, endpoint="/fapi/v1/openOrders")  # type: ignore[call-arg]
            print("signed rate")
        except BrokerError as err:
            print(f"refused {getattr(err, 'rule', type(err).__name__)} | {err}")
    # The requests auth hook goes through the same policy, and the bot sees a clear error.
    try:
        requests.post(f"{base}/sapi/v1/capital/withdraw/apply", data={"coin": "USDT", "address": "T", "amount": "1"},
                      auth=signer, timeout=10)
        print("signed withdraw-auth")
    except BrokerError as err:
        print(f"refused {getattr(err, 'rule', type(err).__name__)} | {err}")
    return 0


if __name__ == "__main__":
    base_url, state_dir, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    sys.exit(sign_mode(base_url, state_dir) if mode == "sign" else policy_mode(base_url))
