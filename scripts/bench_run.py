#!/usr/bin/env python3
"""Benchmark `credbroker run --profile P -- true` against `bao kv get -format=json PATH`.

Starts its own OpenBao dev server on a free loopback port, stores one secret,
then alternates, round by round, in one run:

  ref     the Go CLI's bare fetch: bao kv get -format=json secret/credbroker/bench
  run     credbroker run --profile bench -- true   (fetch in-process: imports hvac)
  daemon  the same, with `credbroker daemon` running (hvac already loaded there)
  bN-run, bN-dmn  the same two for each --base DIR

and prints medians, p90 and the ratio to the reference (target <= 1.0). It
also prints the broker's peak memory (VmHWM) while supervising a child, for
both paths (target <= 40 MB). A benchmark, not a test: figures vary with the
machine's load; compare ratios, not absolute times.

With ``--base DIR`` (a checkout of earlier code with its own ``DIR/.venv``)
the same two runs of that code alternate in the same rounds, with a daemon of
its own: "not slower than before" is then measured under the same load.

Every credbroker process runs with one bytecode cache of the benchmark's
own (``PYTHONPYCACHEPREFIX``, filled by the warm-up round), whatever
``PYTHONDONTWRITEBYTECODE`` says: a tree that happens to have ``__pycache__``
folders must not be compared with one that compiles every module at every
start (as an installed wheel never does).

    python scripts/bench_run.py [--rounds 30] [--base /tmp/base]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
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


def timed(cmd: list[str], env: dict[str, str], cpu: list[float] | None = None) -> float:
    """Wall time of one run; with ``cpu``, also appends the CPU seconds (user + system) of the run and every
    process it reaped (the fetch child, the bot; not the watchdog, which nobody waits for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return wall


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
    parser.add_argument("--base", metavar="DIR", action="append", default=[],
                        help="also time the code in DIR (with DIR/.venv), same rounds; repeatable")
    args = parser.parse_args()

    credbroker = shutil.which("credbroker", path=os.path.dirname(sys.executable)) or shutil.which("credbroker")
    if not credbroker:
        sys.exit("bench_run: credbroker is not installed in this environment (pip install -e .)")
    bao = bao_binary("bench_run")
    work = Path(tempfile.mkdtemp(prefix="credbroker-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(HOME=str(work), XDG_RUNTIME_DIR=str(work / "run"), XDG_STATE_HOME=str(work / "state"),
               PYTHONPYCACHEPREFIX=str(work / "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    (work / "run").mkdir(mode=0o700)
    bases = []
    for n, folder in enumerate(args.base, 1):
        exe = str(Path(folder) / ".venv" / "bin" / "credbroker")
        if not os.access(exe, os.X_OK):
            sys.exit(f"bench_run: {exe} is not there (the base needs its own .venv with credbroker)")
        bases.append((f"b{n}", folder, exe))
    server = start_dev_server(bao, env, work)
    daemon = None
    base_daemons: list[subprocess.Popen[str]] = []
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
        cases = [("bao", ref_cmd, env), ("run", run_cmd, no_daemon), ("daemon", run_cmd, env)]
        for label, _, exe in bases:
            (work / f"run-{label}").mkdir(mode=0o700)
            base_env = {**env, "CREDBROKER_DAEMON_SOCKET": str(work / f"run-{label}" / "credbroker" / "daemon.sock")}
            base_daemon = subprocess.Popen([exe, "daemon"], env=base_env, stderr=subprocess.PIPE, text=True)
            base_daemons.append(base_daemon)
            assert base_daemon.stderr is not None
            base_daemon.stderr.readline()
            base_run = [exe, *run_cmd[1:]]
            cases += [(f"{label}-run", base_run, {**base_env, "CREDBROKER_DAEMON": "0"}),
                      (f"{label}-dmn", base_run, base_env)]

        for _, cmd, e in cases:  # warm caches (and fill the bytecode cache)
            timed(cmd, e)
            timed(cmd, e)
        times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        cpu: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        order = random.Random(1)  # each round in another order: a neighbour's periodic load hits all alike
        for _ in range(args.rounds):
            for name, cmd, e in order.sample(cases, len(cases)):
                times[name].append(timed(cmd, e, cpu[name]))
        ref, run, via_daemon = times["bao"], times["run"], times["daemon"]

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
        for label, folder, _ in bases:
            print(summary(f"{label}-run", times[f"{label}-run"], ref_med) + f"   ({folder}, in-process)")
            print(summary(f"{label}-dmn", times[f"{label}-dmn"], ref_med) + f"   ({folder}, its daemon running)")
        print("CPU (user + system, the run and what it reaped), median; less sensitive to the machine's load:")
        for name, _, _ in cases:
            print(f"  {name:<8} {statistics.median(cpu[name]) * 1000:7.1f} ms")
        for label, folder, _ in bases:
            for mine, theirs in (("run", f"{label}-run"), ("daemon", f"{label}-dmn")):
                ratio = statistics.median(times[mine]) / statistics.median(times[theirs])
                cpu_ratio = statistics.median(cpu[mine]) / statistics.median(cpu[theirs])
                print(f"  {mine} vs {theirs} ({folder}): wall {ratio:.2f}x, CPU {cpu_ratio:.2f}x "
                      "(below 1: this code is faster)")
        print("peak memory of the broker while supervising (VmHWM):")
        print(f"  run      {mem_run:5.1f} MB")
        print(f"  daemon   {mem_daemon:5.1f} MB   (+ the daemon itself: {daemon_rss:.1f} MB resident)")
    finally:
        for d in (daemon, *base_daemons):
            if d is not None:
                d.send_signal(signal.SIGTERM)
                d.wait(timeout=10)
        stop(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
