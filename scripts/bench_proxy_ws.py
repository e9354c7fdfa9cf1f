#!/usr/bin/env python3
"""Benchmark the proxy's WebSocket API endpoint: bot -> proxy -> fake exchange vs bot -> fake exchange.

    python scripts/bench_proxy_ws.py            # ~1 minute
    python scripts/bench_proxy_ws.py --quick

Three processes, as in a real run: the fake WebSocket API of
tests/helpers/fake_binance_ws.py (its own process; it verifies every HMAC signature),
the proxy in this process (``broker.proxy.ws.WsProxy`` with the real key, the
peer check on, its records group-committed to a real audit log through the
REST proxy's queue, as ``credbroker run --proxy`` wires it), and the bot (a
child of this process). The bot keeps one connection per thread and sends
signed ``order.place`` requests, measuring in the same run, alternating:

  direct 1t / proxy 1t   one request at a time on one connection: p50 and p99 round trip
  direct Nt / proxy Nt   N threads, one connection each: requests per second

A benchmark, not a test: the machine is shared; compare the figures measured
side by side. For scale, a round trip to Binance's servers is tens of
milliseconds from most places.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

API_KEY = "W" + "e5" * 32
ORDER = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01",
         "price": "100"}


def run_bot(n: int, seconds: float, threads: int) -> None:
    """The bot's side (a child process): secrets and URLs on stdin, JSON figures on stdout."""
    from websockets.sync.client import connect

    from broker.secret import Secret
    from broker.signing.hmac_sha256 import HmacSigner

    cfg = json.loads(sys.stdin.read())
    targets = {"direct": (cfg["direct"], cfg["secret"]), "proxy": (cfg["proxy"] + "/ws-api/v3", cfg["proxy_secret"])}

    def round_trips(name: str, count: int, deadline: float | None = None) -> list[float]:
        url, secret = targets[name]
        signer = HmacSigner(API_KEY, Secret(secret))
        out: list[float] = []
        with connect(url, compression=None) as ws:
            for i in range(count + 20):
                if deadline is not None and time.monotonic() > deadline:
                    break
                t0 = time.perf_counter()
                ws.send(json.dumps({"id": i, "method": "order.place",
                                    "params": signer.sign_ws_params(ORDER, method="order.place")}))
                answer = json.loads(ws.recv(timeout=30))
                if answer.get("status") != 200:
                    raise SystemExit(f"{name}: {answer}")
                if i >= 20:  # warm up first
                    out.append(time.perf_counter() - t0)
        return out

    lat: dict[str, list[float]] = {"direct": [], "proxy": []}
    for _ in range(4):  # alternate, so both see the same machine
        for name in lat:
            lat[name] += round_trips(name, n // 4)
    rps: dict[str, float] = {}
    for name in ("direct", "proxy"):
        counts: list[int] = []
        end = time.monotonic() + seconds / 2

        def worker(name: str = name, end: float = end) -> None:
            counts.append(len(round_trips(name, 10**9, end)))

        ts = [threading.Thread(target=worker) for _ in range(threads)]
        t0 = time.monotonic()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        rps[name] = sum(counts) / (time.monotonic() - t0)

    def q(values: list[float], p: float) -> float:
        return statistics.quantiles(values, n=100)[int(p) - 1] * 1e6

    print(json.dumps({name: {"p50_us": statistics.median(v) * 1e6, "p99_us": q(v, 99), "rps": rps[name]}
                      for name, v in lat.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--bot", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bot:
        run_bot(args.n, args.seconds, args.threads)
        return

    from broker.audit import open_log
    from broker.proxy.clientkey import ClientKey
    from broker.proxy.server import SigningProxy
    from broker.proxy.settings import ProxySettings
    from broker.proxy.upstream import make_upstreams
    from broker.proxy.ws import WsProxy
    from broker.secret import Secret
    from broker.signing.hmac_sha256 import HmacSigner
    from broker.signing_policy import SigningPolicy

    secret = secrets.token_hex(32)
    exchange = subprocess.Popen([sys.executable, str(REPO / "tests" / "helpers" / "fake_binance_ws.py"), f"{API_KEY}={secret}"],
                                stdout=subprocess.PIPE, text=True, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    tmp = tempfile.TemporaryDirectory(prefix="bench-proxy-ws-")
    rest = ws = None
    try:
        assert exchange.stdout is not None
        url = exchange.stdout.readline().strip()
        if not url.startswith("ws://"):
            sys.exit("bench_proxy_ws: the fake exchange did not start")
        log = open_log(None, env={"XDG_STATE_HOME": tmp.name, "HOME": tmp.name})
        client_key = ClientKey("hmac")
        signer = HmacSigner(API_KEY, Secret(secret))
        # The REST proxy only for what a real run shares with it: the audit queue, the peer check and the
        # request-weight limiter (limits raised so that every order is counted but none refused).
        high = {"weight_1m": 10**9, "orders_10s": 10**9, "orders_1d": 10**9, "orders_1m": 10**9}
        settings = ProxySettings.from_mapping({"spot": "http://127.0.0.1:9", "futures": "http://127.0.0.1:9",
                                               "unsafe_plain_http_loopback": True,
                                               "rate_limits": {"spot": high}}, "bench")
        rest = SigningProxy(signer, client_key, settings, make_upstreams(settings), SigningPolicy(), log,
                            profile="bench", root_pid=os.getpid())
        rest.start()
        ws = WsProxy(signer, client_key, SigningPolicy(), {"spot": url + "/ws-api/v3", "futures": url + "/ws-fapi/v1"},
                     profile="bench", record=rest._record, check_peer=rest.check_peer, limiters=rest.limiters)
        proxy_url = ws.start()
        n, seconds = (400, 4.0) if args.quick else (4000, 20.0)
        cpu0 = time.process_time()
        bot = subprocess.run([sys.executable, __file__, "--bot", "--n", str(n), "--seconds", str(seconds),
                              "--threads", str(args.threads)],
                             input=json.dumps({"direct": url + "/ws-api/v3", "proxy": proxy_url, "secret": secret,
                                               "proxy_secret": client_key.secret.reveal_str()}),
                             env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
        proxy_cpu = time.process_time() - cpu0
        if bot.returncode != 0:
            sys.exit(f"bench_proxy_ws: the bench bot failed: {bot.stderr.strip()[-400:]}")
        res: dict[str, Any] = json.loads(bot.stdout)
        forwarded = ws.forwarded
    finally:
        if ws is not None:
            ws.stop()
        if rest is not None:
            rest.stop()
        exchange.kill()
        exchange.wait()
        tmp.cleanup()
    d, p = res["direct"], res["proxy"]
    print(f"bench_proxy_ws: {os.cpu_count()} CPUs, {n} sequential order.place, {args.threads} threads for "
          "throughput, audit log on (group commit)")
    print(f"{'':24}{'p50 us':>10}{'p99 us':>10}{'req/s ' + str(args.threads) + 't':>14}")
    print(f"{'bot -> exchange':24}{d['p50_us']:>10.0f}{d['p99_us']:>10.0f}{d['rps']:>14.0f}")
    print(f"{'bot -> proxy -> exchange':24}{p['p50_us']:>10.0f}{p['p99_us']:>10.0f}{p['rps']:>14.0f}")
    print(f"added by the proxy: p50 {p['p50_us'] - d['p50_us']:.0f} us, p99 {p['p99_us'] - d['p99_us']:.0f} us; "
          f"latency ratio p50 {p['p50_us'] / d['p50_us']:.2f}x; throughput ratio {p['rps'] / d['rps']:.2f}x; "
          f"proxy CPU {proxy_cpu / max(forwarded, 1) * 1e6:.0f} us per request ({forwarded} forwarded)")


if __name__ == "__main__":
    main()
