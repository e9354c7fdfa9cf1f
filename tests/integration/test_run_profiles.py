"""`credbroker run -p spot -p um-futures`: several profiles in one run, against real OpenBao.

All fetched or none; a variable two profiles set is refused before any read (Vault's own audit
device shows none); each fetch is one audit record; a rotation of one of them restarts the bot
once; `get_signer("spot")` inside the run signs with spot's key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import pytest

from broker.config import Profile, check_profiles
from broker.errors import RunError
from broker.rotation import BatchCheck, Handover
from broker.runner import combine
from broker.secret import Credentials, Origin, Secret

from tests.conftest import OpenBao, credbroker_bin, start_audited_openbao
from tests.helpers.rotation import audit_events as _audit_events
from tests.helpers.rotation import rotate, version_checks, wait_for, wait_for_more_checks

pytestmark = pytest.mark.vault

# Writes each start with the variables it got, reacts to HUP, exits 0 on TERM.
BOT = r"""
import os, signal, sys, time
log = sys.argv[1]
def line(text):
    with open(log, "a") as f:
        f.write(text + "\n")
line(f"start {os.getpid()} spot={os.environ.get('SPOT_SECRET')} um={os.environ.get('UM_SECRET')} "
     f"keys={os.environ.get('SPOT_KEY')},{os.environ.get('UM_KEY')}")
signal.signal(signal.SIGHUP, lambda s, f: line(f"hup {os.getpid()}"))
signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))
end = time.time() + 600  # a bound for a bot the test forgot, never reached by a passing test
while time.time() < end:
    time.sleep(0.05)
"""

SIGNING_BOT = r"""
import json, sys
from broker import get_signer
from broker.errors import BrokerError
out = {}
for name in ("multi-spot", "multi-um"):
    s = get_signer(name)
    out[name] = {"api_key": str(s.api_key), "sig": s.sign("symbol=BTCUSDT&timestamp=1")}
try:
    get_signer()
except BrokerError as exc:
    out["unnamed"] = exc.message
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OpenBao, Path]]:
    """A server with a file audit device: every read the broker makes is a line in its log."""
    server = start_audited_openbao(tmp_path_factory.mktemp("openbao-profiles"))
    try:
        yield server, server.extra["audit_log"]
    finally:
        server.stop()


def audit_events(log: Path) -> list[dict[str, Any]]:
    """The broker's audit records (their ``data`` typed loosely, for the assertions below)."""
    return [dict(e) for e in _audit_events(log)]


def vault_reads(vault_log: Path, name: str) -> int:
    """Reads of secret/data/credbroker/NAME (the secret itself) that the server answered."""
    if not vault_log.exists():
        return 0
    count = 0
    for raw in vault_log.read_bytes().split(b"\n")[:-1]:
        entry = json.loads(raw)
        request = entry.get("request") or {}
        if entry.get("type") == "response" and request.get("operation") == "read" and \
                request.get("path") == f"secret/data/credbroker/{name}":
            count += 1
    return count


def config(tmp: Path, spot: str, um: str, *, um_env: str = 'UM_KEY = "api_key", UM_SECRET = "api_secret"',
           extra: str = "") -> Path:
    cfg = tmp / "credbroker.toml"
    cfg.write_text(f"""
[profiles.multi-spot]
source = "vault"
path = "secret/credbroker/{spot}"
env = {{ SPOT_KEY = "api_key", SPOT_SECRET = "api_secret" }}
[profiles.multi-spot.signer]
type = "hmac"

[profiles.multi-um]
source = "vault"
path = "secret/credbroker/{um}"
env = {{ {um_env} }}
[profiles.multi-um.signer]
type = "hmac"
{extra}
""")
    return cfg


def broker_env(server: OpenBao, tmp: Path, cfg: Path) -> tuple[dict[str, str], Path]:
    audit = tmp / "audit.log"
    env = {**server.env(), "CREDBROKER_CONFIG": str(cfg), "CREDBROKER_AUDIT_LOG": str(audit),
           "HOME": str(tmp / "home")}
    return env, audit


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([credbroker_bin(), *args], env=env, capture_output=True, text=True, timeout=120)


def test_both_profiles_reach_the_bot_and_each_fetch_is_recorded(audited: tuple[OpenBao, Path],
                                                                 tmp_path: Path) -> None:
    server, vault_log = audited
    server.kv_put("credbroker/both-spot", api_key="AK-spot", api_secret="s-spot")
    server.kv_put("credbroker/both-um", api_key="AK-um", api_secret="s-um")
    env, audit = broker_env(server, tmp_path, config(tmp_path, "both-spot", "both-um"))
    out = tmp_path / "bot.log"
    (tmp_path / "bot.py").write_text(BOT.replace("end = time.time() + 600", "end = 0"))
    res = run(["run", "-p", "multi-spot", "-p", "multi-um", "--", sys.executable, str(tmp_path / "bot.py"),
               str(out)], env)
    assert res.returncode == 0, res.stderr
    assert "spot=s-spot um=s-um keys=AK-spot,AK-um" in out.read_text()
    events = audit_events(audit)
    fetched = [e["data"] for e in events if e["event"] == "secret_fetched"]
    assert sorted(d["profile"] for d in fetched) == ["multi-spot", "multi-um"]
    assert {d["path"] for d in fetched} == {"secret/credbroker/both-spot", "secret/credbroker/both-um"}
    assert {d["by"] for d in fetched} == {"run"}  # the one audited read (access.read), the schema check's fields
    injected = {e["data"]["profile"]: e["data"]["variables"] for e in events if e["event"] == "secret_injected"}
    assert injected == {"multi-spot": ["SPOT_KEY", "SPOT_SECRET"], "multi-um": ["UM_KEY", "UM_SECRET"]}
    assert vault_reads(vault_log, "both-spot") >= 1 and vault_reads(vault_log, "both-um") >= 1
    assert "s-spot" not in audit.read_text() and "s-um" not in audit.read_text()


def test_a_variable_two_profiles_set_is_refused_before_any_read(audited: tuple[OpenBao, Path],
                                                                 tmp_path: Path) -> None:
    server, vault_log = audited
    server.kv_put("credbroker/clash-spot", api_key="AK-spot", api_secret="s-spot")
    server.kv_put("credbroker/clash-um", api_key="AK-um", api_secret="s-um")
    cfg = config(tmp_path, "clash-spot", "clash-um", um_env='UM_KEY = "api_key", SPOT_SECRET = "api_secret"')
    env, audit = broker_env(server, tmp_path, cfg)
    marker = tmp_path / "started"
    res = run(["run", "-p", "multi-spot", "-p", "multi-um", "--", "touch", str(marker)], env)
    assert res.returncode == 125
    assert res.stderr.count("\n") == 1 and "both set SPOT_SECRET" in res.stderr, res.stderr
    assert not marker.exists()
    events = audit_events(audit)
    assert not [e for e in events if e["event"] == "secret_fetched"]
    assert sorted(e["data"]["profile"] for e in events if e["event"] == "refused") == ["multi-spot", "multi-um"]
    # Vault's own audit device: neither secret was read (its log is written before the answer is sent).
    assert vault_reads(vault_log, "clash-spot") == 0 and vault_reads(vault_log, "clash-um") == 0
    # `check` takes the profiles of one run the same way: refused, nothing read.
    res = run(["check", "-p", "multi-spot", "-p", "multi-um"], env)
    assert res.returncode == 125 and "both set SPOT_SECRET" in res.stderr
    assert vault_reads(vault_log, "clash-spot") == 0 and vault_reads(vault_log, "clash-um") == 0


def test_one_profile_missing_means_the_bot_never_starts(audited: tuple[OpenBao, Path], tmp_path: Path) -> None:
    server, _ = audited
    server.kv_put("credbroker/half-spot", api_key="AK-spot", api_secret="s-spot")
    env, audit = broker_env(server, tmp_path, config(tmp_path, "half-spot", "half-um-never-written"))
    marker = tmp_path / "started"
    res = run(["run", "-p", "multi-spot", "-p", "multi-um", "--", "touch", str(marker)], env)
    assert res.returncode == 125
    assert res.stderr.startswith("credbroker: profile 'multi-um'") and res.stderr.count("\n") == 1, res.stderr
    assert not marker.exists()
    events = audit_events(audit)
    assert not [e for e in events if e["event"] == "secret_injected"]
    # The read that did happen is recorded (the review must not list it as a read from outside).
    assert [e["data"]["profile"] for e in events if e["event"] == "secret_fetched"] == ["multi-spot"]
    assert [e["data"]["profile"] for e in events if e["event"] == "refused"] == ["multi-um"]


def test_rotating_one_of_two_profiles_restarts_the_bot_once(audited: tuple[OpenBao, Path], tmp_path: Path) -> None:
    server, vault_log = audited
    v1 = server.kv_put("credbroker/rot2-spot", api_key="AK-spot", api_secret="spot-v1")
    server.kv_put("credbroker/rot2-um", api_key="AK-um", api_secret="um-v1")
    env, audit = broker_env(server, tmp_path, config(tmp_path, "rot2-spot", "rot2-um"))
    (tmp_path / "bot.py").write_text(BOT)
    out = tmp_path / "bot.log"
    proc = subprocess.Popen(
        [credbroker_bin(), "run", "-p", "multi-spot", "-p", "multi-um", "--on-rotate", "restart",
         "--rotate-interval", "1s", "--grace", "3s", "--", sys.executable, str(tmp_path / "bot.py"), str(out)],
        env=env, stderr=subprocess.PIPE, text=True)
    try:
        first = wait_for(out, r"start (\d+) spot=spot-v1 um=um-v1")
        v2 = rotate(server, "rot2-spot", "spot-v2")
        second = wait_for(out, r"start (\d+) spot=spot-v2 um=um-v1")  # the other profile's key is kept
        assert first.group(1) != second.group(1)
        # Both profiles checked again several times: still one restart.
        wait_for_more_checks(vault_log, "rot2-spot", 3)
        wait_for_more_checks(vault_log, "rot2-um", 3)
        assert out.read_text().count("start ") == 2
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    events = audit_events(audit)
    detected = [e["data"] for e in events if e["event"] == "rotation_detected"]
    assert len(detected) == 1
    assert detected[0]["profile"] == "multi-spot" and detected[0]["old_version"] == v1
    assert detected[0]["new_version"] == v2
    rotations = [e["data"] for e in events if e["event"] == "child_exited" and e["data"]["reason"] == "rotation"]
    assert {d["pid"] for d in rotations} == {int(first.group(1))}
    refetched = [e["data"]["profile"] for e in events
                 if e["event"] == "secret_fetched" and e["data"].get("reason") == "rotation"]
    assert refetched == ["multi-spot"]
    assert {e["data"]["by"] for e in events if e["event"] == "secret_fetched"} == {"run", "rotation"}
    assert version_checks(vault_log, "rot2-um") > 0


def test_get_signer_names_its_profile_inside_the_run(audited: tuple[OpenBao, Path], tmp_path: Path) -> None:
    server, _ = audited
    server.kv_put("credbroker/sig-spot", api_key="AK-spot", api_secret="hmac-spot")
    server.kv_put("credbroker/sig-um", api_key="AK-um", api_secret="hmac-um")
    env, _ = broker_env(server, tmp_path, config(tmp_path, "sig-spot", "sig-um"))
    (tmp_path / "bot.py").write_text(SIGNING_BOT)
    res = run(["run", "-p", "multi-spot", "-p", "multi-um", "--", sys.executable, str(tmp_path / "bot.py")], env)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    payload = b"symbol=BTCUSDT&timestamp=1"
    assert got["multi-spot"] == {"api_key": "AK-spot",
                                 "sig": hmac.new(b"hmac-spot", payload, hashlib.sha256).hexdigest()}
    assert got["multi-um"] == {"api_key": "AK-um", "sig": hmac.new(b"hmac-um", payload, hashlib.sha256).hexdigest()}
    assert "several profiles" in got["unnamed"] and "multi-spot" in got["unnamed"]


AGENT_BOT = r"""
import json, os
from broker import get_signer
out = {"env": sorted(k for k in os.environ if k.startswith(("SPOT_", "UM_")))}
for name in ("multi-spot", "multi-um"):
    s = get_signer(name)
    out[name] = {"api_key": str(s.api_key), "kind": s.remote_kind,
                 "query": s.sign_params({"symbol": "BTCUSDT"}, endpoint="/fapi/v1/openOrders")}
print(json.dumps(out))
"""


def test_agent_serves_every_profile_and_the_bot_names_one(audited: tuple[OpenBao, Path], tmp_path: Path) -> None:
    server, _ = audited
    server.kv_put("credbroker/agent-spot", api_key="AK-spot", api_secret="agent-spot-secret")
    server.kv_put("credbroker/agent-um", api_key="AK-um", api_secret="agent-um-secret")
    env, audit = broker_env(server, tmp_path, config(tmp_path, "agent-spot", "agent-um"))
    (tmp_path / "bot.py").write_text(AGENT_BOT)
    res = run(["run", "--agent", "--no-preflight", "-p", "multi-spot", "-p", "multi-um", "--",
               sys.executable, str(tmp_path / "bot.py")], env)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["env"] == ["SPOT_KEY", "UM_KEY"]  # the API keys only: both secrets stay in the broker
    for name, secret in (("multi-spot", b"agent-spot-secret"), ("multi-um", b"agent-um-secret")):
        payload, _, signature = got[name]["query"].rpartition("&signature=")
        assert got[name]["kind"] == "hmac" and "symbol=BTCUSDT" in payload
        assert signature == hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()
    assert got["multi-spot"]["api_key"] == "AK-spot" and got["multi-um"]["api_key"] == "AK-um"
    events = audit_events(audit)
    started = sorted(e["data"]["profile"] for e in events if e["event"] == "agent_started")
    assert started == ["multi-spot", "multi-um"]
    assert "agent-spot-secret" not in audit.read_text()


def test_proxy_takes_one_profile(audited: tuple[OpenBao, Path], tmp_path: Path) -> None:
    server, vault_log = audited
    env, _ = broker_env(server, tmp_path, config(tmp_path, "one-spot", "one-um"))
    res = run(["run", "-p", "multi-spot", "-p", "multi-um", "--proxy", "--", "true"], env)
    assert res.returncode == 125
    assert res.stderr.count("\n") == 1 and "--proxy serves one profile per run" in res.stderr
    assert "credbroker run --proxy -p PROFILE" in res.stderr and "--agent" in res.stderr
    assert vault_reads(vault_log, "one-spot") == 0


def test_check_takes_several_profiles(audited: tuple[OpenBao, Path], tmp_path: Path) -> None:
    server, _ = audited
    server.kv_put("credbroker/chk-spot", api_key="AK-spot", api_secret="c-spot")
    env, audit = broker_env(server, tmp_path, config(tmp_path, "chk-spot", "chk-um-missing"))
    res = run(["check", "-p", "multi-spot", "-p", "multi-um", "--json"], env)
    assert res.returncode == 125
    results = json.loads(res.stdout)
    assert [(r["profile"], r["ok"]) for r in results] == [("multi-spot", True), ("multi-um", False)]
    assert [e["data"]["by"] for e in audit_events(audit) if e["event"] == "secret_fetched"] == ["check"]


# -- pure logic ---------------------------------------------------------------------------------------------


def _profile(name: str, **env: str) -> Profile:
    return Profile(name=name, source="vault", env=env, options={"path": f"secret/{name}"})


def test_collisions_and_repeats_are_refused() -> None:
    check_profiles([_profile("a", A="k"), _profile("b", B="k")])
    with pytest.raises(RunError, match="both set A"):
        check_profiles([_profile("a", A="k"), _profile("b", A="k")])
    with pytest.raises(RunError, match="named twice"):
        check_profiles([_profile("a", A="k"), _profile("a", B="k")])


def test_the_combined_view_shares_the_secrets() -> None:
    spot = Credentials("a", Origin("vault", "secret/a", 1), {"k": Secret("one")})
    um = Credentials("b", Origin("vault", "secret/b", 1), {"k": Secret("two")})
    view, creds = combine([_profile("a", A="k"), _profile("b", B="k")], [spot, um])
    assert {var: creds[f].reveal() for var, f in view.env.items()} == {"A": b"one", "B": b"two"}
    creds.wipe()  # wiping the view wipes the held secrets: no copy was made
    assert spot["k"].wiped and um["k"].wiped


def test_one_check_pass_hands_over_every_rotation_it_found_at_once() -> None:
    found = {0: Handover("restart", 1, 2), 1: None, 2: Handover("signal", 4, 5)}
    def returns(handover: Handover | None) -> Callable[[], Handover | None]:
        return lambda: handover

    batch = BatchCheck([(i, returns(h)) for i, h in found.items()])()
    assert batch == [(0, found[0]), (2, found[2])]
    assert BatchCheck([(0, lambda: None)])() is None


def test_the_early_fetch_child_reads_nothing_for_a_run_that_cannot_start(audited: tuple[OpenBao, Path],
                                                                         tmp_path: Path) -> None:
    """The fetch child is forked before the run's checks (it loads hvac meanwhile); it reads Vault only
    once they passed: a command that does not exist means no read, and a good run reads once."""
    server, vault_log = audited
    server.kv_put("credbroker/early-spot", api_key="AK-spot", api_secret="s-spot")
    server.kv_put("credbroker/early-um", api_key="AK-um", api_secret="s-um")
    env, _ = broker_env(server, tmp_path, config(tmp_path, "early-spot", "early-um"))
    res = run(["run", "-p", "multi-spot", "--", "no-such-command-here"], env)
    assert res.returncode == 127
    assert vault_reads(vault_log, "early-spot") == 0
    res = run(["run", "-v", "-p", "multi-spot", "--", "true"], env)
    assert res.returncode == 0, res.stderr
    assert "(fetched in a throwaway child)" in res.stderr
    assert vault_reads(vault_log, "early-spot") == 1
