#!/usr/bin/env python3
"""Profile the signing agent's per-signature work in-process: one piece of it, N times.

    python scripts/profile_agent.py full 10000 --time        # perf counters: p50/p99 of each piece
    python scripts/profile_agent.py full 10000 --cprofile    # cProfile of N server iterations
    # instructions per signature (not noisy on a shared machine): the difference of two counts
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python scripts/profile_agent.py full 2000
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python scripts/profile_agent.py full 5000
    # ("Collected" of the second minus the first) / 3000

Pieces: ``full`` (``Agent._handle`` of one sign request + ``Agent._commit``: policy,
HMAC, audit record, the group commit's write, the answer), ``decode`` (the
request's JSON), ``check_sign`` (policy parse, summary and check), ``sign``
(HMAC), ``record`` (an audit record queued), ``record+flush`` (queued and
committed), ``reply`` (the answer's frame). The audit log is in a temporary
folder on /dev/shm with ``fsync = "group"``; no socket, no bot: the serving
loop and the bot's side are what ``bench_agent.py`` adds. A profile, not a
benchmark: compare revisions with ``PYTHONPATH=OLD_TREE`` on the same machine.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # last: an older tree given in PYTHONPATH wins

from broker.agent import policy as policy_glue  # noqa: E402
from broker.agent import protocol  # noqa: E402
from broker.agent.server import Agent  # noqa: E402
from broker.audit.log import AuditLog  # noqa: E402
from broker.audit.settings import AuditSettings  # noqa: E402
from broker.secret import Secret  # noqa: E402
from broker.signing import binance  # noqa: E402
from broker.signing.hmac_sha256 import HmacSigner  # noqa: E402
from broker.signing_policy import SigningPolicy  # noqa: E402

PARAMS = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01",
          "price": "52000.00"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("piece", choices=["none", "full", "decode", "check_sign", "sign", "record", "record+flush",
                                          "reply"])
    parser.add_argument("n", type=int)
    parser.add_argument("--time", action="store_true", help="print p50/p99 of one call (perf_counter_ns)")
    parser.add_argument("--cprofile", action="store_true", help="print the cProfile of the N calls")
    args = parser.parse_args()
    print(f"broker from {Path(sys.modules['broker'].__file__ or '?').parent}", file=sys.stderr)

    folder = Path(tempfile.mkdtemp(prefix="credbroker-profile-", dir="/dev/shm" if Path("/dev/shm").is_dir()
                                   else None))
    log = AuditLog(AuditSettings(path=folder / "audit.log", fsync="group"))
    agent = Agent(HmacSigner("BENCHKEY", Secret(b"x" * 64)), profile="bench",
                  policy=SigningPolicy.from_mapping(None, "bench"), audit=log)
    query = binance.encode(binance.param_items(PARAMS) + [("recvWindow", "5000"), ("timestamp", "1764695012345")])
    raw = protocol.encode_sign_request(query, "", "/fapi/v1/order", None)[protocol.HEADER.size:]
    request = protocol.decode(raw)
    fields = {"profile": "bench", "pid": 4242, **policy_glue.check_sign(request, agent.policy).summary}

    class Conn:  # what Agent._commit needs of a connection
        outbuf = bytearray()

    def full() -> None:
        agent._pending_replies.append((Conn, agent._handle(raw, 4242)))  # type: ignore[arg-type]
        agent._commit()
        Conn.outbuf.clear()

    def record() -> None:
        log.record("signed", fields, durable=False)
        log._pending.clear()

    def record_flush() -> None:
        log.record("signed", fields, durable=False)
        log.flush()

    pieces: dict[str, Callable[[], Any]] = {
        "none": lambda: None, "full": full, "decode": lambda: protocol.decode(raw),
        "check_sign": lambda: policy_glue.check_sign(request, agent.policy),
        "sign": lambda: agent._signer.sign(query), "record": record, "record+flush": record_flush,
        "reply": lambda: protocol.encode_signature("a" * 64)}
    fn = pieces[args.piece]
    try:
        if args.time:
            for _ in range(min(args.n, 500)):
                fn()
            out = []
            for _ in range(args.n):
                start = time.perf_counter_ns()
                fn()
                out.append((time.perf_counter_ns() - start) / 1000)
            out.sort()
            print(f"{args.piece}: p50 {statistics.median(out):.1f} us, p99 {out[int(len(out) * 0.99) - 1]:.1f} us")
        elif args.cprofile:
            import cProfile
            import pstats

            profile = cProfile.Profile()
            profile.enable()
            for _ in range(args.n):
                fn()
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)
        else:
            for _ in range(args.n):
                fn()
    finally:
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
