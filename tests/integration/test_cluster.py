"""credbroker against a real 3-node OpenBao raft cluster: the active node killed under it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.cluster import Cluster, Node, start_cluster
from tests.conftest import credbroker_bin

pytestmark = pytest.mark.vault

PROBE = [sys.executable, "-c", "import os; print(os.environ['BINANCE_API_SECRET'])"]
RUN = ["run", "--vault-path", "secret/credbroker/raft-bot", "-e", "BINANCE_API_SECRET=api_secret", "--", *PROBE]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("raft"))
    try:
        c.kv_put("credbroker/raft-bot", api_key="AK", api_secret="raft-secret")
        # Standbys answer reads from their own copy: wait until each has the secret, or a standby asked right
        # after the leader is killed can answer 404 for it (a limit the README names).
        for node in c.nodes:
            deadline = time.monotonic() + 60
            while c.api(node, "GET", "secret/data/credbroker/raft-bot")[0] != 200:
                assert time.monotonic() < deadline, f"{node.name} never served the secret"
                time.sleep(0.05)
        yield c
    finally:
        c.stop()


@pytest.fixture
def whole(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster with all three nodes up (a test before may have killed one)."""
    dead = [node for node in cluster.nodes if not node.alive()]
    if dead:
        cluster.restart(*dead)
    yield cluster


#: The per-request deadline these runs get. It bounds one request, failover and the wait for an election
#: included; on a loaded 2-core CI machine an election took over 20 s (a KV write right after the kill ran
#: out of a 20 s deadline waiting for the new active node), so the tests give it room: what they check is
#: that the request reaches the next leader, not how fast the cluster elects one.
DEADLINE = 60


def _env(cluster: Cluster, addr: str, tmp: Path, others: list[Node] | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(VAULT_ADDR=addr, VAULT_TOKEN=cluster.root_token, CREDBROKER_AUDIT_LOG=str(tmp / "audit.log"),
               CREDBROKER_VAULT_TIMEOUT=str(DEADLINE), **extra)
    if others is not None:
        env["CREDBROKER_VAULT_ADDRS"] = " ".join(n.addr for n in others)
    return env


def test_a_bot_starts_through_any_node_and_after_the_leader_dies(whole: Cluster, tmp_path: Path,
                                                                 run_broker: Any) -> None:
    for node in whole.nodes:  # the active node and the standbys (which forward reads)
        res = run_broker(RUN, env=_env(whole, node.addr, tmp_path))
        assert res.returncode == 0 and res.stdout.strip() == "raft-secret", (node.name, res.stderr)
    old = whole.leader()
    old.kill()
    assert whole.leader() is not old
    for node in (n for n in whole.nodes if n.alive()):
        res = run_broker(RUN, env=_env(whole, node.addr, tmp_path), timeout=120)
        assert res.returncode == 0 and res.stdout.strip() == "raft-secret", (node.name, res.stderr)
    dead = run_broker(RUN, env=_env(whole, old.addr, tmp_path))
    assert dead.returncode == 125 and "cannot reach Vault" in dead.stderr and "raft-secret" not in dead.stdout


def test_vault_addr_at_the_killed_leader_fails_over_to_the_configured_nodes(whole: Cluster, tmp_path: Path,
                                                                           run_broker: Any) -> None:
    """VAULT_ADDR names the active node, [vault] addrs the others: killed during the bot's start (before the
    election is over), another node serves the fetch within the deadline."""
    leader = whole.leader()
    others = [n for n in whole.nodes if n is not leader]
    env = _env(whole, leader.addr, tmp_path, others)
    leader.kill()  # no wait for the election: the start races it
    res = run_broker(RUN, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "raft-secret", res.stderr
    # Token calls (a lookup is a read, a renewal a write) and a KV write go through the new leader too.
    lib = subprocess.run([sys.executable, "-c", "\n".join([
        "from broker.vault.settings import VaultSettings",
        "from broker.vault.token import open_client",
        "import os",
        "c = open_client(VaultSettings.from_env(os.environ))",
        "c.auth.token.lookup_self()",
        "c.secrets.kv.v2.create_or_update_secret(path='credbroker/raft-write', secret={'a': 'b'}, mount_point='secret')",
        "print('ok')"])], env={**env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent.parent)},
        capture_output=True, text=True, timeout=120)
    assert lib.returncode == 0 and lib.stdout.strip() == "ok", lib.stderr


def test_no_node_answering_fails_closed_at_once(whole: Cluster, tmp_path: Path, run_broker: Any) -> None:
    leader = whole.leader()
    others = [n for n in whole.nodes if n is not leader]
    env = _env(whole, leader.addr, tmp_path, others)
    for node in whole.nodes:
        node.kill()
    started = time.monotonic()
    res = run_broker(RUN, env=env, timeout=120)
    assert res.returncode == 125 and res.stderr.count("\n") == 1 and "cannot reach Vault" in res.stderr
    assert "raft-secret" not in res.stdout
    # Refused connections everywhere: no wait for the deadline (a generous bound, not a timing).
    assert time.monotonic() - started < DEADLINE


def test_a_bot_following_rotation_survives_the_election_and_restarts_once(whole: Cluster, tmp_path: Path) -> None:
    leader = whole.leader()
    others = [n for n in whole.nodes if n is not leader]
    env = _env(whole, leader.addr, tmp_path, others, CREDBROKER_DAEMON="0")
    marker = tmp_path / "starts"
    bot = subprocess.Popen([credbroker_bin(), "run", "--vault-path", "secret/credbroker/raft-bot", "-e",
                            "S=api_secret", "--on-rotate", "restart", "--rotate-interval", "1s", "--grace", "2s",
                            "--", "sh", "-c", f'echo "$S" >> {marker}; exec sleep 300'],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: marker.exists(), bot)
        leader.kill()
        new_leader = whole.leader()
        # The bot kept running through the election (rotation checks failed meanwhile, then resume).
        assert bot.poll() is None
        status, body = whole.api(new_leader, "POST", "secret/data/credbroker/raft-bot",
                                 {"data": {"api_key": "AK", "api_secret": "raft-secret-2"}})
        assert status == 200, body
        _wait(lambda: "raft-secret-2" in marker.read_text(), bot)
        # Picked up once: one restart for the one new version, no storm.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert bot.poll() is None
            time.sleep(0.2)
        assert marker.read_text().splitlines() == ["raft-secret", "raft-secret-2"]
    finally:
        bot.terminate()
        bot.wait(timeout=60)
        whole.kv_put("credbroker/raft-bot", api_key="AK", api_secret="raft-secret")
        for node in (n for n in whole.nodes if n.alive()):  # every standby holds it again (see the fixture)
            deadline = time.monotonic() + 60
            while (whole.api(node, "GET", "secret/data/credbroker/raft-bot")[1].get("data", {})
                   .get("data", {}).get("api_secret") != "raft-secret"):
                assert time.monotonic() < deadline, f"{node.name} never caught up"
                time.sleep(0.05)


def _wait(check: Any, proc: subprocess.Popen[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"waited {timeout} s"
        time.sleep(0.05)


# -- the active node killed while a running bot renews its token, logs in again, or signs --------------
READ_POLICY = """
path "secret/data/credbroker/raft-bot" { capabilities = ["read"] }
path "secret/metadata/credbroker/raft-bot" { capabilities = ["read"] }
"""


def _records(log: Path, event: str) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event:
            out.append(rec)
    return out


def _read_policy(cluster: Cluster) -> None:
    status, body = cluster.api(cluster.leader(), "PUT", "sys/policies/acl/raft-bot-read", {"policy": READ_POLICY})
    assert status in (200, 204), body


def _following_bot(env: dict[str, str], marker: Path, interval: int = 10) -> subprocess.Popen[str]:
    """A bot that restarts on rotation and checks every ``interval`` seconds; the watcher renews (or logs in
    again) when less than two intervals of the token are left, so a token of at most three intervals is
    renewed or replaced at every check, i.e. while the cluster elects a new leader in these tests."""
    return subprocess.Popen([credbroker_bin(), "run", "--vault-path", "secret/credbroker/raft-bot", "-e",
                             "S=api_secret", "--on-rotate", "restart", "--rotate-interval", f"{interval}s",
                             "--grace", "2s",
                             "--", "sh", "-c", f'echo "$S" >> {marker}; exec sleep 300'],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _rotate_and_restore(cluster: Cluster, bot: subprocess.Popen[str], marker: Path, log: Path,
                        each_check: str) -> None:
    """Rotate the secret: the bot (on its renewed or new token) restarts once with it; then put it back.

    ``each_check``: the audit event the bot's token makes at every rotation check in these tests (its token,
    of at most three check intervals, is renewed, or replaced, at each one): two more of them after the
    restart are two more checks that found nothing new to act on."""
    try:
        status, body = cluster.api(cluster.leader(), "POST", "secret/data/credbroker/raft-bot",
                                   {"data": {"api_key": "AK", "api_secret": "raft-secret-2"}})
        assert status == 200, body
        _wait(lambda: "raft-secret-2" in marker.read_text(), bot)
        checks = len(_records(log, each_check))
        _wait(lambda: len(_records(log, each_check)) >= checks + 2, bot)
        assert bot.poll() is None
        assert marker.read_text().splitlines() == ["raft-secret", "raft-secret-2"]
        assert len(_records(log, "rotation_detected")) == 1
    finally:
        bot.terminate()
        bot.wait(timeout=60)
        cluster.kv_put("credbroker/raft-bot", api_key="AK", api_secret="raft-secret")
        for node in (n for n in cluster.nodes if n.alive()):
            deadline = time.monotonic() + 60
            while (cluster.api(node, "GET", "secret/data/credbroker/raft-bot")[1].get("data", {})
                   .get("data", {}).get("api_secret") != "raft-secret"):
                assert time.monotonic() < deadline, f"{node.name} never caught up"
                time.sleep(0.05)


def test_token_renewal_during_the_election_keeps_the_bot_following(whole: Cluster, tmp_path: Path) -> None:
    """The bot's token (60 s, renewable, renewed at every 20 s check) is due for renewal while the active node
    is dead: the renewal goes through the new leader, the token outlives its first expiry, the bot keeps
    running and follows rotation.

    The token must outlive the election: a renewal is a write, which only the new active node serves. An
    election here took 8-22 s on an idle machine and longer in CI, where a 25 s token (15-25 s left at the
    kill) expired first. At the kill this one has 40-60 s left."""
    _read_policy(whole)
    status, body = whole.api(whole.leader(), "POST", "auth/token/create",
                             {"policies": ["raft-bot-read"], "ttl": "60s", "renewable": True, "no_parent": True})
    assert status == 200, body
    token = body["auth"]["client_token"]
    first_expiry = whole.api(whole.leader(), "GET", "auth/token/lookup-self", token=token)[1]["data"]["expire_time"]
    leader = whole.leader()
    others = [n for n in whole.nodes if n is not leader]
    env = _env(whole, leader.addr, tmp_path, others, CREDBROKER_DAEMON="0")
    env["VAULT_TOKEN"] = token
    marker, log = tmp_path / "starts", tmp_path / "audit.log"
    bot = _following_bot(env, marker, interval=20)
    _wait(lambda: marker.exists(), bot)
    renewed = len(_records(log, "token_renewed"))
    leader.kill()
    new_leader = whole.leader()
    _wait(lambda: len(_records(log, "token_renewed")) > renewed, bot)
    assert bot.poll() is None
    status, body = whole.api(new_leader, "GET", "auth/token/lookup-self", token=token)
    assert status == 200 and body["data"]["expire_time"] > first_expiry, body
    _rotate_and_restore(whole, bot, marker, log, "token_renewed")


def test_approle_relogin_during_the_election_succeeds_on_the_next_leader(whole: Cluster, tmp_path: Path) -> None:
    """AppRole tokens of 25 s that cannot be renewed past that: the bot logs in again while the active node is
    dead; the new login is served by the next leader and the bot keeps following rotation with it."""
    _read_policy(whole)
    lead = whole.leader()
    status, body = whole.api(lead, "POST", "sys/auth/approle", {"type": "approle"})
    assert status in (200, 204) or "already in use" in json.dumps(body), body
    status, body = whole.api(lead, "POST", "auth/approle/role/raft-bot",
                             {"token_policies": ["raft-bot-read"], "token_ttl": "25s", "token_max_ttl": "25s"})
    assert status in (200, 204), body
    role_id = whole.api(lead, "GET", "auth/approle/role/raft-bot/role-id")[1]["data"]["role_id"]
    secret_id = whole.api(lead, "POST", "auth/approle/role/raft-bot/secret-id", {})[1]["data"]["secret_id"]
    others = [n for n in whole.nodes if n is not lead]
    env = _env(whole, lead.addr, tmp_path, others, CREDBROKER_DAEMON="0", VAULT_ROLE_ID=role_id,
               VAULT_SECRET_ID=secret_id)
    del env["VAULT_TOKEN"]
    marker, log = tmp_path / "starts", tmp_path / "audit.log"
    bot = _following_bot(env, marker)
    _wait(lambda: marker.exists(), bot)
    relogins = len(_records(log, "token_relogin"))
    lead.kill()
    whole.leader()
    _wait(lambda: len(_records(log, "token_relogin")) > relogins, bot)
    assert bot.poll() is None
    assert not _records(log, "token_failed") or all(
        r["ts"] < _records(log, "token_relogin")[-1]["ts"] for r in _records(log, "token_failed"))
    _rotate_and_restore(whole, bot, marker, log, "token_relogin")


def test_a_transit_signer_keeps_signing_through_the_election(whole: Cluster, tmp_path: Path) -> None:
    """get_signer() backed by transit: the active node dies between two signatures; the next one is made by
    the new leader within the request deadline, with the same key (it verifies with the same public key)."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from broker import get_signer

    lead = whole.leader()
    status, body = whole.api(lead, "POST", "transit/keys/credbroker-raft", {"type": "ed25519"})
    assert status in (200, 204), body
    whole.kv_put("credbroker/raft-transit", api_key="AK-transit")
    for node in whole.nodes:  # standbys read their own copy (the fixture's note)
        deadline = time.monotonic() + 60
        while whole.api(node, "GET", "secret/data/credbroker/raft-transit")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    config = tmp_path / "credbroker.toml"
    config.write_text('[profiles.raft-transit]\nsource = "vault"\npath = "secret/credbroker/raft-transit"\n'
                      'env = { BINANCE_API_KEY = "api_key" }\n\n[profiles.raft-transit.signer]\n'
                      'type = "transit"\ntransit_key = "credbroker-raft"\n')
    others = [n for n in whole.nodes if n is not lead]
    env = _env(whole, lead.addr, tmp_path, others)  # each request: a DEADLINE s total deadline
    signer = get_signer(profile="raft-transit", config=config, env=env)
    pem = signer.public_key_pem()
    key = load_pem_public_key(pem.encode())
    assert isinstance(key, Ed25519PublicKey)

    def check(payload: str) -> None:
        key.verify(base64.b64decode(signer.sign(payload)), payload.encode())

    check("symbol=BTCUSDT&side=BUY&timestamp=1")
    lead.kill()  # no wait for the election: the next signature races it
    check("symbol=BTCUSDT&side=BUY&timestamp=2")
    assert whole.leader() is not lead
    check("symbol=BTCUSDT&side=BUY&timestamp=3")
    assert getattr(signer, "key_version") == 1
