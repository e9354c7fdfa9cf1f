"""The record format and the hash chain, shared by the writer and the verifier.

One record is one line of JSON (JSON Lines), written in this exact layout::

    {"v":1,"seq":7,"ts":"2026-11-24T04:00:00.123456Z","event":"secret_fetched",
     "prev":"<64 hex>","alg":"hmac-sha256","kid":"<16 hex>",
     "data":{...},"host":"bot-1","pid":4242,"user":"trader","hash":"<64 hex>"}

(on one line). The header (``v`` .. ``kid``) comes first in a fixed order, the
rest is compact JSON with sorted keys, and ``hash`` is last. ``hash`` is
computed over the line's exact bytes up to (not including) ``,"hash":``::

    unkeyed: SHA-256(b"credbroker/audit/v1/sha256\\0" || prefix)
    keyed:   HMAC-SHA256(key, b"credbroker/audit/v1/hmac\\0" || prefix)

The prefix holds ``prev`` (the previous record's ``hash``; 64 zeros for the
first record ever), so every record commits to all before it. The labels
separate the two algorithms' domains (and this use of the key from the key id).
Hashing bytes rather than re-serialised JSON means no canonicalisation can
disagree, and lets the verifier read ``seq``/``prev`` with one regular
expression instead of a JSON parse (the report streams 10^6 records).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

FORMAT_VERSION = 1
GENESIS = "0" * 64
ALG_SHA256 = "sha256"
ALG_HMAC = "hmac-sha256"
SHA256_LABEL = b"credbroker/audit/v1/sha256\x00"
_LABELS = {ALG_SHA256: SHA256_LABEL, ALG_HMAC: b"credbroker/audit/v1/hmac\x00"}
#: `,"hash":"` + 64 hex + `"}`
HASH_SUFFIX_LEN = 9 + 64 + 2
HASH_KEY = b',"hash":"'
#: ``2026-11-24T04:00:00.123456Z``: the writer always writes microseconds.
TS_LEN = 27
#: A record longer than this is refused: the writer's tail scan and the verifier assume it.
MAX_LINE = 64 * 1024

_HEADER = re.compile(
    r'\{"v":1,"seq":([1-9][0-9]{0,17}),"ts":"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]{8,15}Z)",'
    r'"event":"([a-z][a-z0-9_]{0,63})","prev":"([0-9a-f]{64})","alg":"(sha256|hmac-sha256)",'
    r'(?:"kid":"([0-9a-f]{16})",)?'
)
_TAIL = re.compile(r',"hash":"([0-9a-f]{64})"\}')
EVENT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")

Hasher = Callable[[bytes], str]


def make_hasher(key: bytes | None) -> tuple[str, Hasher]:
    """(alg, function(prefix) -> hex) for an unkeyed or keyed chain."""
    if key is None:
        label = _LABELS[ALG_SHA256]

        def sha(prefix: bytes) -> str:
            return hashlib.sha256(label + prefix).hexdigest()

        return ALG_SHA256, sha
    base = hmac.new(key, _LABELS[ALG_HMAC], hashlib.sha256)

    def mac(prefix: bytes) -> str:
        h = base.copy()
        h.update(prefix)
        return h.hexdigest()

    return ALG_HMAC, mac


#: Other uses of the chain key, each in its own domain: the head file and the Vault anchor.
HEAD_LABEL = b"credbroker/audit/v1/head\x00"
ANCHOR_LABEL = b"credbroker/audit/v1/anchor\x00"


def labelled_mac(key: bytes, label: bytes) -> Hasher:
    """HMAC-SHA256(key, label || message) as hex, for the head file and the Vault anchors."""
    base = hmac.new(key, label, hashlib.sha256)

    def mac(message: bytes) -> str:
        h = base.copy()
        h.update(message)
        return h.hexdigest()

    return mac


def build_prefix(seq: int, ts: str, event: str, prev: str, alg: str, kid: str | None, rest: str) -> bytes:
    """The hashed part of a line. ``rest`` is the sorted compact JSON of the other keys, braces stripped."""
    kid_part = f'"kid":"{kid}",' if kid else ""
    return (
        f'{{"v":{FORMAT_VERSION},"seq":{seq},"ts":"{ts}","event":"{event}","prev":"{prev}","alg":"{alg}",'
        f"{kid_part}{rest}"
    ).encode("ascii")


def encode_rest(body: dict[str, Any]) -> str:
    """Compact, sorted, ASCII-only JSON of a record's non-header keys, without the outer braces."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)[1:-1]


def finish_line(prefix: bytes, digest: str) -> bytes:
    """prefix + the hash key, newline-terminated."""
    return prefix + HASH_KEY + digest.encode("ascii") + b'"}\n'


class Header(NamedTuple):
    """What the verifier needs from a line, read without a JSON parse (a tuple: cheap to make)."""

    seq: int
    ts: str
    event: str
    prev: str
    alg: str
    kid: str | None
    digest: str
    prefix: bytes


def parse_header(line: bytes) -> Header | None:
    """The header of a complete line (no trailing newline), or None if it is not a record."""
    cut = len(line) - HASH_SUFFIX_LEN
    if cut < 40:
        return None
    try:
        text = line.decode("ascii")  # records are written ASCII-only (ensure_ascii)
    except UnicodeDecodeError:
        return None
    tail = _TAIL.match(text, cut)
    if tail is None or tail.end() != len(text):
        return None
    m = _HEADER.match(text)
    if m is None:
        return None
    seq, ts, event, prev, alg, kid = m.groups()
    return Header(int(seq), ts, event, prev, alg, kid, tail.group(1), line[:cut])


def digest_matches(expected_hex: str, actual_hex: str) -> bool:
    """Constant-time comparison of two hex digests (STYLE.md: MACs via compare_digest)."""
    return hmac.compare_digest(expected_hex, actual_hex)


_second: tuple[int, str] = (-1, "")


def utc_timestamp(now: float | None = None) -> str:
    """A record's ``ts``: ``2026-11-24T04:00:00.123456Z`` (UTC, microseconds; the formatted second is reused
    within the second: no datetime per record)."""
    global _second
    if now is None:
        now = time.time()
    sec = int(now // 1)
    micros = int((now - sec) * 1_000_000)
    cached = _second
    if cached[0] != sec:
        cached = _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{cached[1]}.{micros:06d}Z"
