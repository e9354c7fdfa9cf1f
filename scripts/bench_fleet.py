#!/usr/bin/env python3
"""Benchmark the fleet review: `credbroker audit report --host-logs DIR` over 20 hosts x 10^6 records.

    python scripts/bench_fleet.py                           # 20 hosts x 1,000,000 records (generated once)
    python scripts/bench_fleet.py --hosts 2                    # the first 2 hosts of the same logs: quicker
    python scripts/bench_fleet.py --hosts 4 --records 200000  # other logs (regenerates the cache!)
    python scripts/bench_fleet.py --base /tmp/base            # and the code in /tmp/base, same run

The logs are generated once into a cache folder (``--cache``, default
/var/tmp/credbroker-bench-fleet; not timed): per host 90 days of a busy bot
host in the writer's exact format (valid keyless chains, rotated at 64 MB),
mostly ``sign`` records, runs of bots, a few signature failures and
refusals, laid out as DIR/HOST/audit.log* like a collector's copy.

Timed, each in a fresh process, same run:

- the report (every host's chain verified on its own, then its report, one
  process per CPU), wall time, CPU time (parent and workers: what the wall
  time would be on idle cores, as the machine is shared) and peak RSS of the
  parent and of the largest worker;
- references: ``cat`` of every file to /dev/null and ``wc -l`` of every file
  (the cost of only reading the bytes), and the ratios;
- with ``--base DIR`` (a tree holding another version's ``broker/``, e.g.
  ``git archive COMMIT broker | tar -x -C DIR``): that code's report over
  the same logs, alternated with this code's (``--rounds``), and the ratios
  of the CPU and wall times (this code / that code): on a shared machine
  only a comparison in the same run means anything;
- ``--hosts N`` below the cached number (same ``--records``): the first N
  hosts of the cached logs, e.g. for a quick before/after (other
  ``--records`` regenerate the cache, which takes ~15 minutes for 20 x 10^6).

Target (issue): <= 30 s on this machine's two cores, memory bounded. Not a
test: the machine is shared (TESTING.md, "Benchmarks are not tests").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FORMAT = 3  # bump when the generated records change: the cache is rebuilt


def generate_host(folder: Path, host: str, n: int, end: datetime, days: int = 90) -> None:
    """One busy host's 90 days up to ``end``: the writer's exact line format and chain (``chain.py``),
    written straight to files (the writer's lock and group commit would make 20 x 10^6 records take
    half an hour to generate), rotated at 64 MB under the writer's file names."""
    from broker.audit.chain import GENESIS, build_prefix, encode_rest, finish_line, make_hasher

    alg, hasher = make_hasher(None)
    start = end - timedelta(days=days)
    step = days * 86400 / n
    pid = 1000
    path = "secret/credbroker/binance/"
    prev = GENESIS
    out = (folder / "audit.log").open("wb", buffering=1 << 20)
    written = 0
    for i in range(n):
        when = start + timedelta(seconds=i * step)
        ts = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        k = i % 100
        bot = f"bot{i % 7}"
        version = 3 + i * 2 // n
        if k == 0:
            pid += 1
            event, data = "secret_fetched", {"profile": bot, "source": "vault", "version": version,
                                             "path": path + bot, "address": "https://vault.internal:8200",
                                             "fields": ["api_key", "api_secret"]}
        elif k == 1:
            event, data = "secret_injected", {"profile": bot, "version": version, "pid": pid, "source": "vault",
                                              "path": path + bot, "address": "https://vault.internal:8200",
                                              "command": ["python", f"{bot}.py"], "host": host, "user": "trader",
                                              "cwd": "/srv/bots",
                                              "variables": ["BINANCE_API_KEY", "BINANCE_API_SECRET"]}
        elif k == 2:
            event, data = "child_exited", {"profile": bot, "pid": pid, "status": 0, "duration_s": 60.0}
        elif i % 5003 == 3:
            event, data = "signature_failure", {"profile": bot, "code": -1022, "status": 400, "host": host,
                                                "api_key": "****x7Qa",
                                                "endpoint": "https://fapi.binance.com/fapi/v1/order"}
        elif i % 20011 == 4:
            event, data = "refused", {"profile": bot, "error": "VaultSealed", "reason": "Vault is sealed",
                                      "source": "vault", "path": path + bot}
        else:
            event, data = "sign", {"profile": bot, "endpoint": "/fapi/v1/order", "kind": "hmac"}
        rest = encode_rest({"data": data, "host": host, "pid": 4000 + pid % 97, "user": "trader"})
        prefix = build_prefix(i + 1, ts, event, prev, alg, None, rest)
        prev = hasher(prefix)
        line = finish_line(prefix, prev)
        if written + len(line) > 64 * 1024 * 1024:  # rotate like the writer: the old file gets a time stamp
            out.close()
            (folder / "audit.log").rename(folder / ("audit.log." + when.strftime("%Y%m%dT%H%M%SZ")))
            out = (folder / "audit.log").open("wb", buffering=1 << 20)
            written = 0
        out.write(line)
        written += len(line)
    out.close()


def _generate_one(args: tuple[str, str, int, str]) -> str:
    folder, host, n, end = args
    generate_host(Path(folder), host, n, datetime.fromisoformat(end))
    return host


def ensure_cache(cache: Path, hosts: int, n: int) -> dict[str, object]:
    """The generated fleet (made once; reused while its parameters match)."""
    marker = cache / "bench-fleet.json"
    want = {"format": FORMAT, "hosts": hosts, "records": n}
    if marker.exists():
        meta = json.loads(marker.read_text())
        if {k: meta.get(k) for k in want} == want:
            return meta
        if meta.get("format") == FORMAT and meta.get("records") == n and int(meta.get("hosts", 0)) >= hosts:
            return meta  # the first ``hosts`` of them serve
    import shutil
    from concurrent.futures import ProcessPoolExecutor

    if cache.exists():
        shutil.rmtree(cache)
    end = datetime.now(timezone.utc).replace(microsecond=0)
    names = [f"bot-{i + 1:02d}" for i in range(hosts)]
    for name in names:
        (cache / "fleet" / name).mkdir(parents=True)
    t = time.perf_counter()
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for host in pool.map(_generate_one, [(str(cache / "fleet" / h), h, n, end.isoformat()) for h in names]):
            print(f"  generated {host}", flush=True)
    meta = {**want, "end": end.isoformat(), "generate_s": round(time.perf_counter() - t, 1)}
    marker.write_text(json.dumps(meta))
    return meta


REPORT_CHILD = """
import hashlib, json, sys, time, resource
from datetime import datetime, timedelta
from broker.audit.fleet import discover, fleet_report
until = datetime.fromisoformat(sys.argv[1])
t = time.perf_counter()
report = fleet_report(discover(sys.argv[2:]), since=until - timedelta(days=7), until=until)
text = json.dumps(report.to_dict(), sort_keys=True, default=str)
wall = time.perf_counter() - t
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
own = me.ru_maxrss / 1024
workers = kids.ru_maxrss / 1024
cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
print(json.dumps({"wall": wall, "rss": own, "worker_rss": workers, "cpu": cpu, "ok": report.chain["ok"],
                  "records": report.chain["records"], "in_period": report.records_in_period,
                  "hosts": len(report.sections["hosts"]), "json_bytes": len(text),
                  "digest": hashlib.sha256(text.encode()).hexdigest()}))
"""


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def run_report(tree: Path, specs: list[str], end: str) -> dict[str, Any]:
    """The report over the hosts ``specs`` (NAME=DIR) by the ``broker/`` in ``tree``, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", REPORT_CHILD, end, *specs], capture_output=True, text=True,
                         env=env, check=True).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, default=20)
    ap.add_argument("--records", type=int, default=1_000_000, help="records per host")
    ap.add_argument("--cache", type=Path, default=Path("/var/tmp/credbroker-bench-fleet"),
                    help="where the generated logs are kept between runs")
    ap.add_argument("--base", type=Path, action="append", default=[],
                    help="a tree with another version's broker/, timed in the same run (repeatable)")
    ap.add_argument("--rounds", type=int, default=1, help="with --base: rounds of (each tree once)")
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}")
    meta = ensure_cache(args.cache, args.hosts, args.records)
    fleet = args.cache / "fleet"
    hosts = sorted(p for p in fleet.iterdir() if p.is_dir())[: args.hosts]
    specs = [f"{p.name}={p}" for p in hosts]
    files = sorted(str(p) for h in hosts for p in h.glob("audit.log*") if not p.name.endswith((".head", ".lock")))
    size = sum(os.path.getsize(f) for f in files)
    print(f"fleet: {args.hosts} hosts x {args.records:,} records, {len(files)} files, {size / 1e9:.2f} GB "
          f"(generated in {meta.get('generate_s')} s, not timed)")
    # Warm the page cache the same way for everyone: read once before timing anything.
    timed(["cat", *files])
    cat = timed(["sh", "-c", 'cat "$@" >/dev/null', "cat", *files])
    wc = timed(["wc", "-l", *files])
    trees = [REPO, *args.base]
    runs: dict[Path, list[dict[str, Any]]] = {t: [] for t in trees}
    for n in range(args.rounds):
        for tree in trees if n % 2 == 0 else trees[::-1]:  # alternate who goes first
            runs[tree].append(run_report(tree, specs, str(meta["end"])))
    r = runs[REPO][0]
    workers = min(os.cpu_count() or 1, args.hosts)
    print(f"report over the fleet: {r['wall']:.1f} s, {r['hosts']} hosts, {r['records']:,} records "
          f"({r['in_period']:,} in the 7-day period), chains {'intact' if r['ok'] else 'NOT intact'}")
    # On a shared machine the wall time depends on what else runs; the CPU time (parent and workers) does not.
    print(f"  CPU time (parent + workers): {r['cpu']:.1f} s, {r['cpu'] / r['records'] * 1e6:.2f} us "
          f"per record; on {workers} idle core(s) about {r['cpu'] / workers:.1f} s")
    print(f"  peak RSS: parent {r['rss']:.0f} MB, largest worker {r['worker_rss']:.0f} MB (workers: {workers})")
    print(f"  references: cat of every file {cat:.1f} s (report/cat {r['wall'] / cat:.1f}x); "
          f"wc -l of every file {wc:.1f} s (report/wc {r['wall'] / wc:.1f}x)")
    for tree in trees:
        for k, x in enumerate(runs[tree]):
            print(f"  {'this code' if tree == REPO else tree}, round {k + 1}: wall {x['wall']:.1f} s, "
                  f"CPU {x['cpu']:.1f} s ({x['cpu'] / x['records'] * 1e6:.2f} us per record), "
                  f"report {x['digest'][:12]}")
    for tree in args.base:
        mine, theirs = runs[REPO], runs[tree]
        cpu = sum(x["cpu"] for x in mine) / sum(x["cpu"] for x in theirs)
        wall = sum(x["wall"] for x in mine) / sum(x["wall"] for x in theirs)
        same = {x["digest"] for x in mine} == {x["digest"] for x in theirs}
        print(f"  this code / {tree}: CPU {cpu:.2f}x, wall {wall:.2f}x; "
              f"{'the same report' if same else 'the reports DIFFER'}")
    print(f"  {r['records'] / r['wall']:,.0f} records/s; target <= 30 s: "
          f"{'met' if r['wall'] <= 30 else 'NOT met'}")
    # The report keeps both cores busy: other work on them lengthens it in proportion (and, on a virtual
    # machine, makes each CPU second do less), so a figure means something only with the load beside it.
    load = os.getloadavg()[0]
    print(f"  load average at the end: {load:.1f} (the report's own {workers} workers count for about "
          f"{workers} of it; much more means other work shared the cores)")


if __name__ == "__main__":
    main()
