#!/usr/bin/env python3
"""Benchmark the audit log (issue 3, "Speed"): appends and the report over 10^6 records.

    python scripts/bench_audit.py                       # full run (about a minute or two)
    python scripts/bench_audit.py --records 200000      # quicker

Figures (each next to a reference measured in the same run, with the ratio):

- durable appends (lock + write + fdatasync per record) vs a bare
  ``os.write`` + ``fdatasync`` per line: the cost of the chain and the lock
  on top of the disk's own sync cost;
- batched appends (group commit, ``durable=False`` + ``flush``) vs writing
  the same JSON lines with no chain, lock or fsync; target >= 20,000 records/s;
- ``credbroker audit report`` work (verify + report in one streaming pass)
  over a 90-day log of N records, in a child process, wall time and peak RSS,
  vs a Python loop that only reads the same lines; target <= 5 s and <= 100 MB
  for 10^6 records.

Not a test: machines are shared and noisy (TESTING.md, "Benchmarks are not tests").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from broker.audit.log import AuditLog  # noqa: E402
from broker.audit.settings import AuditSettings  # noqa: E402


def bench_durable(folder: Path, n: int) -> tuple[float, float]:
    log = AuditLog(AuditSettings(path=folder / "durable" / "audit.log"))
    fields = {"profile": "um-futures", "source": "vault", "path": "secret/credbroker/binance/um-futures",
              "version": 3, "fields": ["api_key", "api_secret"]}
    t = time.perf_counter()
    for _ in range(n):
        log.record("secret_fetched", fields, durable=True)
    ours = n / (time.perf_counter() - t)
    fd = os.open(folder / "durable" / "reference.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    line = json.dumps({"event": "secret_fetched", **fields}).encode() + b"\n"
    t = time.perf_counter()
    for _ in range(n):
        os.write(fd, line)
        os.fdatasync(fd)
    ref = n / (time.perf_counter() - t)
    os.close(fd)
    return ours, ref


def bench_batched(folder: Path, n: int, batch: int = 1000) -> tuple[float, float]:
    log = AuditLog(AuditSettings(path=folder / "batched" / "audit.log", max_size=1 << 40, rotate="size"))
    t = time.perf_counter()
    for i in range(0, n, batch):
        with log.batch():
            for j in range(batch):
                log.record("sign", {"profile": "um-futures", "endpoint": "/fapi/v1/order", "n": i + j},
                           durable=False)
    ours = n / (time.perf_counter() - t)
    t = time.perf_counter()
    with open(folder / "batched" / "reference.log", "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"event": "sign", "data": {"profile": "um-futures", "endpoint": "/fapi/v1/order",
                                                          "n": i}}, sort_keys=True) + "\n")
    ref = n / (time.perf_counter() - t)
    return ours, ref


def generate(path: Path, n: int, days: int = 90) -> None:
    """A busy host's 90 days: mostly signatures, runs of bots, a few failures and refusals."""
    import broker.audit.log as logmod

    log = AuditLog(AuditSettings(path=path, rotate="size", max_size=64 * 1024 * 1024))
    start = datetime.now(timezone.utc) - timedelta(days=days)
    step = days * 86400 / n
    clock = {"i": 0}

    def stamp(now: float | None = None) -> str:
        return (start + timedelta(seconds=clock["i"] * step)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    logmod.utc_timestamp = stamp
    pid = 1000
    with log.batch():
        for i in range(n):
            clock["i"] = i
            k = i % 100
            if k == 0:
                pid += 1
                log.record("secret_fetched", {"profile": f"bot{i % 7}", "source": "vault", "version": 3 + i * 2 // n,
                                              "path": f"secret/credbroker/bot{i % 7}", "fields": ["api_key", "api_secret"]},
                           durable=False)
            elif k == 1:
                log.record("secret_injected", {"profile": f"bot{i % 7}", "version": 3 + i * 2 // n, "pid": pid,
                                               "command": ["python", f"bot{i % 7}.py"], "host": "h1", "user": "trader",
                                               "cwd": "/srv", "variables": ["BINANCE_API_KEY", "BINANCE_API_SECRET"]},
                           durable=False)
            elif k == 2:
                log.record("child_exited", {"profile": f"bot{i % 7}", "pid": pid, "status": 0, "duration_s": 60.0},
                           durable=False)
            elif i % 5003 == 3:
                log.record("signature_failure", {"profile": f"bot{i % 7}", "code": -1022, "status": 400,
                                                 "endpoint": "https://fapi.binance.com/fapi/v1/order"}, durable=False)
            elif i % 20011 == 4:
                log.record("refused", {"profile": f"bot{i % 7}", "error": "VaultSealed", "reason": "sealed"},
                           durable=False)
            else:
                log.record("sign", {"profile": f"bot{i % 7}", "endpoint": "/fapi/v1/order"}, durable=False)
    log.close()


REPORT_CHILD = """
import sys, time, resource
from datetime import datetime, timedelta, timezone
from pathlib import Path
from broker.audit.files import log_set
from broker.audit.report import build_report
active = Path(sys.argv[1])
now = datetime.now(timezone.utc)
t = time.perf_counter()
r = build_report(log_set(active), since=now - timedelta(days=7), until=now, active=active)
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the chain verifier, if forked
print(wall, rss, r["chain"]["status"], r["chain"]["records"], r["records_in_period"], child)
"""

VERIFY_CHILD = """
import sys, time, resource
from pathlib import Path
from broker.audit.verify import verify_files
t = time.perf_counter()
r = verify_files(None, active=Path(sys.argv[1]))
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, r.status)
"""

READ_CHILD = """
import sys, time, resource, json
from pathlib import Path
from broker.audit.files import log_set
parse = sys.argv[2] == "json"
t = time.perf_counter()
n = 0
for p in log_set(Path(sys.argv[1])):
    with p.open("rb", buffering=1 << 20) as fh:
        for line in fh:
            if parse:
                json.loads(line)
            n += 1
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, n)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000, help="records in the report's log")
    ap.add_argument("--durable", type=int, default=1000, help="durable appends to time")
    ap.add_argument("--batched", type=int, default=200_000, help="batched appends to time")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPU(s), load average "
              f"{os.getloadavg()[0]:.1f}, folder {folder}")
        ours, ref = bench_durable(folder, args.durable)
        print(f"durable appends (fsync each): {ours:10,.0f} records/s; bare write+fdatasync {ref:10,.0f}/s; "
              f"ratio {ours / ref:.2f}")
        ours, ref = bench_batched(folder, args.batched)
        print(f"batched appends (group commit): {ours:8,.0f} records/s; plain json.dumps+write {ref:10,.0f}/s; "
              f"ratio {ours / ref:.2f}  (target >= 20,000/s: {'met' if ours >= 20_000 else 'NOT met'})")
        active = folder / "report" / "audit.log"
        t = time.perf_counter()
        generate(active, args.records)
        gen = time.perf_counter() - t
        size = sum(p.stat().st_size for p in active.parent.iterdir())
        nfiles = len([p for p in active.parent.glob("audit.log*") if not p.name.endswith((".head", ".lock"))])
        print(f"generated {args.records:,} records over 90 days ({size / 1e6:.0f} MB, {nfiles} files) "
              f"in {gen:.1f} s")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        refs = {}
        for kind in ("read", "json"):
            out = subprocess.run([sys.executable, "-c", READ_CHILD, str(active), kind], capture_output=True,
                                 text=True, env=env, check=True).stdout.split()
            refs[kind] = float(out[0])
        out = subprocess.run([sys.executable, "-c", REPORT_CHILD, str(active)], capture_output=True, text=True,
                             env=env, check=True).stdout.split()
        wall, rss, status, records, child = float(out[0]), float(out[1]), out[2], int(out[3]), float(out[5])
        print(f"report (chain verified in a forked child while the report streams): {wall:.2f} s, "
              f"peak RSS {rss:.0f} MB + verifier child {child:.0f} MB, chain {status}, {records:,} records")
        print(f"  references: reading the lines {refs['read']:.2f} s; json.loads of every line (no chain, no "
              f"report) {refs['json']:.2f} s; report / json.loads ratio {wall / refs['json']:.2f}")
        out = subprocess.run([sys.executable, "-c", VERIFY_CHILD, str(active)], capture_output=True, text=True,
                             env=env, check=True).stdout.split()
        print(f"verify alone (credbroker audit verify): {float(out[0]):.2f} s, peak RSS {float(out[1]):.0f} MB, {out[2]}")
        rss = rss + child  # both processes at their peaks, added: the honest upper bound
        verdict = "met" if wall <= 5 and rss <= 100 else "NOT met"
        print(f"report target (<= 5 s and <= 100 MB for 1,000,000 records): {verdict}"
              + ("" if args.records == 1_000_000 else f" (measured at {args.records:,} records)"))


if __name__ == "__main__":
    main()
