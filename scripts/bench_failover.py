#!/usr/bin/env python3
"""Benchmark failover: from killing a 3-node OpenBao raft cluster's active node to the next bot start.

Starts a real cluster on loopback (the test suite's fixture, tests/helpers/cluster.py),
stores one secret, and for each round: points VAULT_ADDR at the active node
with `[vault] addrs` (CREDBROKER_VAULT_ADDRS) naming the others, kills the
active node with SIGKILL, then starts `credbroker run --vault-path ... -- true`
at once, again and again until one succeeds. Reported per round, and as the
median:

  run      kill -> the first successful `credbroker run` (what a bot start waits)
  leader   kill -> a new leader elected (the cluster's own failover: the reference)

The killed node is started again and unsealed between rounds. A benchmark,
not a test: compare the two columns, not absolute times.

    python scripts/bench_failover.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers.cluster import start_cluster  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("credbroker"))
    with tempfile.TemporaryDirectory() as tmp:
        cluster = start_cluster(Path(tmp))
        try:
            cluster.kv_put("credbroker/failover", api_secret="bench")
            runs: list[float] = []
            leaders: list[float] = []
            for n in range(args.rounds):
                leader = cluster.leader()
                others = [x for x in cluster.nodes if x is not leader]
                env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
                env.update(VAULT_ADDR=leader.addr, VAULT_TOKEN=cluster.root_token, CREDBROKER_DAEMON="0",
                           CREDBROKER_VAULT_ADDRS=" ".join(x.addr for x in others),
                           CREDBROKER_AUDIT_LOG=str(Path(tmp) / "audit.log"), CREDBROKER_VAULT_TIMEOUT="30")
                elected: list[float] = []
                killed = time.perf_counter()
                leader.kill()
                watcher = threading.Thread(target=lambda: (cluster.leader(), elected.append(time.perf_counter())))
                watcher.start()
                while True:
                    res = subprocess.run([exe, "run", "--vault-path", "secret/credbroker/failover", "-e",
                                          "S=api_secret", "--", "true"], env=env, capture_output=True, timeout=120)
                    if res.returncode == 0:
                        break
                runs.append(time.perf_counter() - killed)
                watcher.join()
                leaders.append(elected[0] - killed)
                print(f"  round {n + 1}: run {runs[-1] * 1000:7.0f} ms   leader {leaders[-1] * 1000:7.0f} ms",
                      flush=True)
                cluster.restart(leader)
            print(f"failover, {args.rounds} rounds, 3-node raft cluster on loopback, {os.cpu_count()} cores")
            print(f"  run     median {statistics.median(runs) * 1000:7.0f} ms   max {max(runs) * 1000:7.0f} ms"
                  "   (kill -> next successful credbroker run)")
            print(f"  leader  median {statistics.median(leaders) * 1000:7.0f} ms   max {max(leaders) * 1000:7.0f} ms"
                  "   (kill -> new leader elected: the reference)")
        finally:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
