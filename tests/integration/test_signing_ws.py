"""WebSocket API signing (``Signer.sign_ws_params``, ``binance.ws_payload``) against Binance's published examples.

Sources: the spot WebSocket API docs, "SIGNED request security", "SIGNED
request example (HMAC)" (Binance's example key and secret, published "for
illustrative purposes"), "SIGNED request example (RSA)" (its payload; the
private key is not published, so the signature is checked with the public key
of a key made here) and "SIGNED Request Example (Ed25519)" (the docs' Python
procedure, reproduced below as the reference), and "Log in with API key"
(``session.logon``: apiKey and timestamp, Ed25519 only).
"""

from __future__ import annotations

import base64
import json
import subprocess
from typing import Any

import pytest

from broker.errors import SigningError
from broker.secret import Secret
from broker.signing import SignerSettings, binance, make_signer
from broker.signing.hmac_sha256 import HmacSigner

DOC_API_KEY = "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A"
DOC_SECRET = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
# The request of "SIGNED request example (HMAC)", in the docs' order, without its signature.
DOC_PARAMS: dict[str, Any] = {
    "symbol": "BTCUSDT", "side": "SELL", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01000000",
    "price": "52000.00", "newOrderRespType": "ACK", "recvWindow": 100, "timestamp": 1645423376532,
    "apiKey": DOC_API_KEY,
}
DOC_PAYLOAD = ("apiKey=vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A&newOrderRespType=ACK"
               "&price=52000.00&quantity=0.01000000&recvWindow=100&side=SELL&symbol=BTCUSDT&timeInForce=GTC"
               "&timestamp=1645423376532&type=LIMIT")
DOC_SIGNATURE = "cc15477742bd704c29492d96c7ead9414dfd8e0ec4a00f947bb5bb454ddbd08a"
RSA_DOC_API_KEY = "CAvIjXy3F44yW6Pou5k8Dy1swsYDWJZLeoK2r8G4cFDnE9nosRppc2eKc1T8TRTQ"
RSA_DOC_PAYLOAD = ("apiKey=CAvIjXy3F44yW6Pou5k8Dy1swsYDWJZLeoK2r8G4cFDnE9nosRppc2eKc1T8TRTQ&newOrderRespType=ACK"
                   "&price=52000.00&quantity=0.01000000&recvWindow=100&side=SELL&symbol=BTCUSDT&timeInForce=GTC"
                   "&timestamp=1645423376532&type=LIMIT")


def _pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ed25519() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def _rsa() -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _signer(api_key: str, **fields: Any) -> Any:
    return make_signer(SignerSettings(), {"api_key": Secret(api_key), **{k: Secret(v) for k, v in fields.items()}})


def test_ws_payload_is_the_docs_hmac_example_payload() -> None:
    assert binance.ws_payload(DOC_PARAMS) == DOC_PAYLOAD
    # signature is never part of it, wherever it sits; the order given does not matter.
    assert binance.ws_payload({**dict(reversed(list(DOC_PARAMS.items()))), "signature": "x"}) == DOC_PAYLOAD


def test_hmac_sign_ws_params_reproduces_the_docs_example() -> None:
    signer = HmacSigner(DOC_API_KEY, Secret(DOC_SECRET))
    signed = signer.sign_ws_params(DOC_PARAMS)
    assert signed["signature"] == DOC_SIGNATURE
    assert {k: v for k, v in signed.items() if k != "signature"} == DOC_PARAMS
    # apiKey and timestamp are added when absent, with the same result.
    without = {k: v for k, v in DOC_PARAMS.items() if k not in ("apiKey", "timestamp")}
    assert signer.sign_ws_params(without, timestamp=1645423376532)["signature"] == DOC_SIGNATURE
    # Through make_signer, the way a profile's key is loaded.
    assert _signer(DOC_API_KEY, api_secret=DOC_SECRET).sign_ws_params(DOC_PARAMS)["signature"] == DOC_SIGNATURE


def test_hmac_ws_signature_cross_checked_with_openssl() -> None:
    """The docs' cross-check command: ``openssl dgst -hex -sha256 -hmac SECRET`` over the payload."""
    out = subprocess.run(["openssl", "dgst", "-hex", "-sha256", "-hmac", DOC_SECRET], input=DOC_PAYLOAD.encode(),
                         capture_output=True, check=True).stdout.decode()
    assert out.strip().split()[-1] == DOC_SIGNATURE


def test_ws_payload_does_not_percent_encode() -> None:
    params = {"newClientOrderId": "a b+c/=d&e", "symbol": "BTCUSDT", "flag": True, "symbols": ["BTCUSDT", "ETHUSDT"],
              "quantity": 1, "skip": None}
    assert binance.ws_payload(params) == ('flag=true&newClientOrderId=a b+c/=d&e&quantity=1'
                                          '&symbol=BTCUSDT&symbols=["BTCUSDT","ETHUSDT"]')


def test_timestamp_added_with_the_exchange_clock_offset() -> None:
    signer = HmacSigner(DOC_API_KEY, Secret(DOC_SECRET), clock=lambda: 1000.0)
    signer.clock_offset_ms = 2500
    signed = signer.sign_ws_params({"symbol": "BTCUSDT"})
    assert signed["timestamp"] == 1_000_000 + 2500
    assert signed["apiKey"] == DOC_API_KEY
    assert signed["signature"] == signer.sign(binance.ws_payload(signed))


def test_ed25519_follows_the_docs_procedure() -> None:
    key = _ed25519()
    signer = _signer("k" * 64, private_key=_pem(key))
    params = {"symbol": "BTCUSDT", "side": "SELL", "type": "LIMIT", "timeInForce": "GTC", "quantity": "1.0000000",
              "price": "0.20"}
    signed = signer.sign_ws_params(params, timestamp=1668481559918)
    # The docs' sample code, step by step.
    ref = {"apiKey": "k" * 64, **params, "timestamp": 1668481559918}
    payload = "&".join([f"{param}={value}" for param, value in sorted(ref.items())])
    assert signed["signature"] == base64.b64encode(key.sign(payload.encode("ASCII"))).decode("ASCII")
    key.public_key().verify(base64.b64decode(signed["signature"]), binance.ws_payload(signed).encode())


def test_rsa_signs_the_docs_payload() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    key = _rsa()
    signer = _signer(RSA_DOC_API_KEY, private_key=_pem(key))
    params = {k: v for k, v in DOC_PARAMS.items() if k != "apiKey"}
    signed = signer.sign_ws_params(params)
    assert binance.ws_payload(signed) == RSA_DOC_PAYLOAD
    key.public_key().verify(base64.b64decode(signed["signature"], validate=True), RSA_DOC_PAYLOAD.encode(),
                            padding.PKCS1v15(), hashes.SHA256())


def test_session_logon_with_ed25519() -> None:
    """Log in with API key: params apiKey and timestamp (the docs' example request), Ed25519 signature."""
    key = _ed25519()
    signer = _signer(DOC_API_KEY, private_key=_pem(key))
    request = signer.ws_logon(request_id="c174a2b1-3f51-4580-b200-8528bd237cb7", timestamp=1649729878532)
    assert request["method"] == "session.logon"
    assert request["id"] == "c174a2b1-3f51-4580-b200-8528bd237cb7"
    params = request["params"]
    assert set(params) == {"apiKey", "timestamp", "signature"}
    payload = f"apiKey={DOC_API_KEY}&timestamp=1649729878532"
    key.public_key().verify(base64.b64decode(params["signature"], validate=True), payload.encode())
    json.dumps(request)  # sendable as it is
    assert signer.sign_ws_params({}, method="v3/session.logon", timestamp=1)["signature"]


@pytest.mark.parametrize("kind", ["hmac", "rsa"])
def test_session_logon_refused_for_hmac_and_rsa(kind: str) -> None:
    signer = (_signer(DOC_API_KEY, api_secret=DOC_SECRET) if kind == "hmac"
              else _signer(DOC_API_KEY, private_key=_pem(_rsa())))
    with pytest.raises(SigningError, match=f"session.logon needs an Ed25519 key; this profile's key is {kind}"):
        signer.ws_logon()
    with pytest.raises(SigningError, match="needs an Ed25519 key"):
        signer.sign_ws_params({}, method="session.logon")
    # Other methods sign with any kind.
    assert signer.sign_ws_params({"symbol": "BTCUSDT"}, method="order.status")["signature"]


def test_sign_ws_params_refuses_a_signature_or_another_api_key() -> None:
    signer = HmacSigner(DOC_API_KEY, Secret(DOC_SECRET))
    with pytest.raises(SigningError, match="already contain a signature"):
        signer.sign_ws_params({"symbol": "BTCUSDT", "signature": "x"})
    with pytest.raises(SigningError, match="another apiKey"):
        signer.sign_ws_params({"apiKey": "B" * 64})
    with pytest.raises(SigningError, match="is an object"):
        signer.sign_ws_params({"nested": {"a": 1}})


def test_ws_method_endpoints() -> None:
    assert binance.ws_method_endpoint("order.place") == "/api/v3/order"
    assert binance.ws_method_endpoint("v3/order.place") == "/api/v3/order"
    assert binance.ws_method_endpoint("order.place", "futures") == "/fapi/v1/order"
    assert binance.ws_method_endpoint("v2/account.status", "futures") == "/fapi/v2/account"
    assert binance.ws_method_endpoint("userDataStream.subscribe") == "wsapi:userDataStream.subscribe"
    assert binance.ws_method_endpoint("no.such.method") is None
    with pytest.raises(SigningError):
        binance.ws_method_endpoint("order.place", "coin")


@pytest.mark.vault
def test_transit_signs_ws_params_and_logs_on(openbao: Any) -> None:
    """A transit key (Ed25519 inside a real OpenBao) signs WebSocket API params and may log on."""
    import secrets

    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from broker.signing.transit import TransitSigner

    name = "ws-" + secrets.token_hex(4)
    client = openbao.client()
    if "transit/" not in client.sys.list_mounted_secrets_engines().get("data", {}):
        client.sys.enable_secrets_engine("transit")
    client.secrets.transit.create_key(name=name, key_type="ed25519")
    signer = TransitSigner(DOC_API_KEY, client, None, key=name)
    public = load_pem_public_key(signer.public_key_pem().encode())
    signed = signer.sign_ws_params({"symbol": "BTCUSDT", "newClientOrderId": "a b+c/=d"}, method="order.place")
    public.verify(base64.b64decode(signed["signature"], validate=True), binance.ws_payload(signed).encode())  # type: ignore[union-attr]
    logon = signer.ws_logon(timestamp=1649729878532)["params"]
    public.verify(base64.b64decode(logon["signature"], validate=True),  # type: ignore[union-attr]
                  f"apiKey={DOC_API_KEY}&timestamp=1649729878532".encode())


# -- through the socket agent ---------------------------------------------------------------------


class _Log:
    """An audit sink that keeps what the agent records (flushes succeed)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def record(self, event: str, fields: Any, *, durable: bool = True) -> None:
        self.records.append((event, dict(fields)))

    def flush(self) -> None:
        pass


def _agent(signer: Any, policy: Any = None) -> tuple[Any, _Log]:
    import os

    from broker.agent.server import Agent
    from broker.signing_policy import SigningPolicy

    log = _Log()
    agent = Agent(signer, profile="p", policy=policy or SigningPolicy.from_mapping(None, "x"), audit=log)
    agent.start()
    agent.set_child(os.getpid())
    return agent, log


def test_agent_signs_ws_values_holding_equals_and_ampersand() -> None:
    """Refused through the REST op ("is not NAME=VALUE"); the sign_ws op reads the values as they are."""
    from broker.signing.agent import AgentSigner

    ref = HmacSigner(DOC_API_KEY, Secret(DOC_SECRET))
    agent, log = _agent(HmacSigner(DOC_API_KEY, Secret(DOC_SECRET)))
    try:
        signer = AgentSigner(None, agent.path)
        params = {"symbol": "BTCUSDT", "side": "BUY", "newClientOrderId": "a b+c/=d&e", "quantity": "0.01",
                  "price": "100", "type": "LIMIT"}
        signed = signer.sign_ws_params(params, method="order.place", timestamp=1700000000000)
        assert signed == ref.sign_ws_params(params, timestamp=1700000000000)
        # The docs' HMAC example through the agent.
        assert signer.sign_ws_params(DOC_PARAMS, method="order.place")["signature"] == DOC_SIGNATURE
        event, fields = log.records[0]
        assert event == "signed" and fields["ws_method"] == "order.place" and fields["endpoint"] == "/api/v3/order"
        assert "newClientOrderId" in fields["params"] and "a b+c" not in json.dumps(log.records)
        signer.close()
    finally:
        agent.stop()


def test_agent_ws_policy_reads_the_method_and_the_real_values() -> None:
    from broker.signing.agent import AgentSigner
    from broker.signing_policy import PolicyRefused, SigningPolicy

    policy = SigningPolicy.from_mapping({"symbols": ["BTCUSDT"], "max_quantity": 1,
                                         "deny_endpoints": ["/api/v3/myTrades"]}, "f: profiles.p.policy")
    agent, log = _agent(HmacSigner(DOC_API_KEY, Secret(DOC_SECRET)), policy)
    try:
        signer = AgentSigner(None, agent.path)
        with pytest.raises(PolicyRefused) as info:
            signer.sign_ws_params({"symbol": "XRPUSDT", "quantity": "0.1"}, method="order.place")
        assert info.value.rule == "symbols"
        with pytest.raises(PolicyRefused) as info:
            signer.sign_ws_params({"symbol": "BTCUSDT", "quantity": "2"}, method="order.place")
        assert info.value.rule == "max_quantity"
        with pytest.raises(PolicyRefused) as info:  # myTrades stands for GET /api/v3/myTrades
            signer.sign_ws_params({"symbol": "BTCUSDT"}, method="myTrades")
        assert info.value.rule == "deny_endpoints"
        # A value that would smuggle a second parameter into a REST query is one value here.
        assert signer.sign_ws_params({"symbol": "BTCUSDT", "newClientOrderId": "x&quantity=5"},
                                     method="order.place")["signature"]
        assert [e for e, _ in log.records] == ["policy_refused"] * 3 + ["signed"]
    finally:
        agent.stop()


def test_agent_ws_logon_needs_an_ed25519_key() -> None:
    from broker.signing.agent import AgentSigner
    from broker.signing.ed25519 import Ed25519Signer

    agent, _ = _agent(HmacSigner(DOC_API_KEY, Secret(DOC_SECRET)))
    try:
        with pytest.raises(SigningError, match="session.logon needs an Ed25519 key; this profile's key is hmac"):
            AgentSigner(None, agent.path).ws_logon()
    finally:
        agent.stop()
    key = _ed25519()
    agent, log = _agent(Ed25519Signer(DOC_API_KEY, Secret(_pem(key))))
    try:
        request = AgentSigner(None, agent.path).ws_logon(timestamp=1649729878532)
        key.public_key().verify(base64.b64decode(request["params"]["signature"]),
                                f"apiKey={DOC_API_KEY}&timestamp=1649729878532".encode())
        assert log.records[-1][1]["ws_method"] == "session.logon"
    finally:
        agent.stop()


def test_agent_ws_refuses_another_api_key_and_malformed_params() -> None:
    """The agent itself (a raw client, not AgentSigner) signs only for its own key, and only string values."""
    import socket

    from broker.unixsock import frame, recv_message

    agent, log = _agent(HmacSigner(DOC_API_KEY, Secret(DOC_SECRET)))
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(agent.path))
            sock.sendall(frame({"op": "sign_ws", "p": {"apiKey": "B" * 64, "timestamp": "1"}, "wm": "order.place"}))
            reply = recv_message(sock)
            assert not reply["ok"] and reply["error"]["rule"] == "api_key"
            sock.sendall(frame({"op": "sign_ws", "p": {"apiKey": DOC_API_KEY, "n": {"a": 1}}, "wm": "order.place"}))
            reply = recv_message(sock)
            assert not reply["ok"] and "malformed sign_ws" in reply["error"]["message"]
            sock.sendall(frame({"op": "sign_ws", "p": {"apiKey": DOC_API_KEY, "timestamp": "1"}, "api": "coin"}))
            assert not recv_message(sock)["ok"]
        assert [e for e, _ in log.records] == ["policy_refused"]
    finally:
        agent.stop()
