#!/usr/bin/env python3
"""Benchmark `credbroker run --profile P -- true` against `bao kv get -format=json PATH`.

Starts its own OpenBao dev server on a free loopback port, stores one secret,
then alternates, round by round, in one run:

  ref     the Go CLI's bare fetch: bao kv get -format=json secret/credbroker/bench
  run     credbroker run --profile bench -- true   (fetch in-process: imports hvac)
  daemon  the same, with `credbroker daemon` running (hvac already loaded there)

and prints medians, p90 and the ratio to the reference (target <= 1.0). It
also prints the broker's peak memory (VmHWM) while supervising a child, for
both paths (target <= 40 MB). A benchmark, not a test: figures vary with the
machine's load; compare ratios, not absolute times.

    python scripts/bench_run.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import bao_binary, start_dev_server, stop


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def peak_memory_mb(cmd: list[str], env: dict[str, str]) -> float:
    """VmHWM of the broker, read by its child while the broker supervises it."""
    probe = [*cmd[: cmd.index("--") + 1], "sh", "-c", "sleep 0.3; grep VmHWM /proc/$PPID/status"]
    out = subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout
    return int(out.split()[1]) / 1024


def summary(name: str, xs: list[float], ref: float | None) -> str:
    med = statistics.median(xs)
    p90 = sorted(xs)[int(len(xs) * 0.9) - 1]
    ratio = f"{med / ref:5.2f}x" if ref else "  1.00x"
    return f"  {name:<8} median {med * 1000:7.1f} ms   p90 {p90 * 1000:7.1f} ms   ratio {ratio}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()

    credbroker = shutil.which("credbroker", path=os.path.dirname(sys.executable)) or shutil.which("credbroker")
    if not credbroker:
        sys.exit("bench_run: credbroker is not installed in this environment (pip install -e .)")
    bao = bao_binary("bench_run")
    work = Path(tempfile.mkdtemp(prefix="credbroker-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(HOME=str(work), XDG_RUNTIME_DIR=str(work / "run"), XDG_STATE_HOME=str(work / "state"))
    (work / "run").mkdir(mode=0o700)
    server = start_dev_server(bao, env, work)
    daemon = None
    try:
        subprocess.run([bao, "kv", "put", "-mount=secret", "credbroker/bench", "api_key=BENCHKEY", "api_secret=-"],
                       input=secrets.token_urlsafe(48), text=True, env=env, check=True, stdout=subprocess.DEVNULL)
        cfg = work / "credbroker.toml"
        cfg.write_text('[profiles.bench]\nsource = "vault"\npath = "secret/credbroker/bench"\n'
                       'env = { BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }\n')
        env["CREDBROKER_CONFIG"] = str(cfg)

        ref_cmd = [bao, "kv", "get", "-format=json", "-mount=secret", "credbroker/bench"]
        run_cmd = [credbroker, "run", "--profile", "bench", "--", "true"]
        no_daemon = {**env, "CREDBROKER_DAEMON": "0"}

        daemon = subprocess.Popen([credbroker, "daemon"], env=env, stderr=subprocess.PIPE, text=True)
        assert daemon.stderr is not None
        daemon.stderr.readline()  # "serving on ..."

        for cmd, e in ((ref_cmd, env), (run_cmd, no_daemon), (run_cmd, env)):  # warm caches
            timed(cmd, e)
        ref, run, via_daemon = [], [], []
        for _ in range(args.rounds):
            ref.append(timed(ref_cmd, env))
            run.append(timed(run_cmd, no_daemon))
            via_daemon.append(timed(run_cmd, env))

        mem_run = peak_memory_mb(run_cmd, no_daemon)
        mem_daemon = peak_memory_mb(run_cmd, env)
        daemon_rss = int(
            next(line for line in Path(f"/proc/{daemon.pid}/status").read_text().splitlines()
                 if line.startswith("VmRSS")).split()[1]
        ) / 1024

        ref_med = statistics.median(ref)
        print(f"credbroker run vs bao kv get, {args.rounds} alternating rounds, {os.cpu_count()} cores")
        print(summary("bao", ref, None))
        print(summary("run", run, ref_med) + "   (in-process fetch, imports hvac)")
        print(summary("daemon", via_daemon, ref_med) + "   (credbroker daemon running)")
        print("peak memory of the broker while supervising (VmHWM):")
        print(f"  run      {mem_run:5.1f} MB")
        print(f"  daemon   {mem_daemon:5.1f} MB   (+ the daemon itself: {daemon_rss:.1f} MB resident)")
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=10)
        stop(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
