"""Cross-check against Vault's own file audit device (issue 3, item 6).

Vault/OpenBao write one JSON object per request and per response. Paths are
in clear; tokens and secret values are HMAC'ed with the device's salt
(``hmac-sha256:...``). A read of a bot's KV v2 secret shows up as a
``response`` whose ``request.operation`` is ``read`` and whose
``request.path`` is ``MOUNT/data/PATH``.

Every such read within the period must match a ``secret_fetched`` record of
the broker: same path, same KV version when both are known, within
``TOLERANCE`` seconds; each broker record accounts for one read. What is left
is a read made outside the broker (an admin's ``vault kv get``, a leaked
token...).

Where a value must be matched, it is hashed by the server itself through
``sys/audit-hash/<device>`` (the salt never leaves Vault): the token in the
environment of whoever runs the report is hashed that way, and each
unmatched read says whether it was made with *that* token or another one.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AuditError, BrokerError

if TYPE_CHECKING:  # pragma: no cover
    from ..vault.settings import VaultSettings

TOLERANCE = 120.0
LIST_CAP = 200


def _epoch(ts: str) -> float | None:
    """Vault's RFC 3339 time (nanoseconds) or ours (microseconds) -> seconds since the epoch."""
    try:
        head, _, frac = ts.rstrip("Z").partition(".")
        dt = datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
        return dt.timestamp() + (float("0." + frac) if frac.isascii() and frac.isdigit() else 0.0)
    except ValueError:
        return None


def kv_logical_path(api_path: str) -> str | None:
    """``secret/data/credbroker/x`` -> ``secret/credbroker/x`` (a KV v2 data read), else None."""
    mount, sep, rest = api_path.partition("/data/")
    if not sep or not mount or not rest or "/" in mount:
        return None
    return f"{mount}/{rest}"


def audit_hash(settings: VaultSettings, device: str, value: str) -> str:
    """``sys/audit-hash/<device>`` of ``value``: the form the audit device logs it in."""
    from ..vault.paths import PathKind, check
    from ..vault import system
    from ..vault.session import close
    from ..vault.token import open_client

    device = check(device.strip("/"), PathKind.MOUNT, "the audit device")
    client = open_client(settings)
    path = f"sys/audit-hash/{device}"
    try:
        resp = system.audit_hash(client, settings, device, value)
        data = resp.json() if hasattr(resp, "json") else resp
        hashed = data["data"]["hash"] if isinstance(data, dict) and isinstance(data.get("data"), dict) else None
    except ValueError as exc:  # an answer that is not JSON
        raise AuditError(f"{path} did not answer like Vault", "check the audit device's path") from exc
    except BrokerError as exc:
        raise AuditError(f"{path} failed: {exc.message}",
                         exc.remedy or "check the audit device's path and that the token may use sys/audit-hash"
                         ) from exc
    finally:
        close(client)
    if not isinstance(hashed, str):
        raise AuditError(f"{path} returned no hash",
                         "check the audit device's path and that the token may use sys/audit-hash")
    return hashed


def token_audit_hash(settings: VaultSettings, device: str) -> str:
    """The audit-device hash of the broker's Vault token (never the token itself)."""
    from ..vault.session import close
    from ..vault.token import open_client

    client = open_client(settings)
    try:
        token = client.token
    finally:
        close(client)
    return audit_hash(settings, device, token)


def cross_check(
    vault_file: Path,
    broker_reads: Iterable[tuple[str, str, int | None] | tuple[str, str, int | None, str | None]],
    paths: Iterable[str],
    *,
    since: str,
    until: str,
    token_hash: str | None = None,
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """Reads of ``paths`` in ``vault_file`` (streamed) that no broker record accounts for.

    A broker read that carries Vault's ``request_id`` matches exactly the Vault
    entry with that ``request.id`` and nothing else, so a forged broker record
    cannot hide an outside read; older records without one are matched by
    path, version and time (within ``tolerance``).
    """
    watched = {p.strip("/") for p in paths}
    lo, hi = _epoch(since), _epoch(until)
    assert lo is not None and hi is not None
    # Broker reads by request id (exact), and the rest by path, sorted by time, each usable once.
    by_id: dict[str, tuple[str, float]] = {}
    by_path: dict[str, list[tuple[float, int | None]]] = {}
    for read in broker_reads:
        path, ts, version = read[0], read[1], read[2]
        request_id = read[3] if len(read) > 3 else None
        t = _epoch(ts)
        if t is None:
            continue
        if request_id:
            by_id[request_id] = (path.strip("/"), t)
        else:
            by_path.setdefault(path.strip("/"), []).append((t, version))
    ids_used: set[str] = set()
    for lst in by_path.values():
        lst.sort(key=lambda x: x[0])
    times_by_path = {p: [c[0] for c in lst] for p, lst in by_path.items()}
    used: dict[str, set[int]] = {p: set() for p in by_path}
    reads = matched = denied = 0
    unmatched: list[dict[str, Any]] = []
    unmatched_total = 0
    first_t: float | None = None
    last_t: float | None = None
    try:
        fh = vault_file.open("rb")
    except OSError as exc:
        raise AuditError(f"cannot read the Vault audit log {vault_file}: {exc.strerror or exc}",
                         "check the --vault-audit path and its permissions") from exc
    with fh:
        for raw in fh:
            if b'"response"' not in raw or b'"read"' not in raw:
                continue
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(entry, dict) or entry.get("type") != "response":
                continue
            req = entry.get("request") or {}
            if req.get("operation") != "read" or not isinstance(req.get("path"), str):
                continue
            t = _epoch(str(entry.get("time", "")))
            if t is None:
                continue
            first_t = t if first_t is None else min(first_t, t)
            last_t = t if last_t is None else max(last_t, t)
            logical = kv_logical_path(req["path"])
            if logical is None or logical not in watched or not (lo - tolerance <= t <= hi):
                continue
            if entry.get("error"):
                denied += 1
                continue
            reads += 1
            resp = entry.get("response") or {}
            meta = ((resp.get("data") or {}).get("metadata") or {}) if isinstance(resp, dict) else {}
            version = meta.get("version") if isinstance(meta.get("version"), int) else None
            rid = req.get("id")
            if isinstance(rid, str) and by_id.get(rid, ("", 0.0))[0] == logical:
                ids_used.add(rid)
                matched += 1
                continue
            if _claim(by_path.get(logical, []), times_by_path.get(logical, []), used.setdefault(logical, set()), t,
                      version, tolerance):
                matched += 1
                continue
            unmatched_total += 1
            if len(unmatched) < LIST_CAP:
                auth = entry.get("auth") or {}
                token = None
                if token_hash is not None:
                    token = "your token" if req.get("client_token") == token_hash else "another token"
                unmatched.append({
                    "time": entry.get("time"), "path": logical, "api_path": req["path"], "version": version,
                    "remote_address": req.get("remote_address"), "display_name": auth.get("display_name"),
                    "policies": auth.get("policies"), "token": token,
                })
    broker_unmatched = 0
    for path, lst in by_path.items():
        for i, (t, _) in enumerate(lst):
            if i not in used.get(path, set()) and first_t is not None and last_t is not None \
                    and first_t <= t <= last_t + tolerance and lo <= t <= hi:
                broker_unmatched += 1
    for rid, (_path, t) in by_id.items():
        if rid not in ids_used and first_t is not None and last_t is not None \
                and first_t <= t <= last_t + tolerance and lo <= t <= hi:
            broker_unmatched += 1
    return {
        "file": str(vault_file),
        "watched_paths": sorted(watched),
        "vault_reads": reads,
        "matched": matched,
        "denied_reads": denied,
        "unmatched_total": unmatched_total,
        "unmatched": unmatched,
        "broker_reads_without_vault_entry": broker_unmatched,
        "tolerance_s": tolerance,
        "token_check": token_hash is not None,
        "note": None if token_hash is not None else
        "no Vault token available to hash with sys/audit-hash: reads are not attributed to a token",
    }


def _claim(candidates: list[tuple[float, int | None]], times: list[float], used: set[int], t: float,
           version: int | None, tolerance: float) -> bool:
    """Mark the nearest unused broker read within tolerance (same version if both known) as used."""
    i = bisect.bisect_left(times, t - tolerance)
    best: int | None = None
    while i < len(candidates) and candidates[i][0] <= t + tolerance:
        bt, bv = candidates[i]
        if i not in used and (version is None or bv is None or bv == version):
            if best is None or abs(bt - t) < abs(candidates[best][0] - t):
                best = i
        i += 1
    if best is None:
        return False
    used.add(best)
    return True
