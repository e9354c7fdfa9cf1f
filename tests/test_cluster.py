"""credbroker against a real 3-node OpenBao raft cluster: the active node killed under it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .cluster import Cluster, Node, start_cluster
from .conftest import credbroker_bin

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


def _env(cluster: Cluster, addr: str, tmp: Path, others: list[Node] | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(VAULT_ADDR=addr, VAULT_TOKEN=cluster.root_token, CREDBROKER_AUDIT_LOG=str(tmp / "audit.log"),
               CREDBROKER_VAULT_TIMEOUT="20", **extra)
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
        "from broker.vault.session import open_client",
        "import os",
        "c = open_client(VaultSettings.from_env(os.environ))",
        "c.auth.token.lookup_self()",
        "c.secrets.kv.v2.create_or_update_secret(path='credbroker/raft-write', secret={'a': 'b'}, mount_point='secret')",
        "print('ok')"])], env={**env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
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
    # Refused connections everywhere: no wait for the 20 s deadline (a generous bound, not a timing).
    assert time.monotonic() - started < 20


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
