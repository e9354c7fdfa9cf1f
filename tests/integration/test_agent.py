"""`credbroker run --agent`: the bot signs through the broker and never holds the secret (issue 6).

End to end against a real OpenBao (the secret's source) and the Binance-style
verifier of tests/helpers/signing_verifier.py: the bot's requests are accepted, its
/proc/PID/environ and a dump of its memory hold no byte of the secret, a
process outside the bot's tree is refused, every signature is an audit
record, and each policy rule refuses with a clear error in the bot.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from broker.agent.peer import in_tree, parent_pid
from broker.agent.server import Agent, RecorderSink
from broker.unixsock import frame, recv_message
from broker.errors import BrokerError, SigningError
from broker.secret import Secret
from broker.signing.agent import AgentSigner
from broker.signing.hmac_sha256 import HmacSigner
from broker.signing_policy import PolicyRefused, SigningPolicy
from tests.conftest import REPO, OpenBao, credbroker_bin
from tests.helpers.auditlog import audit_records
from tests.helpers.signing_verifier import BinanceVerifier
from tests.helpers.fakelog import FakeLog

BOT = Path(__file__).resolve().parent.parent / "helpers" / "agent_bot.py"


@pytest.fixture
def verifier() -> Any:
    v = BinanceVerifier().start()
    try:
        yield v
    finally:
        v.stop()


def setup_profile(server: OpenBao, tmp: Path, policy: str = "") -> tuple[str, str]:
    api_key = "K" + secrets.token_hex(31)
    secret = "S" + secrets.token_hex(31)
    kv = f"credbroker/binance/agent-{secrets.token_hex(3)}"
    server.kv_put(kv, api_key=api_key, api_secret=secret)
    (tmp / "credbroker.toml").write_text(f"""
[profiles.bot]
source = "vault"
path = "secret/{kv}"
env = {{ BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }}
{policy}
""")
    return api_key, secret


def broker_env(server: OpenBao, **extra: str) -> dict[str, str]:
    env = server.env()
    env.update(extra)
    return env


def memory_holds(pid: int, needle: bytes) -> tuple[bool, int]:
    """Search every readable mapping of ``pid`` for ``needle``; (found, bytes read)."""
    found, total = False, 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]", "[vvar_vclock]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
            total += len(chunk)
            if needle in chunk:
                found = True
    return found, total


def test_bot_signs_through_the_agent_and_holds_no_secret(
        openbao: OpenBao, tmp_path: Path, verifier: BinanceVerifier) -> None:
    api_key, secret = setup_profile(openbao, tmp_path)
    verifier.add_hmac(api_key, secret)
    state = tmp_path / "state-bot"
    state.mkdir()
    # A stale copy of the secret in the broker's own environment must not reach the bot either.
    env = broker_env(openbao, BINANCE_API_SECRET="stale-" + secrets.token_hex(8))
    proc = subprocess.Popen([credbroker_bin(), "run", "--agent", "--no-preflight", "--profile", "bot", "--",
                             sys.executable, str(BOT), verifier.url, str(state), "sign"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (state / "pid").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the bot never got ready"
            time.sleep(0.05)
        pid = int((state / "pid").read_text())
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        variables = dict(v.split(b"=", 1) for v in environ.split(b"\0") if b"=" in v)
        # The bot has the API key and the socket, never the secret (nor the stale copy).
        assert variables[b"BINANCE_API_KEY"] == api_key.encode()
        assert b"BINANCE_API_SECRET" not in variables
        assert secret.encode() not in environ
        assert b"VAULT_TOKEN" not in variables
        sock_path = Path(variables[b"CREDBROKER_AGENT_SOCKET"].decode())
        assert (sock_path.parent.stat().st_mode & 0o777) == 0o700
        assert (sock_path.stat().st_mode & 0o777) == 0o600
        found, read = memory_holds(pid, secret.encode())
        assert read > 1_000_000  # the dump really covered the interpreter's memory
        assert not found, "the secret is in the bot's memory"
        # The same search finds the API key, which the bot does hold: the dump is real.
        assert memory_holds(pid, api_key.encode())[0]

        # A process outside the bot's tree (a child of this test) is refused, with one clear line.
        outsider = subprocess.run(
            [sys.executable, "-c", "import sys\nfrom broker.signing.agent import AgentSigner\n"
             "try:\n    AgentSigner(None, sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)\n",
             str(sock_path)], capture_output=True, text=True, env=broker_env(openbao), timeout=60)
        assert outsider.stdout.startswith("AgentRefused the credbroker signing agent refused this process"), \
            outsider.stdout + outsider.stderr
        assert "is not the bot" in outsider.stdout
        (state / "go").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        (state / "go").touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    assert "remote=hmac" in out
    assert "bot-child: GET /fapi/v2/account -> 200" in out
    assert [s.status for s in verifier.seen] == [200, 200, 200, 200]
    assert secret not in out + err
    # The agent is gone with the broker, and its folder removed.
    assert not sock_path.exists() and not sock_path.parent.exists()

    records = audit_records()
    signed = [r["data"] for r in records if r["event"] == "signed"]
    assert len(signed) == 4
    assert {s["endpoint"] for s in signed} == {"/fapi/v2/balance", "/fapi/v1/order", "/fapi/v1/openOrders",
                                               "/fapi/v2/account"}
    order = next(s for s in signed if s["endpoint"] == "/fapi/v1/order")
    assert order["method"] == "POST" and order["symbol"] == "BTCUSDT" and order["quantity"] == "0.001"
    assert pid in {s["pid"] for s in signed} and len({s["pid"] for s in signed}) == 2  # the bot and its child
    refused = [r["data"] for r in records if r["event"] == "agent_refused"]
    assert len(refused) == 1 and "is not the bot" in refused[0]["reason"]
    assert refused[0]["count"] == 1 and refused[0]["uid"] == os.getuid()  # aggregated, written at the agent's stop
    injected = next(r["data"] for r in records if r["event"] == "secret_injected")
    assert injected["variables"] == ["BINANCE_API_KEY"]
    assert any(r["event"] == "agent_started" for r in records)
    stopped = next(r["data"] for r in records if r["event"] == "agent_stopped")
    assert stopped["signed"] == 4 and stopped["refused"] == 1
    text = "".join(json.dumps(r) for r in records)
    for needle in (secret, "signature=", "timestamp="):
        assert needle not in text


POLICY = """
[profiles.bot.policy]
rate_limit = "1/m"
burst = 3
symbols = ["BTCUSDT", "ETHUSDT"]
max_quantity = { BTCUSDT = 0.5, ETHUSDT = 10 }
max_notional = 2000
max_recv_window = 5000
deny_params = ["newClientOrderId"]
"""


def test_each_policy_rule_refuses_in_the_bot_and_in_the_audit_log(
        openbao: OpenBao, tmp_path: Path, verifier: BinanceVerifier, run_broker: Any) -> None:
    api_key, secret = setup_profile(openbao, tmp_path, POLICY)
    verifier.add_hmac(api_key, secret)
    res = run_broker(["run", "--agent", "--no-preflight", "--profile", "bot", "--",
                      sys.executable, str(BOT), verifier.url, str(tmp_path), "policy"], env=broker_env(openbao))
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    verdicts = [line.split(" | ")[0] for line in lines]
    assert verdicts == [
        "signed allowed",
        "refused symbols",
        "refused max_quantity",
        "refused max_notional",
        "refused max_recv_window",
        "refused deny_kinds:withdraw",
        "refused deny_params",
        "signed rate", "signed rate", "refused rate_limit", "refused rate_limit", "refused rate_limit",
        "refused deny_kinds:withdraw",
    ], res.stdout
    # Each refusal is one clear line the bot can print.
    assert "symbol 'DOGEUSDT' is not allowed (allowed: BTCUSDT, ETHUSDT)" in res.stdout
    assert "quantity 5 is above the cap 0.5 for BTCUSDT" in res.stdout
    assert "notional 3000 is above the cap 2000" in res.stdout
    assert "recvWindow 60000 is above the ceiling 5000" in res.stdout
    assert "/sapi/v1/capital/withdraw/apply is a denied endpoint" in res.stdout
    assert "more than 1 signatures per minute" in res.stdout
    assert not verifier.seen  # the refused withdrawal never left the bot

    refusals = [r["data"] for r in audit_records() if r["event"] == "policy_refused"]
    assert [r["rule"] for r in refusals] == [
        "symbols", "max_quantity", "max_notional", "max_recv_window", "deny_kinds:withdraw", "deny_params",
        "rate_limit", "rate_limit", "rate_limit", "deny_kinds:withdraw"]
    withdraw = refusals[-1]
    assert withdraw["endpoint"] == "/sapi/v1/capital/withdraw/apply" and withdraw["method"] == "POST"
    assert "address" in withdraw["params"].split(",")
    assert secret not in json.dumps(refusals)

    # The weekly report counts the refusals, by rule.
    report = run_broker(["audit", "report", "--json"], env=broker_env(openbao))
    assert report.returncode == 0, report.stderr
    counted = json.loads(report.stdout)["policy_refusals"]
    assert counted["total"] == 10
    assert {(i["rule"], i["count"]) for i in counted["by_rule"]} >= {("rate_limit", 3), ("deny_kinds:withdraw", 2),
                                                                     ("symbols", 1)}
    text = run_broker(["audit", "report"], env=broker_env(openbao))
    assert "SIGNING POLICY REFUSALS: 10" in text.stdout


def test_agent_refuses_a_transit_profile_and_mask(openbao: OpenBao, tmp_path: Path, run_broker: Any) -> None:
    setup_profile(openbao, tmp_path, '[profiles.bot.signer]\ntype = "transit"\ntransit_key = "k"\n')
    res = run_broker(["run", "--agent", "--profile", "bot", "--", "true"], env=broker_env(openbao))
    assert res.returncode == 125
    assert "--agent does not apply to a transit signer" in res.stderr and "Traceback" not in res.stderr
    res = run_broker(["run", "--agent", "--mask", "--profile", "bot", "--", "true"], env=broker_env(openbao))
    assert res.returncode == 125 and "--agent and --mask exclude each other" in res.stderr


def test_bad_policy_table_is_one_line_naming_file_and_key(openbao: OpenBao, tmp_path: Path, run_broker: Any) -> None:
    setup_profile(openbao, tmp_path, '[profiles.bot.policy]\nrate_limit = "fast"\n')
    res = run_broker(["run", "--agent", "--no-preflight", "--profile", "bot", "--", "true"], env=broker_env(openbao))
    assert res.returncode == 125
    assert res.stderr.count("\n") == 1, res.stderr
    assert "credbroker.toml: profiles.bot.policy.rate_limit" in res.stderr


# -- the agent in-process: peer checks, group commit, fail closed -----------------------------------


def make_agent(log: Any, policy: SigningPolicy | None = None) -> tuple[Agent, HmacSigner]:
    ref = HmacSigner("KEY-" + "k" * 20, Secret(b"s3cret-s3cret"))
    agent = Agent(HmacSigner("KEY-" + "k" * 20, Secret(b"s3cret-s3cret")), profile="p",
                  policy=policy or SigningPolicy.from_mapping(None, "x"), audit=log)
    agent.start()
    agent.set_child(os.getpid())
    return agent, ref


def test_agent_signature_matches_local_signing_and_is_recorded_before_the_answer() -> None:
    log = FakeLog()
    agent, ref = make_agent(log)
    try:
        assert agent.path is not None
        assert AgentSigner(None, agent.path).api_key == ref.api_key  # from the agent's hello
        signer = AgentSigner(ref.api_key, agent.path, profile="p")
        q = signer.sign_params({"symbol": "BTCUSDT", "side": "SELL"}, timestamp=1700000000000)
        assert q == ref.sign_params({"symbol": "BTCUSDT", "side": "SELL"}, timestamp=1700000000000)
        # The record was committed (flushed) before the answer came back.
        assert [e for e, _ in log.committed] == ["signed"] and not log.pending
        assert log.committed[0][1]["pid"] == os.getpid()
        signer.close()
    finally:
        agent.stop()


def test_group_commit_shares_one_flush_between_concurrent_requests() -> None:
    import threading

    log = FakeLog()
    agent, ref = make_agent(log)
    try:
        assert agent.path is not None
        signer = AgentSigner(ref.api_key, agent.path, profile="p")
        barrier = threading.Barrier(8)

        def work() -> None:
            barrier.wait()
            for _ in range(50):
                signer.sign("symbol=BTCUSDT&timestamp=1")

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(log.committed) == 400
        assert log.flushes <= 400  # never more than one flush per record; usually far fewer
    finally:
        agent.stop()


def test_unwritable_audit_log_means_no_signature() -> None:
    log = FakeLog()
    agent, ref = make_agent(log)
    try:
        assert agent.path is not None
        signer = AgentSigner(ref.api_key, agent.path, profile="p")
        log.fail = True
        with pytest.raises(BrokerError, match="cannot write the audit log"):
            signer.sign("symbol=BTCUSDT&timestamp=1")
        log.fail = False
        assert signer.sign("symbol=BTCUSDT&timestamp=1") == ref.sign("symbol=BTCUSDT&timestamp=1")
    finally:
        agent.stop()


def test_process_outside_the_tree_and_other_uid_are_refused(tmp_path: Path) -> None:
    log = FakeLog()
    agent, ref = make_agent(log)
    try:
        assert agent.path is not None
        # A process started by us IS in our tree ...
        inside = subprocess.run([sys.executable, "-c", "import sys\nfrom broker.signing.agent import AgentSigner\n"
                                 "print(AgentSigner(None, sys.argv[1]).sign('a=1'))", str(agent.path)],
                                capture_output=True, text=True, cwd=REPO, timeout=60)
        assert inside.stdout.strip() == ref.sign("a=1"), inside.stderr
        # ... but not once the agent serves another child.
        agent.set_child(parent_pid(os.getpid()) or 1)
        agent.set_child(999_999_999)
        outside = subprocess.run([sys.executable, "-c", "import sys\nfrom broker.signing.agent import AgentSigner\n"
                                  "AgentSigner(None, sys.argv[1])", str(agent.path)],
                                 capture_output=True, text=True, cwd=REPO, timeout=60)
        assert outside.returncode == 1 and "AgentRefused: the credbroker signing agent refused" in outside.stderr
    finally:
        agent.stop()
    assert not agent.path.exists() and not agent.path.parent.exists()
    # Counted, and recorded when the agent stopped (the end of its window).
    refused = [f for e, f in log.committed if e == "agent_refused"]
    assert len(refused) == 1 and refused[0]["pid"] > 0 and refused[0]["count"] == 1
    assert refused[0]["uid"] == os.getuid() and "is not the bot" in refused[0]["reason"]


def test_in_tree_walks_parents() -> None:
    from broker.agent.peer import start_time, tree_walk

    me = os.getpid()
    assert in_tree(me, me)
    parent = parent_pid(me)
    assert parent is not None and in_tree(me, parent)
    assert not in_tree(parent, me)
    assert not in_tree(me, 999_999_999)
    # Reaching init is a lasting verdict; a chain that breaks (a vanished process) is not.
    assert tree_walk(me, 999_999_999) is False
    assert tree_walk(999_999_999, me) is None and not in_tree(999_999_999, me)
    started = start_time(me)
    assert started is not None and started == start_time(me) and start_time(999_999_999) is None


def test_policy_refusal_reaches_the_bot_as_policy_refused() -> None:
    log = FakeLog()
    agent, ref = make_agent(log, SigningPolicy.from_mapping({"symbols": ["BTCUSDT"]}, "f: profiles.p.policy"))
    try:
        assert agent.path is not None
        signer = AgentSigner(ref.api_key, agent.path, profile="p")
        with pytest.raises(PolicyRefused) as info:
            signer.sign_params({"symbol": "XRPUSDT"})
        assert info.value.rule == "symbols"
        assert str(info.value).startswith("signing policy refused the request (symbols): symbol 'XRPUSDT'")
        # A raw payload that glues query and body is refused, not guessed.
        with pytest.raises(PolicyRefused, match="not NAME=VALUE"):
            signer.sign("symbol=BTCUSDT&timeInForce=GTCquantity=1")
        assert [e for e, _ in log.committed] == ["policy_refused", "policy_refused"]
    finally:
        agent.stop()


def test_socket_folder_is_private_and_a_missing_agent_is_a_clear_error(tmp_path: Path) -> None:
    log = FakeLog()
    agent, ref = make_agent(log)
    path = agent.path
    assert path is not None
    assert (path.parent.stat().st_mode & 0o777) == 0o700 and (path.stat().st_mode & 0o777) == 0o600
    agent.stop()
    with pytest.raises(BrokerError, match="signing agent's folder .* is missing or not private"):
        AgentSigner(None, path)
    # A socket in a folder others can enter is never used.
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(open_dir / "agent.sock"))
        with pytest.raises(BrokerError, match="not private"):
            AgentSigner(None, open_dir / "agent.sock")


def test_run_signing_swaps_the_key_on_rotation_and_hides_the_secret_variables() -> None:
    from broker.agent.run import RunSigning
    from broker.config import Profile
    from broker.secret import Credentials, Origin

    prof = Profile(name="p", source="vault", env={"BINANCE_API_KEY": "api_key", "BINANCE_API_SECRET": "api_secret"},
                   origin="/x/credbroker.toml")
    signing = RunSigning.prepare(prof, agent=True, preflight=None, env={"CREDBROKER_PREFLIGHT_URL": "http://127.0.0.1:9"})
    assert signing.preflight.mode == "auto" and signing.policy is not None

    def creds(secret: str) -> Credentials:
        return Credentials("p", Origin("vault", "secret/x", 1),
                           {"api_key": Secret("KEY-" + "k" * 20), "api_secret": Secret(secret)})

    signing.preflight = signing.preflight._replace(mode="off")
    first = creds("first-secret")
    records: list[tuple[str, dict[str, Any]]] = []
    signing.check_key(first, record=lambda e, f: records.append((e, f)))
    parent, child_prof = signing.child_view({"BINANCE_API_SECRET": "stale", "PATH": "/bin",
                                             "CREDBROKER_AGENT_SOCKET": "/elsewhere"}, prof)
    assert parent == {"PATH": "/bin"} and dict(child_prof.env) == {"BINANCE_API_KEY": "api_key"}
    env = signing.start_agent(None, lambda e, f: records.append((e, f)))
    try:
        signing.started(os.getpid())
        client = AgentSigner(None, env["CREDBROKER_AGENT_SOCKET"])
        before = client.sign("a=1")
        assert before == HmacSigner("K" * 12, Secret("first-secret")).sign("a=1")
        second = creds("second-secret")
        signing.use(second)  # what a rotation restart does before starting the new bot
        assert client.sign("a=1") == HmacSigner("K" * 12, Secret("second-secret")).sign("a=1")
    finally:
        signing.stop()
    events = [e for e, _ in records]
    assert events[0] == "agent_started" and events[-1] == "agent_stopped"
    assert records[-1][1]["signed"] == 2
    assert "first-secret" not in repr(records) and "second-secret" not in repr(records)


def test_ed25519_key_signs_through_the_agent(openbao: OpenBao, tmp_path: Path, verifier: BinanceVerifier,
                                             run_broker: Any) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    api_key = "E" + secrets.token_hex(31)
    kv = f"credbroker/binance/agent-ed-{secrets.token_hex(3)}"
    openbao.kv_put(kv, api_key=api_key, private_key=pem)
    (tmp_path / "credbroker.toml").write_text(f"""
[profiles.bot]
source = "vault"
path = "secret/{kv}"
env = {{ BINANCE_API_KEY = "api_key", BINANCE_PRIVATE_KEY = "private_key" }}
""")
    verifier.add_public_key(api_key, key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    state = tmp_path / "state-ed"
    state.mkdir()
    (state / "go").touch()
    res = run_broker(["run", "--agent", "--no-preflight", "--profile", "bot", "--",
                      sys.executable, str(BOT), verifier.url, str(state), "sign"], env=broker_env(openbao))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "remote=ed25519" in res.stdout
    assert [s.status for s in verifier.seen] == [200, 200, 200, 200]


SLEEPER = ("import os, sys, time\nfrom broker import get_signer\n"
           "s = get_signer(); s.sign('a=1')\n"
           "open(sys.argv[1], 'w').write(os.environ['CREDBROKER_AGENT_SOCKET'])\n"
           "time.sleep(600)\n")  # signalled or killed by each test long before


def start_sleeper(openbao: OpenBao, tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    setup_profile(openbao, tmp_path)
    ready = tmp_path / "socket-path"
    proc = subprocess.Popen([credbroker_bin(), "run", "--agent", "--no-preflight", "--profile", "bot", "--",
                             sys.executable, "-c", SLEEPER, str(ready)], env=broker_env(openbao),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (ready.exists() and ready.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, Path(ready.read_text())


def test_a_signal_reaches_the_bot_not_the_agent_and_the_folder_goes(openbao: OpenBao, tmp_path: Path) -> None:
    import signal

    proc, sock = start_sleeper(openbao, tmp_path)
    assert sock.exists()
    proc.send_signal(signal.SIGTERM)  # forwarded to the bot by the main thread; the agent never sees it
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert not sock.parent.exists()


def test_the_agent_dies_with_the_broker(openbao: OpenBao, tmp_path: Path) -> None:
    import signal

    proc, sock = start_sleeper(openbao, tmp_path)
    proc.send_signal(signal.SIGKILL)  # no cleanup possible: the socket file stays, nobody answers it
    proc.communicate(timeout=60)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, pytest.raises(ConnectionRefusedError):
        s.connect(str(sock))
    with pytest.raises(BrokerError, match="cannot reach the signing agent"):
        AgentSigner(None, sock)
    import shutil

    shutil.rmtree(sock.parent, ignore_errors=True)


def test_policy_without_agent_warns_every_run_and_is_still_validated(openbao: OpenBao, tmp_path: Path,
                                                                     run_broker: Any) -> None:
    setup_profile(openbao, tmp_path, '[profiles.bot.policy]\nsymbols = ["BTCUSDT"]\n')
    for _ in range(2):
        res = run_broker(["run", "--profile", "bot", "--", "true"], env=broker_env(openbao))
        assert res.returncode == 0
        assert "profiles.bot.policy is enforced only with --agent; this bot holds the secret" in res.stderr
    setup_profile(openbao, tmp_path, '[profiles.bot.policy]\nsymbol = ["BTCUSDT"]\n')
    res = run_broker(["run", "--profile", "bot", "--", "true"], env=broker_env(openbao))
    assert res.returncode == 125 and "profiles.bot.policy.symbol: unknown key" in res.stderr


# -- a flood of foreign connections never stalls the bot ---------------------------------------------

FLOODER = """
import socket, sys
path, n = sys.argv[1], int(sys.argv[2])
done = 0
print("flooding", flush=True)
for _ in range(n):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(path)
        done += 1
        s.recv(65536)  # the refusal (or the close)
print(done, flush=True)
"""

FLOOD_BOT = """
import sys
from broker.errors import BrokerError, SigningError
from broker.signing.agent import AgentSigner
signer = AgentSigner(None, sys.argv[1])
ok = 0
for i in range(int(sys.argv[2])):
    signer.sign_params({"symbol": "BTCUSDT", "quantity": str(i)}, endpoint="/fapi/v1/order")
    ok += 1
print(ok, flush=True)
"""


def test_a_flood_of_foreign_connections_is_refused_in_aggregate_while_the_bot_signs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.agent import peer as agent_module

    log = FakeLog()
    # One window for the whole test: every refusal of a peer lands in one record.
    monkeypatch.setattr(agent_module, "REFUSAL_WINDOW", 3600.0)
    agent = Agent(HmacSigner("KEY", Secret(b"s3cret")), profile="p", policy=SigningPolicy.from_mapping(None, "x"),
                  audit=log)
    assert agent._tally.window == 3600.0
    path = str(agent.start())
    per_flooder, flooders, signatures = 400, 3, 200
    procs: list[subprocess.Popen[str]] = []
    try:
        bot = subprocess.Popen([sys.executable, "-c", FLOOD_BOT, path, str(signatures)], cwd=REPO,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(bot)
        agent.set_child(bot.pid)  # the flooders are the bot's siblings: outside its tree
        for _ in range(flooders):
            procs.append(subprocess.Popen([sys.executable, "-c", FLOODER, path, str(per_flooder)], cwd=REPO,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = {p.pid: p.communicate(timeout=120) for p in procs}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        agent.stop()
    bot_out, bot_err = outs[bot.pid]
    assert bot.returncode == 0 and bot_out.strip() == str(signatures), bot_err[-2000:]
    assert agent.signed == signatures
    assert [e for e, _ in log.committed].count("signed") == signatures
    made = {p.pid: int(outs[p.pid][0].split()[-1]) for p in procs[1:]}
    assert all(p.returncode == 0 for p in procs[1:]) and set(made.values()) == {per_flooder}
    refused = [f for e, f in log.committed if e == "agent_refused"]
    # One record per peer, with the number of its connections: not one record per connection.
    assert sorted(r["pid"] for r in refused) == sorted(made)
    assert {r["pid"]: r["count"] for r in refused} == made
    assert all(r["uid"] == os.getuid() and "is not the bot" in r["reason"] for r in refused)
    assert agent.refused == per_flooder * flooders


def test_refusals_are_recorded_when_their_window_ends_not_only_at_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.agent import peer as agent_module

    monkeypatch.setattr(agent_module, "REFUSAL_WINDOW", 0.2)
    log = FakeLog()
    agent = Agent(HmacSigner("KEY", Secret(b"s3cret")), profile="p", policy=SigningPolicy.from_mapping(None, "x"),
                  audit=log)
    path = agent.start()
    try:
        agent.set_child(999_999_999)
        for _ in range(3):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(30)
                s.connect(str(path))
                assert b"AgentRefused" in s.recv(65536)
        deadline = time.monotonic() + 30
        while not any(e == "agent_refused" for e, _ in log.committed):
            assert time.monotonic() < deadline, "the window's refusals were never recorded"
            time.sleep(0.02)
        refused = [f for e, f in log.committed if e == "agent_refused"]
        assert sum(r["count"] for r in refused) == 3 and all(r["pid"] == os.getpid() for r in refused)
    finally:
        agent.stop()


def test_refusal_tally_counts_per_peer_and_caps_the_number_of_records() -> None:
    from broker.agent.peer import RefusalTally

    tally = RefusalTally(window=10.0, max_peers=2)
    assert not tally.due(0.0) and tally.deadline() is None
    for pid in (10, 10, 11, 12, 13, 12):
        tally.add(pid, 1000, "outside", 100.0)
    assert not tally.due(109.9) and tally.due(110.0)
    records = tally.drain("p", 110.0)
    assert [(r["pid"], r["count"]) for r in records] == [(10, 2), (11, 1), (None, 3)]
    assert all(r["window_s"] == 10.0 and r["profile"] == "p" for r in records)
    assert tally.drain("p", 111.0) == [] and tally.deadline() is None


def test_a_connection_before_the_bot_is_known_waits_without_blocking_others() -> None:
    """Until the bot's pid is known a newcomer waits in the backlog; the open connections are served meanwhile."""
    agent, ref = make_agent(FakeLog())
    try:
        assert agent.path is not None
        signer = AgentSigner(ref.api_key, agent.path, profile="p")  # admitted while our pid is the bot's
        agent.set_child(None)
        early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        early.connect(str(agent.path))
        early.sendall(frame({"op": "hello"}))
        # The open connection signs while the newcomer waits (it is neither refused nor answered).
        assert signer.sign("a=1") == ref.sign("a=1")
        early.setblocking(False)
        with pytest.raises(BlockingIOError):
            early.recv(1)
        assert agent.refused == 0
        agent.set_child(os.getpid())  # the bot is known: the newcomer is accepted, checked and answered
        early.setblocking(True)
        early.settimeout(30)
        reply = recv_message(early)
        assert reply["ok"] and reply["profile"] == "p"
        early.close()
        signer.close()
    finally:
        agent.stop()


# -- memory: the agent holds its key, and no copy of a key it no longer uses ----------------------------

ROTATING_BOT = """
import signal, sys, time
from pathlib import Path
from broker import get_signer
signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the broker signals the bot after swapping the agent's key
signer, out = get_signer(), Path(sys.argv[1])
while True:
    out.write_text(signer.sign("symbol=BTCUSDT&timestamp=1"))
    time.sleep(0.02)
"""


def test_after_key_rotations_the_broker_holds_only_the_current_key(openbao: OpenBao, tmp_path: Path) -> None:
    """Scanned from outside (root): one copy of the key in use, none of the keys rotated away."""
    from tests.helpers.memscan import count_in_memory, need_root

    need_root()
    kv = f"credbroker/binance/agent-rot-{secrets.token_hex(3)}"
    keys = ["R" + secrets.token_hex(24) for _ in range(3)]
    openbao.kv_put(kv, api_key="ROTKEY", api_secret=keys[0])
    (tmp_path / "credbroker.toml").write_text(f"""
[profiles.bot]
source = "vault"
path = "secret/{kv}"
env = {{ BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }}
""")
    sig = tmp_path / "signature"
    proc = subprocess.Popen([credbroker_bin(), "run", "--agent", "--no-preflight", "--profile", "bot",
                             "--on-rotate", "signal:HUP", "--rotate-interval", "1s", "--",
                             sys.executable, "-c", ROTATING_BOT, str(sig)],
                            env=broker_env(openbao, CREDBROKER_DAEMON="0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def signs_with(key: str) -> None:
        want = HmacSigner("ROTKEY", Secret(key.encode())).sign("symbol=BTCUSDT&timestamp=1")
        deadline = time.monotonic() + 60
        while not (sig.exists() and sig.read_text() == want):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the agent never signed with this key"
            time.sleep(0.02)

    try:
        signs_with(keys[0])
        for i in (1, 2):
            openbao.kv_put(kv, api_key="ROTKEY", api_secret=keys[i])
            signs_with(keys[i])
            counts, read = count_in_memory(proc.pid, [k.encode() for k in keys[:i + 1]])
            assert read > 1_000_000
            assert counts[keys[i].encode()] <= 1, f"{counts[keys[i].encode()]} copies of the key in use"
            old = [n for n, c in counts.items() if c and n != keys[i].encode()]
            assert not old, f"the broker still holds {len(old)} rotated-away key(s)"
    finally:
        proc.send_signal(15)
        out, err = proc.communicate(timeout=30)
    assert "the agent signs with the new key" in err


# -- one package for the agent: the protocol written once, errors rebuilt in one place ------------------


def test_the_bots_client_loads_only_the_protocol_and_the_errors_of_the_agent() -> None:
    """The bot imports the wire protocol and broker.errors, never the server, its peer checks or the policy."""
    code = ("import sys\nimport broker.signing.agent\n"
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('broker'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(out.stdout.split())
    assert {"broker.agent", "broker.agent.protocol", "broker.errors"} <= loaded
    assert not loaded & {"broker.agent.server", "broker.agent.peer", "broker.agent.policy", "broker.agent.run",
                         "broker.signing_policy"}, sorted(loaded)


def test_both_ends_share_one_definition_of_the_protocol() -> None:
    import broker.agent.server as server
    import broker.signing.agent as client
    from broker.agent import protocol

    assert client.SOCKET_VAR is protocol.SOCKET_VAR == "CREDBROKER_AGENT_SOCKET"
    assert server.PROTOCOL is protocol.PROTOCOL
    assert not hasattr(client, "PROTOCOL")  # the client's own copy is gone
    assert protocol.sign_request("a=1", "b=2", "/fapi/v1/order", "POST") == {
        "op": "sign", "q": "a=1", "b": "b=2", "e": "/fapi/v1/order", "m": "POST"}
    assert protocol.decode(protocol.encode({"op": "hello"})[protocol.HEADER.size:]) == {"op": "hello"}
    # The fast encoders of the two messages on every signature say what the general one says.
    for query, body, endpoint, method in [("a=1&b=%2F", "", None, None), ('q="x"\\\n\t\x00', "é=€", "/p", "POST"),
                                          ("newClientOrderId=a b+c/=d", "x" * 5000, "/fapi/v1/order", None)]:
        fast = protocol.encode_sign_request(query, body, endpoint, method)
        assert protocol.decode(fast[4:]) == protocol.sign_request(query, body, endpoint, method)
        assert protocol.HEADER.unpack_from(fast)[0] == len(fast) - 4
    for sig in ("ab" * 32, "a+b/c==", 'q"\\'):
        fast = protocol.encode_signature(sig)
        assert protocol.decode(fast[4:]) == {"ok": True, "sig": sig}
        assert protocol.HEADER.unpack_from(fast)[0] == len(fast) - 4
    agent = Agent(None, profile="p", policy=SigningPolicy.from_mapping(None, "x"), audit=FakeLog())
    assert set(agent._ops) == set(protocol.Op)  # every op has its handler


def test_errors_cross_the_wire_as_their_own_class_with_their_fields() -> None:
    from broker.agent import protocol
    from broker.errors import AgentRefused, AuditError, VaultNotFound, from_dict

    refusal = PolicyRefused("symbols", "symbol 'XRPUSDT' is not allowed")
    with pytest.raises(PolicyRefused) as info:
        protocol.raise_error(json.loads(json.dumps(protocol.error_reply(refusal)["error"])))
    assert info.value.rule == "symbols" and info.value.message == refusal.message
    assert info.value.remedy == refusal.remedy and str(info.value) == str(refusal)
    for exc in (AgentRefused("refused: pid 1 is not the bot", "only the bot"), AuditError("disk full", "free it")):
        back = from_dict(exc.to_dict())
        assert type(back) is type(exc) and (back.message, back.remedy) == (exc.message, exc.remedy)
    vault = VaultNotFound("no such path", "check it")
    vault.request_id, vault.secret_path = "rid-1", "secret/x"
    back = from_dict(vault.to_dict())
    assert isinstance(back, VaultNotFound) and (back.request_id, back.secret_path) == ("rid-1", "secret/x")
    # An unknown class or a malformed error is a SigningError in the bot, never a crash.
    with pytest.raises(SigningError, match="unheard of"):
        protocol.raise_error({"error": "NoSuchError", "message": "unheard of"})
    with pytest.raises(SigningError, match="without a reason"):
        protocol.raise_error("nonsense")
