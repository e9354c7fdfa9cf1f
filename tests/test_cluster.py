"""credbroker against a real 3-node OpenBao raft cluster: the active node killed under it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .cluster import Cluster, start_cluster

pytestmark = pytest.mark.vault


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("raft"))
    try:
        yield c
    finally:
        c.stop()


def _env(cluster: Cluster, addr: str, tmp: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(VAULT_ADDR=addr, VAULT_TOKEN=cluster.root_token, CREDBROKER_AUDIT_LOG=str(tmp / "audit.log"))
    return env


def test_a_bot_starts_through_any_node_and_after_the_leader_dies(cluster: Cluster, tmp_path: Path,
                                                                 run_broker: Any) -> None:
    cluster.kv_put("credbroker/raft-bot", api_key="AK", api_secret="raft-secret")
    probe = [sys.executable, "-c", "import os; print(os.environ['BINANCE_API_SECRET'])"]
    args = ["run", "--vault-path", "secret/credbroker/raft-bot", "-e", "BINANCE_API_SECRET=api_secret", "--", *probe]
    for node in cluster.nodes:  # the active node and the standbys (which forward reads)
        res = run_broker(args, env=_env(cluster, node.addr, tmp_path))
        assert res.returncode == 0 and res.stdout.strip() == "raft-secret", (node.name, res.stderr)
    old = cluster.leader()
    old.kill()
    new = cluster.leader()
    assert new is not old
    for node in (n for n in cluster.nodes if n.alive()):
        res = run_broker(args, env=_env(cluster, node.addr, tmp_path), timeout=120)
        assert res.returncode == 0 and res.stdout.strip() == "raft-secret", (node.name, res.stderr)
    dead = run_broker(args, env=_env(cluster, old.addr, tmp_path))
    assert dead.returncode == 125 and "cannot reach Vault" in dead.stderr and "raft-secret" not in dead.stdout
