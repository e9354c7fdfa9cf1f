#!/usr/bin/env python3
"""Benchmark the signing proxy: bot -> proxy -> fake exchange against bot -> fake exchange directly.

    python scripts/bench_proxy.py               # ~1 minute
    python scripts/bench_proxy.py --quick

Three processes, as in a real run: the fake Binance of tests/helpers/fake_binance.py
(its own process, HTTP/1.1 keep-alive), the proxy in this process (the
broker's place: ``broker.proxy.server.SigningProxy`` with the real HMAC key,
the peer check on, and its audit records group-committed to a real audit log
in a temporary folder), and the bot (a child of this process, so the proxy's
process-tree check lets it in). The bot signs ``GET /fapi/v2/balance`` with
``requests`` + an HmacSigner as auth, one ``requests.Session`` (keep-alive)
per thread, and measures, in the same run and alternating:

  direct 1t / proxy 1t   one thread, one request at a time: p50 and p99 latency
  direct Nt / proxy Nt   N threads at once: requests per second

The proxy's cost is the added latency (proxy minus direct) and the ratio of
throughputs.

    python scripts/bench_proxy.py --capacity    # needs wrk and nginx: apt-get install wrk nginx-light

measures what the Python bot and exchange above cannot show (they top out
near 1,000 req/s on 2 cores): the proxy's own throughput. A load generator
and an exchange stand-in written in C take the Python out of both ends:
``wrk`` (one thread, 8 kept-alive connections, one request signed with the
run's proxy secret, recvWindow 60 s, replayed) against ``nginx`` answering
every path with a fixed balance JSON and ``X-MBX-USED-WEIGHT-1M: 1`` (so the
proxy's weight limiter, which believes the exchange's header, never refuses).
Alternated, same run: wrk -> nginx directly (the reference) and wrk -> proxy
-> nginx; with each, the CPU per request of the proxy (this process), wrk and
nginx. The proxy is one Python process: its CPU per request bounds its
throughput at about 1 / that on a free core. Targets from the issue: added p50 <= 300 us, p99 <= 1 ms,
>= 5,000 requests/s with several threads. A benchmark, not a test: the
machine is shared; compare the figures measured side by side. For scale, a
round trip to Binance's servers is tens of milliseconds from most places
(a few ms from the same cloud region).
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

API_KEY = "B" + "e5" * 32


def run_bot(args: argparse.Namespace) -> None:
    """The bot's side (a child process): measure direct and proxied requests, print JSON."""
    import requests

    from broker.secret import Secret
    from broker.signing.hmac_sha256 import HmacSigner

    def one(base: str, secret: str, n: int) -> list[float]:
        session = requests.Session()
        signer = HmacSigner(API_KEY, Secret(secret))
        url = base + "/fapi/v2/balance"
        for _ in range(20):  # warm up: connection, caches
            session.get(url, auth=signer).raise_for_status()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = session.get(url, auth=signer)
            out.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise SystemExit(f"bench bot: {r.status_code} {r.text}")
        return out

    def many(base: str, secret: str, threads: int, seconds: float) -> float:
        done = [0] * threads
        stop = time.monotonic() + seconds

        def work(i: int) -> None:
            session = requests.Session()
            signer = HmacSigner(API_KEY, Secret(secret))
            url = base + "/fapi/v2/balance"
            session.get(url, auth=signer).raise_for_status()
            while time.monotonic() < stop:
                if session.get(url, auth=signer).status_code != 200:
                    raise SystemExit("bench bot: a request failed")
                done[i] += 1

        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        t0 = time.monotonic()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return sum(done) / (time.monotonic() - t0)

    direct, proxy = (args.direct, os.environ["BENCH_EXCHANGE_SECRET"]), (args.proxy, os.environ["CREDBROKER_PROXY_SECRET"])
    lat: dict[str, list[float]] = {"direct": [], "proxy": []}
    rounds = 4
    for _ in range(rounds):  # alternate, so drift on a shared machine hits both alike
        lat["direct"] += one(*direct, args.n // rounds)
        lat["proxy"] += one(*proxy, args.n // rounds)
    rps = {"direct": 0.0, "proxy": 0.0}
    for _ in range(2):
        rps["direct"] += many(*direct, args.threads, args.seconds / 2) / 2
        rps["proxy"] += many(*proxy, args.threads, args.seconds / 2) / 2
    result: dict[str, Any] = {}
    for name, xs in lat.items():
        xs.sort()
        result[name] = {"p50_us": statistics.median(xs) * 1e6, "p99_us": xs[int(len(xs) * 0.99) - 1] * 1e6,
                        "rps": rps[name]}
    print(json.dumps(result))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

NGINX_CONF = """daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            add_header X-MBX-USED-WEIGHT-1M 1 always;
            return 200 '[{{"accountAlias":"bench","asset":"USDT","balance":"1000.00","availableBalance":"1000.00"}}]';
        }}
    }}
}}
"""


def _wrk(url: str, script: Path, seconds: float, connections: int) -> float:
    """Requests per second that wrk (one thread) sustained against ``url``; every answer must be a 200."""
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    if "Non-2xx or 3xx responses" in out or "Socket errors" in out:
        sys.exit(f"bench_proxy: wrk saw failed requests:\n{out}")
    line = next((x for x in out.splitlines() if x.startswith("Requests/sec:")), None)
    if line is None:
        sys.exit(f"bench_proxy: no rate in wrk's output:\n{out}")
    return float(line.split()[1])


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def capacity(args: argparse.Namespace) -> None:
    """wrk -> nginx against wrk -> proxy -> nginx: the proxy's own throughput and CPU per request."""
    import shutil
    import urllib.request

    from benchlib import free_port

    from broker.audit import open_log
    from broker.proxy.clientkey import ClientKey
    from broker.proxy.server import SigningProxy
    from broker.proxy.settings import ProxySettings
    from broker.proxy.upstream import make_upstreams
    from broker.secret import Secret
    from broker.signing.hmac_sha256 import HmacSigner
    from broker.signing_policy import SigningPolicy

    tools = {tool: shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin") for tool in ("wrk", "nginx")}
    missing = [tool for tool, found in tools.items() if found is None]
    if missing:
        sys.exit(f"bench_proxy --capacity: needs {' and '.join(missing)} (apt-get install wrk nginx-light)")
    nginx = tools["nginx"]
    tmp = tempfile.TemporaryDirectory(prefix="bench-proxy-capacity-")
    folder = Path(tmp.name)
    port = free_port()
    (folder / "nginx.conf").write_text(NGINX_CONF.format(tmp=folder, port=port))
    exchange = subprocess.Popen([str(nginx), "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e",
                                 str(folder / "nginx-error.log")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    proxy = None
    seconds = 4.0 if args.quick else 8.0
    rounds = 2
    connections = (1, 8) if args.quick else (1, 2, 8)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                urllib.request.urlopen(url + "/fapi/v2/balance", timeout=1).read()
                break
            except OSError:
                if exchange.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"bench_proxy: nginx did not start: {(exchange.stderr.read() if exchange.stderr else '')}")
                time.sleep(0.05)
        settings = ProxySettings.from_mapping({"spot": url, "futures": url, "unsafe_plain_http_loopback": True},
                                              "bench")
        upstreams = make_upstreams(settings)
        log = open_log(None, env={"XDG_STATE_HOME": tmp.name, "HOME": tmp.name})
        client_key = ClientKey("hmac")
        proxy = SigningProxy(HmacSigner(API_KEY, Secret(secrets.token_hex(32))), client_key, settings, upstreams,
                             SigningPolicy(), log, profile="bench", root_pid=os.getpid())
        proxy_url = proxy.start()
        bot_signer = HmacSigner(API_KEY, client_key.secret)

        def script() -> Path:
            # One request signed with the run's proxy secret, valid for 60 s: written to a 0600 file (never
            # argv); wrk replays it. A new one for every run of wrk.
            query = f"recvWindow=60000&timestamp={int(time.time() * 1000)}"
            query += f"&signature={bot_signer.sign(query)}"
            path = folder / "request.lua"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f'wrk.method = "GET"\nwrk.path = "/fapi/v2/balance?{query}"\n'
                        f'wrk.headers["X-MBX-APIKEY"] = "{API_KEY}"\n')
            return path

        _wrk(url, script(), 1, 8)  # warm up both paths
        _wrk(proxy_url, script(), 1, 8)
        # (connections, target) -> per round: (req/s, proxy CPU s per request, wrk's, nginx's)
        got: dict[tuple[int, str], list[tuple[float, float, float, float]]] = {}
        for _ in range(rounds):
            for conns in connections:
                for name, target in (("direct", url), ("proxy", proxy_url)):
                    cpu0, kids0, ex0, fwd0 = (time.process_time(), _children_cpu(), _cpu_seconds(exchange.pid),
                                              proxy.forwarded)
                    rate = _wrk(target, script(), seconds, conns)
                    n = rate * seconds
                    mine = (time.process_time() - cpu0) / max(proxy.forwarded - fwd0, 1) if name == "proxy" else 0.0
                    got.setdefault((conns, name), []).append(
                        (rate, mine, (_children_cpu() - kids0) / n, (_cpu_seconds(exchange.pid) - ex0) / n))
    finally:
        if proxy is not None:
            proxy.stop()
        exchange.terminate()
        exchange.wait()
        tmp.cleanup()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"bench_proxy --capacity: {os.cpu_count()} CPUs (load average {load}); wrk with one thread, {rounds} x "
          f"{seconds:g} s per row, alternated; nginx as the exchange; audit log on (group commit)")
    print(f"  {'connections':<12}{'wrk -> nginx':>16}{'wrk -> proxy -> nginx':>24}{'proxy CPU/request':>20}"
          f"{'wrk, nginx CPU/request':>26}")
    best = 0.0
    for conns in connections:
        direct, proxied = got[(conns, "direct")], got[(conns, "proxy")]
        d_rate = sum(r[0] for r in direct) / len(direct)
        p_rate = sum(r[0] for r in proxied) / len(proxied)
        best = max(best, *(r[0] for r in proxied))
        cpu_us = sum(r[1] for r in proxied) / len(proxied) * 1e6
        wrk_us = sum(r[2] for r in proxied) / len(proxied) * 1e6
        ngx_us = sum(r[3] for r in proxied) / len(proxied) * 1e6
        print(f"  {conns:<12}{d_rate:>12,.0f} r/s{p_rate:>20,.0f} r/s{cpu_us:>17,.0f} us{wrk_us:>15,.0f} / {ngx_us:.0f} us")
    print(f"  best proxied rate {best:,.0f} req/s; target >= 5,000 req/s with several bot connections: "
          f"{'met' if min(sum(r[0] for r in got[(c, 'proxy')]) / rounds for c in connections if c > 1) >= 5000 else 'NOT met'}"
          " (the proxy is one Python process: one event-loop thread serves every connection)")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a rough figure in ~15 s)")
    parser.add_argument("--threads", type=int, default=8, help="bot threads for the throughput runs")
    parser.add_argument("--capacity", action="store_true",
                        help="the proxy's throughput with wrk and nginx at both ends (apt-get install wrk nginx-light)")
    parser.add_argument("--bot", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--direct", help=argparse.SUPPRESS)
    parser.add_argument("--proxy", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bot:
        run_bot(args)
        return
    if args.capacity:
        capacity(args)
        return

    from broker.audit import open_log
    from broker.proxy.clientkey import ClientKey
    from broker.proxy.server import SigningProxy
    from broker.proxy.settings import ProxySettings
    from broker.proxy.upstream import make_upstreams
    from broker.secret import Secret
    from broker.signing.hmac_sha256 import HmacSigner
    from broker.signing_policy import SigningPolicy

    secret = secrets.token_hex(32)
    exchange = subprocess.Popen([sys.executable, str(REPO / "tests" / "helpers" / "fake_binance.py")],
                                stdout=subprocess.PIPE, text=True, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO), "FAKE_BINANCE_KEYS": f"{API_KEY}={secret}"})
    tmp = tempfile.TemporaryDirectory(prefix="bench-proxy-")
    proxy = None
    try:
        assert exchange.stdout is not None
        url = exchange.stdout.readline().strip()
        if not url.startswith("http://"):
            sys.exit("bench_proxy: the fake exchange did not start")
        settings = ProxySettings.from_mapping({"spot": url, "futures": url, "unsafe_plain_http_loopback": True},
                                              "bench")
        upstreams = make_upstreams(settings)
        for u in upstreams.values():
            u.sync_clock()
        log = open_log(None, env={"XDG_STATE_HOME": tmp.name, "HOME": tmp.name})
        client_key = ClientKey("hmac")
        proxy = SigningProxy(HmacSigner(API_KEY, Secret(secret)), client_key, settings, upstreams,
                             SigningPolicy(), log, profile="bench", root_pid=os.getpid())
        proxy_url = proxy.start()
        cpu0, ex_cpu0, ex_seen0 = time.process_time(), _cpu_seconds(exchange.pid), 0
        n, seconds = (400, 4.0) if args.quick else (4000, 20.0)
        bot = subprocess.run(
            [sys.executable, __file__, "--bot", "--direct", url, "--proxy", proxy_url,
             "--n", str(n), "--seconds", str(seconds), "--threads", str(args.threads)],
            # The secrets go in the environment, never in argv (world-readable /proc/PID/cmdline).
            env={**os.environ, "CREDBROKER_PROXY_SECRET": client_key.secret.reveal_str(),
                 "BENCH_EXCHANGE_SECRET": secret, "PYTHONPATH": str(REPO)},
            capture_output=True, text=True, timeout=600)
        if bot.returncode != 0:
            sys.exit(f"bench_proxy: the bench bot failed: {bot.stderr.strip()[-400:]}")
        res = json.loads(bot.stdout)
        proxy_cpu = time.process_time() - cpu0
        exchange_cpu = _cpu_seconds(exchange.pid) - ex_cpu0
        del ex_seen0
    finally:
        if proxy is not None:
            proxy.stop()
        exchange.kill()
        exchange.wait()
        tmp.cleanup()
    d, p = res["direct"], res["proxy"]
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"bench_proxy: {os.cpu_count()} CPUs (load average {load}), {n} sequential requests, {args.threads} "
          "threads for throughput, audit log on (group commit)")
    print(f"{'':24}{'p50 us':>10}{'p99 us':>10}{'req/s ' + str(args.threads) + 't':>14}")
    print(f"{'bot -> exchange':24}{d['p50_us']:>10.0f}{d['p99_us']:>10.0f}{d['rps']:>14.0f}")
    print(f"{'bot -> proxy -> exchange':24}{p['p50_us']:>10.0f}{p['p99_us']:>10.0f}{p['rps']:>14.0f}")
    print(f"added by the proxy: p50 {p['p50_us'] - d['p50_us']:.0f} us, p99 {p['p99_us'] - d['p99_us']:.0f} us; "
          f"latency ratio p50 {p['p50_us'] / d['p50_us']:.2f}x; throughput ratio {p['rps'] / d['rps']:.2f}x")
    print("for scale: a round trip to Binance's API is tens of ms from most places, a few ms from the same "
          f"cloud region; the proxy's added p50 here is {(p['p50_us'] - d['p50_us']) / 1000:.2f} ms")
    forwarded = proxy.forwarded if proxy else 0
    # CPU per request does not depend on how busy the machine is: the fake exchange (http.server plus a
    # signature check, every request, direct or proxied) is the reference measured in the same run.
    total = forwarded + int(d["rps"] * seconds / 2 * 2) + n
    print(f"CPU per request: proxy {proxy_cpu / max(forwarded, 1) * 1e6:.0f} us (its {forwarded} requests), "
          f"fake exchange {exchange_cpu / max(total, 1) * 1e6:.0f} us (~{total} requests): "
          f"{(proxy_cpu / max(forwarded, 1)) / (exchange_cpu / max(total, 1)):.2f}x")


if __name__ == "__main__":
    main()
