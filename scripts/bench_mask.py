#!/usr/bin/env python3
"""Benchmark `credbroker run --mask` output masking against a plain `cat` pipe.

Issue 6 target: masking throughput >= 50% of a plain `cat` pipe on the same
data. Both sides move the same file through one extra process hop, round by
round in one run:

  cat    cat FILE | cat | cat >/dev/null   (first pipe 1 MiB, as masking's)
  mask   cat FILE | <credbroker's masking thread> | cat >/dev/null
         (broker.masking.MaskedOutput in pipe mode, the child started by
         broker.runner.spawn exactly as `credbroker run --mask` starts it)

The data is bot-like log lines (~100 bytes) with the API key and the secret
in one line of every --every (1000); then a dense variant where every line
carries both (the masker's slow path, every read full of matches). Prints
medians, MB/s and the ratio mask/cat in throughput (target >= 0.5). A
benchmark, not a test: figures vary with the machine's load; compare
ratios, not absolute times.

    python scripts/bench_mask.py [--mb 256] [--rounds 7] [--every 1000] [--no-dense]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.masking import _PIPE_SIZE, MARKER, MaskedOutput  # noqa: E402
from broker.runner import spawn  # noqa: E402
from broker.secret import Secret  # noqa: E402


def make_data(path: Path, size: int, api_key: str, secret: str, every: int) -> int:
    """Write ~size bytes of log lines; return how many lines carry a value."""
    lines = []
    carried = 0
    i = 0
    total = 0
    with path.open("wb") as f:
        while total < size:
            if i % every == every // 2:
                line = f"{i:09d} DEBUG signing with key={api_key} secret={secret}\n"
                carried += 1
            else:
                line = f"{i:09d} INFO order filled BTCUSDT side=BUY qty=0.004 price=67012.5 status=FILLED\n"
            lines.append(line)
            i += 1
            if len(lines) >= 4096:
                chunk = "".join(lines).encode()
                f.write(chunk)
                total += len(chunk)
                lines.clear()
        if lines:
            chunk = "".join(lines).encode()
            f.write(chunk)
    return carried


def run_cat(data: Path) -> float:
    start = time.perf_counter()
    r, w = os.pipe()
    # The same pipe size as the masking side asks for on the child's stdout
    # (broker.masking._PIPE_SIZE): the ratio then measures the masking work.
    fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    src = subprocess.Popen(["cat", str(data)], stdout=w)
    os.close(w)
    mid = subprocess.Popen(["cat"], stdin=r, stdout=subprocess.PIPE)
    os.close(r)
    sink = subprocess.Popen(["cat"], stdin=mid.stdout, stdout=subprocess.DEVNULL)
    assert mid.stdout is not None
    mid.stdout.close()
    for p in (src, mid, sink):
        if p.wait() != 0:
            raise SystemExit(f"bench_mask: {p.args!r} failed")
    return time.perf_counter() - start


def run_mask(data: Path, values: list[str], check: Path | None = None) -> float:
    start = time.perf_counter()
    if check is not None:
        sink = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=check.open("wb"))
    else:
        sink = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert sink.stdin is not None
    output = MaskedOutput(stdin_fd=0, stdout_fd=sink.stdin.fileno(), stderr_fd=2)
    env = {k.encode(): v.encode() for k, v in os.environ.items()}
    try:
        child = spawn(["cat", str(data)], "/bin/cat", env, output.child_stdio(Secret(v) for v in values))
        if child.proc.wait() != 0:
            raise SystemExit("bench_mask: cat failed under masking")
    finally:
        output.close()
    sink.stdin.close()
    if sink.wait() != 0:
        raise SystemExit("bench_mask: the sink failed")
    return time.perf_counter() - start


def report(name: str, size: int, cat: list[float], mask: list[float]) -> float:
    c, m = statistics.median(cat), statistics.median(mask)
    mb = size / 1e6
    ratio = c / m
    print(f"{name}: {mb:.0f} MB, median of {len(cat)} rounds")
    print(f"  cat pipe   {c:8.3f} s  {mb / c:8.0f} MB/s")
    print(f"  --mask     {m:8.3f} s  {mb / m:8.0f} MB/s")
    print(f"  throughput ratio mask/cat = {ratio:.2f}  (target >= 0.50: {'ok' if ratio >= 0.5 else 'MISSED'})")
    return ratio


def bench(name: str, args: argparse.Namespace, every: int) -> float:
    api_key = "AK" + secrets.token_hex(31)  # 64 characters, like Binance's
    secret = secrets.token_hex(32)  # 64 hex characters, like a Binance secret
    with tempfile.TemporaryDirectory(prefix="bench-mask-") as tmp:
        data = Path(tmp) / "data.log"
        carried = make_data(data, args.mb * 1_000_000, api_key, secret, every)
        size = data.stat().st_size
        # Correctness once, before timing: every value masked, nothing else changed.
        out = Path(tmp) / "out.log"
        run_mask(data, [api_key, secret], check=out)
        shown = out.read_bytes()
        assert api_key.encode() not in shown and secret.encode() not in shown, "a value was not masked"
        assert shown.count(MARKER) == 2 * carried, "wrong number of markers"
        assert len(shown.split(b"\n")) == len(data.read_bytes().split(b"\n")), "lines lost"
        out.unlink()
        cat: list[float] = []
        mask: list[float] = []
        run_cat(data)  # warm the page cache
        for _ in range(args.rounds):
            cat.append(run_cat(data))
            mask.append(run_mask(data, [api_key, secret]))
        return report(name, size, cat, mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256, help="data size in MB (default 256)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of each, alternated (default 7)")
    ap.add_argument("--every", type=int, default=1000, help="one line in N carries both values (default 1000)")
    ap.add_argument("--no-dense", action="store_true", help="skip the variant where every line carries both")
    args = ap.parse_args()
    if args.every < 1:
        ap.error("--every must be >= 1")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    bench(f"bot log (both values in 1 line of {args.every})", args, args.every)
    if not args.no_dense:
        bench("dense (both values in every line)", args, 1)


if __name__ == "__main__":
    main()
