"""The signing proxy's WebSocket API endpoint (``broker.proxy.ws``) against a fake WebSocket API.

tests/helpers/fake_binance_ws.py verifies signatures as Binance's WebSocket API docs
describe; the proxy is driven in-process by a ``websockets`` client signing
with the proxy secret, as a bot's client library does (the test process
itself is the allowed tree: the peer check runs for real with
``allow_root=True``).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("websockets", reason="the optional extra credbroker[ws] is not installed")

from websockets.exceptions import InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from broker.errors import ConfigError  # noqa: E402
from broker.proxy.clientkey import ClientKey  # noqa: E402
from broker.proxy.peer import peer_in_tree  # noqa: E402
from broker.proxy.ws import WsProxy, upstream_urls  # noqa: E402
from broker.secret import Secret  # noqa: E402
from broker.signing.hmac_sha256 import HmacSigner  # noqa: E402
from broker.signing_policy import SigningPolicy  # noqa: E402
from tests.helpers.fake_binance_ws import FakeBinanceWs  # noqa: E402
from tests.helpers.proxy import bot_signer  # noqa: E402
from tests.helpers.proxy_ws import API_KEY, ORDER, fake, fake_rest, real_signer, ws_call  # noqa: E402,F401


class Harness:
    def __init__(self, fake: FakeBinanceWs, signer: Any, client_kind: str, policy: SigningPolicy | None = None,
                 check_peer: Any = None) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []
        self.client_key = ClientKey(client_kind)
        self.proxy = WsProxy(
            signer, self.client_key, policy or SigningPolicy(),
            {"spot": fake.url + "/ws-api/v3", "futures": fake.url + "/ws-fapi/v1"}, profile="p",
            record=lambda e, f: self.records.append((e, f)) is None,
            check_peer=check_peer or (lambda c, s: peer_in_tree(c, s, os.getpid(), allow_root=True)))
        self.url = self.proxy.start()

    def client(self) -> Any:
        """The bot's signer: the proxy secret, as `credbroker run --proxy` hands it to the bot."""
        return bot_signer(self.client_key, API_KEY)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [f for e, f in self.records if e == name]


@pytest.fixture
def harnesses() -> Iterator[list[Harness]]:
    made: list[Harness] = []
    yield made
    for h in made:
        h.proxy.stop()


@pytest.mark.parametrize("kind", ["hmac", "ed25519", "rsa"])
def test_order_place_is_re_signed_with_the_real_key(fake: FakeBinanceWs, harnesses: list[Harness],
                                                    kind: str) -> None:
    h = Harness(fake, real_signer(fake, kind), kind)
    harnesses.append(h)
    bot = h.client()
    with connect(h.url + "/ws-api/v3") as ws:
        params = bot.sign_ws_params(ORDER, method="order.place")
        answer = ws_call(ws, {"id": "o-1", "method": "order.place", "params": params})
    assert answer["id"] == "o-1" and answer["status"] == 200, answer
    assert answer["result"]["clientOrderId"] == "a b+c/=d&e"
    seen = fake.seen[-1]
    assert seen.method == "order.place" and seen.status == 200  # the fake verified the real key's signature
    assert seen.params["signature"] != params["signature"]
    assert {k: v for k, v in seen.params.items() if k not in ("signature", "timestamp")} == \
        {k: v for k, v in params.items() if k not in ("signature", "timestamp")}
    forwarded = h.events("proxy_request")
    assert len(forwarded) == 1 and forwarded[0]["ws_method"] == "order.place"
    assert forwarded[0]["endpoint"] == "/api/v3/order" and forwarded[0]["pid"] == os.getpid()
    assert "a b+c" not in json.dumps(h.records)


def test_session_logon_and_spot_user_data_through_the_proxy(fake: FakeBinanceWs, harnesses: list[Harness]) -> None:
    """The bot logs on with the proxy key; the proxy logs on upstream with the real Ed25519 key."""
    h = Harness(fake, real_signer(fake, "ed25519"), "ed25519",
                SigningPolicy.from_mapping({"symbols": ["BTCUSDT"]}, "f: profiles.p.policy"))
    harnesses.append(h)
    bot = h.client()
    with connect(h.url + "/ws-api/v3") as ws:
        logon = ws_call(ws, bot.ws_logon(request_id="l-1"))
        assert logon["status"] == 200 and logon["result"]["apiKey"] == API_KEY, logon
        assert fake.seen[-1].method == "session.logon" and fake.seen[-1].status == 200
        # In the session: no apiKey, no signature; the policy still reads each request.
        sub = ws_call(ws, {"id": "s-1", "method": "userDataStream.subscribe"})
        assert sub["id"] == "s-1" and sub["status"] == 200 and sub["result"] == {"subscriptionId": 0}
        event = json.loads(ws.recv(timeout=10))  # relayed unchanged
        assert event["subscriptionId"] == 0 and event["event"]["e"] == "outboundAccountPosition"
        order = ws_call(ws, {"id": "o-1", "method": "order.place", "params": {**ORDER, "timestamp": 1}})
        assert order["status"] == 200, order  # re-stamped: the bot's stale timestamp became the exchange's now
        refused = ws_call(ws, {"id": "o-2", "method": "order.place",
                             "params": {**ORDER, "symbol": "XRPUSDT", "timestamp": 1}})
        assert refused["status"] == 403 and refused["error"]["code"] == -1002
        assert "XRPUSDT" in refused["error"]["msg"]
        status = ws_call(ws, {"id": "st", "method": "session.status"})
        assert status["result"]["apiKey"] == API_KEY
    assert [s.method for s in fake.seen] == ["session.logon", "userDataStream.subscribe", "order.place",
                                             "session.status"]
    assert all(s.status == 200 for s in fake.seen)
    assert [f["ws_method"] for f in h.events("proxy_request")] == ["session.logon", "userDataStream.subscribe",
                                                                   "order.place"]
    assert [f["rule"] for f in h.events("policy_refused")] == ["symbols"]


@pytest.mark.parametrize("kind", ["hmac", "rsa"])
def test_session_logon_needs_a_real_ed25519_key(fake: FakeBinanceWs, harnesses: list[Harness], kind: str) -> None:
    h = Harness(fake, real_signer(fake, kind), "ed25519")  # even with an Ed25519 stand-in for the bot
    harnesses.append(h)
    with connect(h.url + "/ws-api/v3") as ws:
        answer = ws_call(ws, h.client().ws_logon(request_id=7))
    assert answer["id"] == 7 and answer["status"] == 400
    assert f"session.logon needs an Ed25519 key; this profile's key is {kind}" in answer["error"]["msg"]
    assert fake.seen == []
    assert [f["rule"] for f in h.events("proxy_refused")] == ["logon_key"]


def test_a_policy_refusal_is_answered_and_never_forwarded(fake: FakeBinanceWs, harnesses: list[Harness]) -> None:
    policy = SigningPolicy.from_mapping({"symbols": ["BTCUSDT"], "max_quantity": 1,
                                         "deny_endpoints": ["/api/v3/myTrades"]}, "f: profiles.p.policy")
    h = Harness(fake, real_signer(fake, "hmac"), "hmac", policy)
    harnesses.append(h)
    bot = h.client()
    with connect(h.url + "/ws-api/v3") as ws:
        for rid, method, params in (("1", "order.place", {**ORDER, "symbol": "ETHUSDT"}),
                                    ("2", "order.place", {**ORDER, "quantity": "5"}),
                                    ("3", "myTrades", {"symbol": "BTCUSDT"})):
            answer = ws_call(ws, {"id": rid, "method": method, "params": bot.sign_ws_params(params, method=method)})
            assert answer["id"] == rid and answer["status"] == 403 and answer["error"]["code"] == -1002, answer
    assert fake.seen == []
    assert [f["rule"] for f in h.events("policy_refused")] == ["symbols", "max_quantity", "deny_endpoints"]
    assert h.events("proxy_request") == []


def test_a_bad_client_signature_is_refused(fake: FakeBinanceWs, harnesses: list[Harness]) -> None:
    h = Harness(fake, real_signer(fake, "hmac"), "hmac")
    harnesses.append(h)
    stranger = HmacSigner(API_KEY, Secret(secrets.token_hex(32)))  # not the proxy secret
    with connect(h.url + "/ws-api/v3") as ws:
        answer = ws_call(ws, {"id": 1, "method": "order.place", "params": stranger.sign_ws_params(ORDER)})
        assert answer["status"] == 400 and answer["error"]["code"] == -1022
        # The real API key is required too, and a stale timestamp is refused like Binance does.
        other = HmacSigner("B" * 64, Secret(h.client_key.secret.reveal())).sign_ws_params(ORDER)
        assert ws_call(ws, {"id": 2, "method": "order.place", "params": other})["error"]["code"] == -2015
        stale = h.client().sign_ws_params(ORDER, timestamp=1)
        assert ws_call(ws, {"id": 3, "method": "order.place", "params": stale})["error"]["code"] == -1021
        assert ws_call(ws, {"id": 4, "method": "ping"})["status"] == 200  # public: forwarded as it is
    assert [s.method for s in fake.seen] == ["ping"]
    assert [f["rule"] for f in h.events("proxy_refused")] == ["client_signature", "api_key", "timestamp"]


def test_futures_path_reaches_the_futures_upstream_and_others_are_refused(fake: FakeBinanceWs,
                                                                         harnesses: list[Harness]) -> None:
    h = Harness(fake, real_signer(fake, "hmac"), "hmac")
    harnesses.append(h)
    with connect(h.url + "/ws-fapi/v1") as ws:
        answer = ws_call(ws, {"id": 1, "method": "order.place",
                            "params": h.client().sign_ws_params(ORDER, method="order.place", api="futures")})
        assert answer["status"] == 200, answer
    assert h.events("proxy_request")[0]["endpoint"] == "/fapi/v1/order"
    with pytest.raises(InvalidStatus) as info:
        connect(h.url + "/stream")
    assert info.value.response.status_code == 404


def test_a_process_outside_the_bots_tree_is_refused_at_the_handshake(fake: FakeBinanceWs,
                                                                     harnesses: list[Harness]) -> None:
    h = Harness(fake, real_signer(fake, "hmac"), "hmac", check_peer=lambda c, s: (None, "not the bot"))
    harnesses.append(h)
    with pytest.raises(InvalidStatus) as info:
        connect(h.url + "/ws-api/v3")
    assert info.value.response.status_code == 403


def test_upstream_urls_default_to_binance_and_refuse_plain_ws_off_loopback() -> None:
    assert upstream_urls(None, "x") == {"spot": "wss://ws-api.binance.com:443/ws-api/v3",
                                        "futures": "wss://ws-fapi.binance.com/ws-fapi/v1"}
    assert upstream_urls({"testnet": True}, "x")["futures"] == "wss://testnet.binancefuture.com/ws-fapi/v1"
    with pytest.raises(ConfigError, match="plain ws://"):
        upstream_urls({"ws_spot": "ws://example.com/ws-api/v3"}, "x")
    with pytest.raises(ConfigError, match="plain ws://"):
        upstream_urls({"ws_spot": "ws://127.0.0.1:1/ws-api/v3"}, "x")
    assert upstream_urls({"ws_spot": "ws://127.0.0.1:1/ws-api/v3", "unsafe_plain_http_loopback": True},
                         "x")["spot"] == "ws://127.0.0.1:1/ws-api/v3"
    with pytest.raises(ConfigError, match="expected a wss:// URL"):
        upstream_urls({"ws_futures": "https://fapi.binance.com"}, "x")
    for bad in ("wss://[::1/ws-fapi/v1", "wss://ws-fapi.binance.com:70000/ws-fapi/v1"):
        with pytest.raises(ConfigError, match="expected a wss:// URL"):
            upstream_urls({"ws_futures": bad}, "x")


# -- end to end: `credbroker run --proxy`, the key in OpenBao ---------------------------------------


def _ws_profile(tmp: Path, ws_url: str) -> None:
    """Point the profile tests.helpers.proxy.proxy_profile wrote at the fake WebSocket API too."""
    path = tmp / "credbroker.toml"
    path.write_text(path.read_text().replace("[profiles.bot.proxy]\n",
                                             f'[profiles.bot.proxy]\nws_spot = "{ws_url}/ws-api/v3"\n'
                                             f'ws_futures = "{ws_url}/ws-fapi/v1"\n'))


def _register(fake: FakeBinanceWs, fake_rest: Any) -> None:
    """The fake WS API knows the keys the fake REST API was given (the same account)."""
    for api_key, (kind, key) in fake_rest.verifier.keys.items():
        if kind == "hmac":
            fake.hmac_keys[api_key] = key
        else:
            fake.public_keys[api_key] = key


@pytest.mark.vault
@pytest.mark.parametrize("kind", ["hmac", "ed25519"])
def test_python_binance_ws_api_client_through_credbroker_run_proxy(
        openbao: Any, tmp_path: Path, fake: FakeBinanceWs, fake_rest: Any, kind: str) -> None:
    """A real client library: python-binance's WebSocket API (``ws_create_order``), in its own venv."""
    from tests.conftest import credbroker_bin
    from tests.helpers.proxy import proxy_profile, python_binance

    python = python_binance()
    secret = proxy_profile(openbao, tmp_path, fake_rest, kind)
    _register(fake, fake_rest)
    _ws_profile(tmp_path, fake.url)
    state = tmp_path / "state-ws"
    state.mkdir()
    bot = str(Path(__file__).resolve().parent.parent / "helpers" / "proxy_bot_ws_python_binance.py")
    proc = subprocess.run([credbroker_bin(), "run", "--proxy", "-p", "bot", "--", python, bot, str(state)],
                          env={**openbao.env(), "PYTHONPATH": ""}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads((state / "result.json").read_text())
    res = out["results"]
    # python-binance signs the percent-encoded form; the proxy re-signs by Binance's rule, so a clientOrderId
    # with '/' and a space arrives exactly as the bot wrote it.
    assert res["order"]["clientOrderId"] == "cb/1 x", res
    assert res["plain_order"]["clientOrderId"] == "plain1"
    assert res["other_symbol"]["error"] == -1002 and "XRPUSDT" in res["other_symbol"]["msg"]
    assert res["account"]["method"] == "account.status"
    assert out["environ"]["CREDBROKER_PROXY_WS_URL"].startswith("ws://127.0.0.1:")
    needle = secret if kind == "hmac" else secret.strip().splitlines()[1]
    assert needle not in json.dumps(out["environ"])
    assert [s.method for s in fake.seen] == ["order.place", "order.place", "account.status"]
    assert all(s.status == 200 for s in fake.seen)
    assert {s.params["newClientOrderId"] for s in fake.seen if "newClientOrderId" in s.params} == {"cb/1 x", "plain1"}


@pytest.mark.vault
def test_a_transit_key_signs_ws_requests_and_logs_on_through_credbroker_run_proxy(
        openbao: Any, tmp_path: Path, fake: FakeBinanceWs, fake_rest: Any) -> None:
    import sys

    from tests.conftest import credbroker_bin
    from tests.helpers.auditlog import audit_records
    from tests.helpers.transit_proxy import write_transit_proxy_profile

    write_transit_proxy_profile(openbao, tmp_path, fake, API_KEY, rest_url=fake_rest.url, prefix="ws-",
                                proxy_extra=f'ws_spot = "{fake.url}/ws-api/v3"\nws_futures = "{fake.url}/ws-fapi/v1"\n',
                                tail='\n[profiles.bot.policy]\nsymbols = ["BTCUSDT"]\n')
    state = tmp_path / "state-ws"
    state.mkdir()
    bot = str(Path(__file__).resolve().parent.parent / "helpers" / "proxy_bot_ws.py")
    proc = subprocess.run([credbroker_bin(), "run", "--proxy", "-p", "bot", "--", sys.executable, bot, str(state)],
                          env=openbao.env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads((state / "result.json").read_text())
    res = out["results"]
    assert out["environ"]["CREDBROKER_KEY_KIND"] == "ed25519"
    assert res["signed_order"]["status"] == 200, res
    assert res["signed_order"]["result"]["clientOrderId"] == "a b+c/=d"
    assert res["logon"]["status"] == 200 and res["logon"]["result"]["apiKey"] == API_KEY
    assert res["subscribe"]["status"] == 200 and res["event"]["event"]["e"] == "outboundAccountPosition"
    assert res["session_order"]["status"] == 200
    assert res["other_symbol"]["status"] == 403
    # The exchange saw only the transit key's signatures (the fake verified each with its public key).
    assert [s.method for s in fake.seen] == ["order.place", "session.logon", "userDataStream.subscribe",
                                             "order.place"]
    assert all(s.status == 200 for s in fake.seen)
    records = audit_records()
    forwarded = [r["data"] for r in records if r["event"] == "proxy_request" and "ws_method" in r["data"]]
    assert [f["ws_method"] for f in forwarded] == ["order.place", "session.logon", "userDataStream.subscribe",
                                                   "order.place"]
    assert {f["pid"] for f in forwarded} == {out["pid"]}
    assert [r["data"]["rule"] for r in records if r["event"] == "policy_refused"] == ["symbols"]
    started = next(r["data"] for r in records if r["event"] == "proxy_started")
    assert started["ws_url"] == out["environ"]["CREDBROKER_PROXY_WS_URL"]
    stopped = next(r["data"] for r in records if r["event"] == "proxy_stopped")
    assert stopped["ws_forwarded"] == 4 and stopped["ws_refused"] == 1
    assert openbao.token not in json.dumps(out["environ"])


def test_the_core_never_imports_websockets() -> None:
    """``credbroker[ws]`` is optional: the CLI, the proxy package and its config checks load without it."""
    import sys

    code = ("import sys, broker.cli, broker.proxy, broker.proxy.ws as ws; "
            "ws.upstream_urls({'testnet': True}, 'x'); "
            "print('websockets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_ws_upstreams_named_without_the_extra_stop_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import broker.proxy as proxy_pkg
    from broker.proxy import ws

    monkeypatch.setattr(ws, "available", lambda: False)
    profile = SimpleNamespace(name="bot", sections={"proxy": {"ws_spot": "wss://ws-api.binance.com/ws-api/v3"}},
                              where=lambda s: f"credbroker.toml: profiles.bot.{s}")
    # Checked with the rest of the profile (check_profile), before any secret is fetched or server started.
    with pytest.raises(ConfigError, match="ws_spot/ws_futures are set but the WebSocket library is not installed"):
        proxy_pkg._ws_urls(profile)
    # Without ws_* the run goes on without a WebSocket endpoint.
    profile.sections = {"proxy": {"testnet": True}}
    assert proxy_pkg._ws_urls(profile) is None
    assert proxy_pkg._ws_endpoint(profile, None, None, None, None, {}, None) is None


@pytest.mark.vault
def test_binance_modular_sdk_ws_api_client_through_credbroker_run_proxy(
        openbao: Any, tmp_path: Path, fake: FakeBinanceWs, fake_rest: Any) -> None:
    """Binance's own SDK (USDⓈ-M futures WebSocket API), in its own venv, on the futures path /ws-fapi/v1.

    The SDK signs the sorted parameters percent-encoded; the docs' rule (what the fake checks) signs them
    as they are. Straight at the fake (env mode) an order whose clientOrderId holds '/' and ' ' gets -1022;
    through the proxy, which re-signs by the docs' rule, it goes through.
    """
    from tests.conftest import credbroker_bin
    from tests.helpers.proxy import BINANCE_SDK, proxy_profile

    if not BINANCE_SDK.exists():
        reason = f"the Binance SDK's venv {BINANCE_SDK.parent.parent} is missing (.ci/run makes it)"
        if os.environ.get("CREDBROKER_REQUIRE_SERVICES"):
            pytest.fail(reason)
        pytest.skip(reason)
    proxy_profile(openbao, tmp_path, fake_rest, "hmac")
    _register(fake, fake_rest)
    _ws_profile(tmp_path, fake.url)
    state = tmp_path / "state-sdk-ws"
    state.mkdir()
    bot = str(Path(__file__).resolve().parent.parent / "helpers" / "proxy_bot_ws_binance_sdk.py")
    env = {**openbao.env(), "PYTHONPATH": ""}
    direct = subprocess.run([credbroker_bin(), "run", "-p", "bot", "--", str(BINANCE_SDK), bot, str(state),
                             fake.url + "/ws-fapi/v1"], env=env, capture_output=True, text=True, timeout=120)
    assert direct.returncode == 0, direct.stdout + direct.stderr
    res = json.loads((state / "result-direct.json").read_text())["results"]
    assert "-1022" in json.dumps(res["order"]), res
    assert res["plain_order"]["result"]["clientOrderId"] == "plain1"
    fake.seen.clear()
    proc = subprocess.run([credbroker_bin(), "run", "--proxy", "-p", "bot", "--", str(BINANCE_SDK), bot, str(state)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads((state / "result-proxy.json").read_text())["results"]
    assert res["order"]["result"]["clientOrderId"] == "cb/1 x", res
    assert res["plain_order"]["result"]["clientOrderId"] == "plain1"
    assert res["account"]["status"] == 200
    assert [s.method for s in fake.seen] == ["order.place", "order.place", "v2/account.status"]
    assert all(s.status == 200 for s in fake.seen)
