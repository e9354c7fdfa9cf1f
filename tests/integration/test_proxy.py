"""The signing proxy (`credbroker run --proxy`): checks, re-signs and forwards a bot's Binance requests.

Against tests/helpers/fake_binance.py, which verifies signatures as Binance documents.
In-process tests drive ``broker.proxy.server.SigningProxy`` with ``requests``
(the test process itself is the allowed tree: ``allow_root=True``); the end to
end tests run binance-connector under the real `credbroker run --proxy` with
the key in OpenBao.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from broker.errors import ConfigError
from broker.proxy.clientkey import ClientKey
from broker.proxy.settings import ProxySettings
from broker.secret import Secret
from broker.signing import core
from broker.signing.hmac_sha256 import HmacSigner
from broker.signing_policy import SigningPolicy
from tests.conftest import OpenBao, credbroker_bin
from tests.helpers.auditlog import audit_records
from tests.helpers.fake_binance import FakeBinance
from tests.helpers.proxy import (  # noqa: F401 - fake is a fixture
    API_KEY,
    BINANCE_SDK,
    Harness,
    fake,
    proxy_profile,
    python_binance,
    real_signer,
)

BOT = Path(__file__).resolve().parent.parent / "helpers" / "proxy_bot.py"


@pytest.fixture
def harness(fake: FakeBinance) -> Iterator[Harness]:
    h = Harness(fake)
    try:
        yield h
    finally:
        h.close()


ORDER = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01",
         "price": "100", "newClientOrderId": "a/b c+d"}


@pytest.mark.parametrize("kind", ["hmac", "ed25519", "rsa"])
def test_order_is_re_signed_with_the_real_key_and_the_answer_comes_back_unchanged(
        fake: FakeBinance, kind: str) -> None:
    h = Harness(fake, kind)
    try:
        r = h.session.post(h.url + "/fapi/v1/order", data=ORDER, auth=h.client())
        assert r.status_code == 200, r.text
        assert r.json()["clientOrderId"] == "a/b c+d"
        assert r.headers["X-MBX-USED-WEIGHT-1M"] == "1"  # the exchange's headers pass through
        seen = fake.signed()[-1]
        assert seen.status == 200 and seen.params["newClientOrderId"] == "a/b c+d"
        # The exchange never saw the client's signature, only the real key's.
        assert h.client().sign(seen.raw_query + seen.raw_body.rsplit("&signature=", 1)[0]) not in seen.raw_body
        # GET with the signature in the query string, and the API-key-only listenKey calls.
        assert h.session.get(h.url + "/fapi/v2/balance", auth=h.client()).status_code == 200
        lk = h.session.post(h.url + "/fapi/v1/listenKey", headers={"X-MBX-APIKEY": API_KEY})
        assert lk.status_code == 200 and "listenKey" in lk.json()
        requests_ = h.events("proxy_request")
        assert [r["endpoint"] for r in requests_] == ["/fapi/v1/order", "/fapi/v2/balance", "/fapi/v1/listenKey"]
        assert requests_[0]["symbol"] == "BTCUSDT" and requests_[0]["signed"] is True
        assert requests_[0]["pid"] == os.getpid()
    finally:
        h.close()


def test_a_signature_not_made_with_the_proxy_secret_is_refused_and_not_forwarded(
        harness: Harness, fake: FakeBinance) -> None:
    wrong = HmacSigner(API_KEY, Secret(secrets.token_hex(32)))
    r = harness.session.post(harness.url + "/fapi/v1/order", data=ORDER, auth=wrong)
    assert r.status_code == 400 and r.json()["code"] == -1022
    # The real key signs nothing for it: the request never reaches the exchange.
    assert fake.signed() == []
    refused = harness.events("proxy_refused")
    assert refused[-1]["rule"] == "client_signature"
    # An unsigned copy of a signed endpoint is forwarded unsigned: the exchange refuses it itself.
    r = harness.session.post(harness.url + "/fapi/v1/order", data=ORDER, headers={"X-MBX-APIKEY": API_KEY})
    assert r.json()["code"] == -1102


def test_a_python_binance_style_signature_over_unencoded_values_is_accepted_and_re_signed(
        harness: Harness, fake: FakeBinance) -> None:
    """python-binance signs ``a/b c`` but sends ``a%2Fb+c``: Binance answers -1022; through the proxy it works."""
    from urllib.parse import urlencode

    params = {**ORDER, "timestamp": str(int(__import__("time").time() * 1000))}
    plain = "&".join(f"{k}={v}" for k, v in params.items())  # what python-binance signs
    signature = harness.client().sign(plain)
    body = urlencode({**params, "signature": signature})  # what requests sends (form-encoded)
    headers = {"X-MBX-APIKEY": API_KEY, "Content-Type": "application/x-www-form-urlencoded"}
    direct_secret = secrets.token_hex(32)  # the same bug straight at the exchange: -1022
    fake.add_hmac("D" * 64, direct_secret)
    direct_sig = HmacSigner("D" * 64, Secret(direct_secret)).sign(plain)
    direct = requests.post(fake.url + "/fapi/v1/order", data=urlencode({**params, "signature": direct_sig}),
                           headers={**headers, "X-MBX-APIKEY": "D" * 64})
    assert direct.json()["code"] == -1022
    r = harness.session.post(harness.url + "/fapi/v1/order", data=body, headers=headers)
    assert r.status_code == 200, r.text
    assert fake.signed()[-1].params["newClientOrderId"] == "a/b c+d"


def test_the_policy_binds_the_real_endpoint(fake: FakeBinance) -> None:
    policy = SigningPolicy.from_mapping({"symbols": ["BTCUSDT"], "max_quantity": 0.5}, "test.policy")
    h = Harness(fake, policy=policy)
    try:
        client = h.client()
        for path in ("/sapi/v1/capital/withdraw/apply", "/sapi/v1/capital/WITHDRAW/apply"):
            r = h.session.post(h.url + path, data={"coin": "BTC", "amount": "1"}, auth=client)
            assert r.status_code == 403 and r.json()["code"] == -1002, path
        r = h.session.post(h.url + "/SAPI/v1/capital/withdraw/apply", data={"coin": "BTC"}, auth=client)
        assert r.status_code == 404  # not a prefix the proxy serves
        # Paths the exchange might read differently from us are refused outright.
        for path in ("//sapi/v1/capital/withdraw/apply", "/sapi/v1/capital/./withdraw/apply",
                     "/sapi/v1/capital/%77ithdraw/apply", "/fapi/v1/../../sapi/v1/capital/withdraw/apply"):
            r = h.session.send(_raw(h.url, path, client))
            assert r.status_code in (400, 403, 404), (path, r.status_code)
        # A path with a line break at its end: "$" in a regex matches before it, fnmatch does not, so it
        # once passed the canonical check and escaped the endpoint denial. (The HTTP reader refuses a
        # bare LF in a request head before this; handle() is the check itself.)
        body = client.sign_params({"coin": "BTC", "amount": "1"})
        answer = h.proxy.handle("POST", "/sapi/v1/capital/withdraw/apply\n", {"Content-Type": "application/x-www-form-urlencoded"}, body.encode(),
                                None)
        assert answer.status == 400 and b"canonical" in answer.body
        batch = json.dumps([{"symbol": "BTCUSDT", "side": "BUY", "quantity": "0.1", "type": "MARKET"},
                            {"symbol": "ETHUSDT", "side": "BUY", "quantity": "0.1", "type": "MARKET"}])
        r = h.session.post(h.url + "/fapi/v1/batchOrders", data={"batchOrders": batch}, auth=client)
        assert r.status_code == 403 and "ETHUSDT" in r.json()["msg"]
        r = h.session.post(h.url + "/fapi/v1/order", data={**ORDER, "quantity": "1"}, auth=client)
        assert r.status_code == 403 and "max_quantity" in r.json()["msg"]
        assert fake.signed() == []
        rules = [f["rule"] for f in h.events("policy_refused")] + [f["rule"] for f in h.events("proxy_refused")]
        assert "deny_kinds:withdraw" in rules and "symbols" in rules and "max_quantity" in rules
        r = h.session.post(h.url + "/fapi/v1/order", data=ORDER, auth=client)
        assert r.status_code == 200
    finally:
        h.close()


def test_an_exact_denied_endpoint_with_a_line_break_at_its_end_is_refused(fake: FakeBinance) -> None:
    """'$' in the canonical-path regex matched before a final newline, and an exact deny_endpoints entry
    (fnmatch) does not match '/fapi/v1/order<LF>': it was re-signed and sent (a 502 here, from the fake
    exchange that could not read the request line). Patterns ending in '*' (the deny_kinds ones) did match."""
    h = Harness(fake, policy=SigningPolicy.from_mapping({"deny_endpoints": ["/fapi/v1/order"]}, "test.policy"))
    try:
        body = h.client().sign_params(ORDER).encode()
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        assert h.proxy.handle("POST", "/fapi/v1/order", form, body, None).status == 403
        answer = h.proxy.handle("POST", "/fapi/v1/order\n", form, body, None)
        assert answer.status == 400 and b"canonical" in answer.body
        assert fake.signed() == []
    finally:
        h.close()


def test_a_percent_encoded_signature_or_timestamp_name_is_read_as_the_exchange_reads_it(fake: FakeBinance) -> None:
    """The exchange decodes parameter names: '%73ignature' is its signature. Read as another parameter, it
    made the request look unsigned, and an unsigned request goes on without the policy."""
    policy = SigningPolicy.from_mapping({"symbols": ["BTCUSDT"]}, "test.policy")
    h = Harness(fake, policy=policy)
    try:
        client = h.client()
        headers = {**client.headers(), "Content-Type": "application/x-www-form-urlencoded"}
        other = client.sign_params({**ORDER, "symbol": "ETHUSDT"})
        r = h.session.post(h.url + "/fapi/v1/order", data=other.replace("&signature=", "&%73ignature="),
                           headers=headers)
        assert r.status_code == 403 and "ETHUSDT" in r.json()["msg"]
        assert not [q for q in fake.requests if q.params.get("symbol") == "ETHUSDT"]
        # (Signed before the name is encoded: the proxy also takes the decoded form, as python-binance signs.)
        plain = {k: v for k, v in ORDER.items() if k != "newClientOrderId"}
        allowed = client.sign_params(plain).replace("&signature=", "&%73ignature=").replace(
            "timestamp=", "%74imestamp=")
        r = h.session.post(h.url + "/fapi/v1/order", data=allowed, headers=headers)
        assert r.status_code == 200, r.text
        sent = fake.signed()[-1]
        assert sent.status == 200 and "%73ignature" not in sent.raw_body and "%74imestamp" not in sent.raw_body
    finally:
        h.close()


def _raw(base: str, path: str, signer: Any) -> requests.PreparedRequest:
    req = requests.Request("POST", base + "/fapi/v1/order", data={"coin": "BTC"}, auth=signer).prepare()
    req.url = base + path
    return req


def test_recv_window_above_60000_and_stale_timestamps_are_refused(harness: Harness, fake: FakeBinance) -> None:
    client = harness.client()
    r = harness.session.get(harness.url + "/fapi/v2/balance?" + client.sign_params({}, recv_window=None)
                            .replace("timestamp=", "recvWindow=60001&timestamp=", 1),
                            headers=client.headers())
    assert r.json()["code"] in (-1131, -1022)
    query = client.sign_params({"recvWindow": 60001}, recv_window=None)
    r = harness.session.get(harness.url + "/fapi/v2/balance?" + query, headers=client.headers())
    assert r.status_code == 400 and r.json()["code"] == -1131
    stale = client.sign_params({}, timestamp=1_000_000)
    r = harness.session.get(harness.url + "/fapi/v2/balance?" + stale, headers=client.headers())
    assert r.json()["code"] == -1021
    assert fake.signed() == []


def test_a_host_clock_off_by_seconds_still_signs_valid_timestamps(fake: FakeBinance) -> None:
    fake.clock_offset_ms = 12_000  # the exchange is 12 s ahead: a direct request would get -1021
    h = Harness(fake)
    try:
        r = h.session.get(h.url + "/fapi/v2/balance", auth=h.client())
        assert r.status_code == 200, r.text
        # The exchange's clock jumps again: one -1021 (recorded with its code), a re-sync, then it works.
        fake.clock_offset_ms = -20_000
        r = h.session.get(h.url + "/fapi/v2/balance", auth=h.client())
        assert r.status_code == 400 and r.json()["code"] == -1021
        failures = h.events("signature_failure")
        assert failures and failures[-1]["code"] == -1021 and failures[-1]["by"] == "proxy"
        assert h.events("proxy_clock_synced")[-1]["reason"] == "-1021"
        r = h.session.get(h.url + "/fapi/v2/balance", auth=h.client())
        assert r.status_code == 200, r.text
    finally:
        h.close()


def test_the_exchange_s_signature_failures_are_recorded_with_their_code(harness: Harness, fake: FakeBinance) -> None:
    fake.add_hmac(API_KEY, secrets.token_hex(32))  # the exchange now knows another secret for this key
    r = harness.session.post(harness.url + "/fapi/v1/order", data=ORDER, auth=harness.client())
    assert r.status_code == 400 and r.json() == {"code": -1022, "msg": "Signature for this request is not valid."}
    failure = harness.events("signature_failure")[-1]
    assert failure["code"] == -1022 and failure["endpoint"].endswith("/fapi/v1/order")
    harness.proxy.drain()
    assert API_KEY not in json.dumps(harness.records)  # masked to its last 4 characters


def test_a_wrong_api_key_header_and_unknown_paths_are_refused(harness: Harness, fake: FakeBinance) -> None:
    r = harness.session.post(harness.url + "/fapi/v1/listenKey", headers={"X-MBX-APIKEY": "X" * 64})
    assert r.status_code == 401 and r.json()["code"] == -2015
    r = harness.session.get(harness.url + "/v1/sys/health")
    assert r.status_code == 404
    assert fake.requests == [r_ for r_ in fake.requests if r_.path.endswith("/time")]


def _peer_script(url: str) -> list[str]:
    code = ("import sys, urllib.request, urllib.error\n"
            "try:\n    print(urllib.request.urlopen(sys.argv[1] + '/api/v3/time').status)\n"
            "except urllib.error.HTTPError as e:\n    print(e.code, e.read().decode())\n")
    return [sys.executable, "-c", code, url]


def test_only_the_bots_process_tree_may_connect(fake: FakeBinance) -> None:
    # The tree is this test process's; the test process itself (the broker's place) is not allowed.
    h = Harness(fake, allow_root=False)
    try:
        r = h.session.get(h.url + "/api/v3/time")
        assert r.status_code == 403 and "may not use the proxy" in r.json()["msg"]
        child = subprocess.run(_peer_script(h.url), capture_output=True, text=True, timeout=60)
        assert child.stdout.strip() == "200", child.stdout + child.stderr
    finally:
        h.close()
    # A tree the client is not part of: refused, and recorded.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    h = Harness(fake, root_pid=sleeper.pid, allow_root=False)
    try:
        outsider = subprocess.run(_peer_script(h.url), capture_output=True, text=True, timeout=60)
        assert outsider.stdout.startswith("403") and "no process of the bot's tree" in outsider.stdout
        assert h.events("proxy_refused")[-1]["rule"] == "peer"
    finally:
        h.close()
        sleeper.kill()
        sleeper.wait()


def test_proxy_settings_refuse_plain_http_except_loopback_by_the_unsafe_switch() -> None:
    with pytest.raises(ConfigError, match="plain HTTP to another host"):
        ProxySettings.from_mapping({"futures": "http://fapi.binance.com", "unsafe_plain_http_loopback": True}, "t")
    with pytest.raises(ConfigError, match="unsafe_plain_http_loopback"):
        ProxySettings.from_mapping({"futures": "http://127.0.0.1:1"}, "t")
    with pytest.raises(ConfigError, match="unknown key"):
        ProxySettings.from_mapping({"futurs": "https://x"}, "t")
    assert ProxySettings.from_mapping({"testnet": True}, "t").futures == "https://testnet.binancefuture.com"
    assert ProxySettings.from_mapping(None, "t").spot == "https://api.binance.com"
    # urlsplit raises ValueError for an unclosed IPv6 bracket, .port for a port that is none: once internal errors.
    for bad in ("https://[::1", "https://fapi.binance.com:99999", "https://fapi.binance.com:port"):
        with pytest.raises(ConfigError, match="is not a base URL"):
            ProxySettings.from_mapping({"futures": bad}, "t")


def test_client_keys_verify_only_their_own_signatures() -> None:
    for kind in ("hmac", "ed25519", "rsa"):
        key, other = ClientKey(kind), ClientKey(kind)
        payload = b"symbol=BTCUSDT&timestamp=1"
        if kind == "hmac":
            sig = core.hmac_sha256_hex(key.secret.reveal(), payload)
        else:
            _, obj = core.load_private_key(key.secret.reveal())
            sig = (core.ed25519_sign_b64 if kind == "ed25519" else core.rsa_sign_b64)(obj, payload)
        assert key.verify(payload, sig) and not other.verify(payload, sig)
        assert not key.verify(payload + b"1", sig)
        assert repr(key) == f"ClientKey(kind={kind!r})"
    encrypted = ClientKey("ed25519", encrypted=True)
    assert encrypted.passphrase is not None
    with pytest.raises(Exception, match="encrypted"):
        core.load_private_key(encrypted.secret.reveal())
    assert core.load_private_key(encrypted.secret.reveal(), encrypted.passphrase.reveal())[0] == "ed25519"


# -- end to end: binance-connector under `credbroker run --proxy`, the key in OpenBao ------------------


@pytest.mark.parametrize("kind, passphrase, mapped", [
    ("hmac", None, False), ("ed25519", None, False), ("rsa", None, False),
    ("ed25519", "encrypted", False),  # passphrase unmapped: the broker reads it anyway
    ("ed25519", "encrypted", True),   # mapped: the bot gets an encrypted stand-in and a per-run passphrase
])
def test_binance_connector_bot_trades_through_the_proxy_without_the_secret(
        openbao: OpenBao, tmp_path: Path, fake: FakeBinance, kind: str, passphrase: str | None,
        mapped: bool) -> None:
    if passphrase:
        passphrase = "pp " + secrets.token_hex(8)
    secret = proxy_profile(openbao, tmp_path, fake, kind, passphrase, mapped)
    fake.clock_offset_ms = 8_000  # this host's clock is 8 s behind the exchange's
    state = tmp_path / "state-bot"
    state.mkdir()
    proc = subprocess.run([credbroker_bin(), "run", "--proxy", "-p", "bot", "--", sys.executable, str(BOT),
                           str(state)], env=openbao.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING: unsafe_plain_http_loopback" in proc.stderr
    out = json.loads((state / "result.json").read_text())
    res = out["results"]
    assert res["order"]["clientOrderId"] == "cb/1 x" and res["order"]["status"] == "NEW"
    assert [o["symbol"] for o in res["batch"]] == ["BTCUSDT", "ETHUSDT"]
    assert res["balance"][0]["asset"] == "USDT"
    assert res["account"]["balances"][0]["asset"] == "USDT"
    assert res["cancel"]["status"] == "CANCELED"
    assert "listenKey" in res["listen_key"] and res["listen_key_renew"] == {} and res["listen_key_close"] == {}
    assert "listenKey" in res["futures_listen_key"] and res["futures_listen_key_renew"] == {}
    assert res["withdraw"]["status"] == 403 and res["other_symbol"]["status"] == 403
    # The bot never held the real key: its environment has the proxy's stand-in.
    environ = out["environ"]
    needle = secret.strip().splitlines()[1] if kind != "hmac" else secret
    assert needle not in json.dumps(environ)
    assert environ["CREDBROKER_KEY_KIND"] == kind and environ["CREDBROKER_PROXY_URL"].startswith("http://127.0.0.1:")
    assert "VAULT_TOKEN" not in environ
    if passphrase:
        assert passphrase not in json.dumps(environ)
        assert ("BINANCE_PRIVATE_KEY_PASSPHRASE" in environ) == mapped
        assert ("ENCRYPTED" in environ["BINANCE_PRIVATE_KEY"]) == mapped
    # Every request the exchange saw is signed with the real key and valid.
    assert all(r.status == 200 for r in fake.requests), [(r.path, r.code) for r in fake.requests]
    assert "cb/1 x" in {r.params.get("newClientOrderId") for r in fake.requests}
    records = audit_records()
    forwarded = [r["data"] for r in records if r["event"] == "proxy_request"]
    assert {f["endpoint"] for f in forwarded} >= {"/api/v3/order", "/fapi/v1/batchOrders", "/fapi/v2/balance",
                                                   "/api/v3/account", "/api/v3/userDataStream",
                                                   "/fapi/v1/listenKey"}
    assert {f["pid"] for f in forwarded} == {out["pid"]}
    refused = [r["data"] for r in records if r["event"] in ("policy_refused", "proxy_refused")]
    assert {r["rule"] for r in refused} == {"deny_kinds:withdraw", "symbols"}
    started = next(r["data"] for r in records if r["event"] == "proxy_started")
    assert started["kind"] == kind and 7_000 < started["clock_offset_ms"]["futures"] < 9_000
    assert started["rate_limits"]["futures"]["weight_1m"] == 2400 and started["rate_limits"]["spot"]["orders_10s"] == 100
    stopped = next(r["data"] for r in records if r["event"] == "proxy_stopped")
    assert stopped["forwarded"] == len(forwarded) and stopped["refused"] == 2
    text = json.dumps(records) + proc.stdout + proc.stderr
    for word in (secret if kind == "hmac" else needle, "signature="):
        assert word not in text


def test_proxy_refuses_agent_and_a_bad_proxy_table_before_any_fetch(openbao: OpenBao, tmp_path: Path,
                                                                   fake: FakeBinance) -> None:
    proxy_profile(openbao, tmp_path, fake, "hmac")
    proc = subprocess.run([credbroker_bin(), "run", "--proxy", "--agent", "-p", "bot", "--", "true"],
                          env=openbao.env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 125 and "--proxy and --agent exclude each other" in proc.stderr
    proc = subprocess.run([credbroker_bin(), "run", "--proxy", "--on-rotate", "restart", "-p", "bot", "--", "true"],
                          env=openbao.env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 125 and "--on-rotate does not apply to --proxy" in proc.stderr
    text = (tmp_path / "credbroker.toml").read_text().replace(f'spot = "{fake.url}"', 'spot = "http://example.com"')
    (tmp_path / "credbroker.toml").write_text(text)
    proc = subprocess.run([credbroker_bin(), "run", "--proxy", "-p", "bot", "--", "true"],
                          env=openbao.env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 125 and "plain HTTP to another host" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not [r for r in audit_records() if r["event"] == "secret_fetched"]


# -- encrypted PEM keys: the passphrase is read whenever the key needs it ------------------------------

ENV_BOT = """
import json, os, sys, requests
from broker import get_signer
signer = get_signer()
url = os.environ["CREDBROKER_PROXY_URL"] if sys.argv[1] == "proxy" else sys.argv[1]
r = requests.get(url + "/fapi/v2/balance", auth=signer)
print(json.dumps({"kind": os.environ.get("CREDBROKER_KEY_KIND"), "signer": signer.kind, "status": r.status_code}))
"""


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_an_encrypted_key_works_in_env_mode_although_its_passphrase_is_not_mapped(
        openbao: OpenBao, tmp_path: Path, fake: FakeBinance, kind: str) -> None:
    proxy_profile(openbao, tmp_path, fake, kind, passphrase="s3cret pass")
    proc = subprocess.run([credbroker_bin(), "run", "-p", "bot", "--", sys.executable, "-c", ENV_BOT, fake.url],
                          env=openbao.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout) == {"kind": kind, "signer": kind, "status": 200}
    # get_signer(profile=...) outside a run reads it too.
    from broker.signing import get_signer

    signer = get_signer(profile="bot", env=openbao.env())
    try:
        assert signer.kind == kind
        assert requests.get(fake.url + "/fapi/v2/balance", auth=signer).status_code == 200
    finally:
        signer.close()


def test_the_child_learns_the_key_kind_of_an_hmac_key(openbao: OpenBao, tmp_path: Path, fake: FakeBinance) -> None:
    proxy_profile(openbao, tmp_path, fake, "hmac")
    proc = subprocess.run([credbroker_bin(), "run", "-p", "bot", "--", sys.executable, "-c", ENV_BOT, fake.url],
                          env=openbao.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout) == {"kind": "hmac", "signer": "hmac", "status": 200}


def test_an_encrypted_key_without_a_stored_passphrase_stops_the_run_with_one_line(
        openbao: OpenBao, tmp_path: Path, fake: FakeBinance) -> None:
    proxy_profile(openbao, tmp_path, fake, "ed25519", passphrase="s3cret pass")
    text = (tmp_path / "credbroker.toml").read_text()
    kv = text.split('path = "secret/', 1)[1].split('"', 1)[0]
    data = openbao.client().secrets.kv.v2.read_secret_version(path=kv, mount_point="secret", raise_on_deleted_version=True)["data"]["data"]
    data.pop("private_key_passphrase")
    openbao.kv_put(kv, **data)
    proc = subprocess.run([credbroker_bin(), "run", "-p", "bot", "--", "true"], env=openbao.env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 125
    assert "encrypted and its passphrase could not be read from the field 'private_key_passphrase'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2 and "Traceback" not in proc.stderr


# -- the exchange's clock, for get_signer() ----------------------------------------------------------


def test_a_signer_learns_the_exchange_clock_after_a_1021(fake: FakeBinance) -> None:
    from broker.errors import SigningError
    from broker.signing import binance

    signer = real_signer(fake, "hmac")
    fake.clock_offset_ms = 15_000
    r = requests.get(fake.url + "/fapi/v2/balance", auth=signer)
    assert r.json()["code"] == -1021
    assert 14_000 < signer.clock_offset_ms < 16_000  # the hook asked /fapi/v1/time
    assert fake.requests[-1].path == "/fapi/v1/time"
    assert requests.get(fake.url + "/fapi/v2/balance", auth=signer).status_code == 200
    assert requests.get(fake.url + "/api/v3/account", auth=signer).status_code == 200
    assert binance.time_url("https://api.binance.com/api/v3/order?x=1") == "https://api.binance.com/api/v3/time"
    assert binance.time_url("https://fapi.binance.com") == "https://fapi.binance.com/fapi/v1/time"
    with pytest.raises(SigningError, match="not an exchange URL"):
        binance.time_url("https://[::1/fapi/v1/order")  # urlsplit's ValueError, once
    with pytest.raises(SigningError, match="recvWindow"):
        signer.sign_params({"symbol": "BTCUSDT"}, recv_window=60001)


def test_get_signer_learns_the_exchange_clock_at_start(openbao: OpenBao, tmp_path: Path, fake: FakeBinance) -> None:
    proxy_profile(openbao, tmp_path, fake, "ed25519")
    with (tmp_path / "credbroker.toml").open("a") as f:
        f.write(f'\n[profiles.bot.signer]\nexchange_url = "{fake.url}"\n')
    fake.clock_offset_ms = -30_000  # this host's clock is 30 s ahead of the exchange's
    # Inside `credbroker run` (env mode) and with a profile: the first request is already valid.
    proc = subprocess.run([credbroker_bin(), "run", "-p", "bot", "--", sys.executable, "-c", ENV_BOT, fake.url],
                          env=openbao.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["status"] == 200
    from broker.signing import get_signer

    signer = get_signer(profile="bot", env=openbao.env())
    try:
        assert -31_000 < signer.clock_offset_ms < -29_000
        assert requests.get(fake.url + "/fapi/v2/balance", auth=signer).status_code == 200
    finally:
        signer.close()
    assert all(r.code != -1021 for r in fake.requests)


# -- python-binance, from its own venv: its encoding bug disappears through the proxy ----------------
# (the client libraries' venvs, .venv-clients/, are described in tests/helpers/proxy.py)

@pytest.mark.parametrize("kind, client_key", [("hmac", "same"), ("ed25519", "same"), ("ed25519", "hmac"),
                                              ("rsa", "same")])
def test_python_binance_encoding_bug_disappears_through_the_proxy(
        openbao: OpenBao, tmp_path: Path, fake: FakeBinance, kind: str, client_key: str) -> None:
    python = python_binance()
    bot = str(Path(__file__).resolve().parent.parent / "helpers" / "proxy_bot_python_binance.py")
    secret = proxy_profile(openbao, tmp_path, fake, kind)
    text = (tmp_path / "credbroker.toml").read_text()
    (tmp_path / "credbroker.toml").write_text(text.replace("[profiles.bot.proxy]\n",
                                                           f'[profiles.bot.proxy]\nclient_key = "{client_key}"\n'))
    state = tmp_path / "state-pb"
    state.mkdir()
    env = {**openbao.env(), "PYTHONPATH": ""}  # the bot runs on python-binance's venv only
    # Straight at the exchange (env mode): python-binance's own bug, -1022 for a '/' or a space.
    direct = subprocess.run([credbroker_bin(), "run", "-p", "bot", "--", python, bot, str(state), "direct",
                             fake.url], env=env, capture_output=True, text=True, timeout=120)
    assert direct.returncode == 0, direct.stdout + direct.stderr
    res = json.loads((state / "result-direct.json").read_text())["results"]
    assert res["order"]["error"] == -1022 and res["spot_order"]["error"] == -1022
    assert res["plain_order"]["clientOrderId"] == "plain1"  # the same call without '/' or ' ' works
    # Through the proxy: every call works, the clientOrderId arrives exactly as the bot wrote it.
    proc = subprocess.run([credbroker_bin(), "run", "--proxy", "-p", "bot", "--", python, bot, str(state), "proxy"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads((state / "result-proxy.json").read_text())
    res = out["results"]
    assert res["order"]["clientOrderId"] == "cb/1 x" and res["spot_order"]["clientOrderId"] == "cb/2 y"
    if kind == "hmac" or client_key == "hmac":
        assert res["batch"][0]["clientOrderId"] == "b1"
    else:  # python-binance crashes on a batch order with a PEM key before sending it: client_key = "hmac" avoids it
        assert res["batch"] == {"crash": "ValueError"}
    assert out["environ"]["CREDBROKER_KEY_KIND"] == (kind if client_key == "same" else "hmac")
    assert res["balance"][0]["asset"] == "USDT" and res["account"]["balances"][0]["asset"] == "USDT"
    assert res["cancel"]["status"] == "CANCELED"
    assert isinstance(res["listen_key"], str) and res["listen_key_renew"] == {} and res["listen_key_close"] == {}
    needle = secret if kind == "hmac" else secret.strip().splitlines()[1]
    assert needle not in json.dumps(out["environ"])


@pytest.mark.parametrize("kind", ["hmac", "rsa"])
def test_get_signer_in_a_proxy_child_signs_with_the_stand_in(openbao: OpenBao, tmp_path: Path, fake: FakeBinance,
                                                             kind: str) -> None:
    proxy_profile(openbao, tmp_path, fake, kind)
    proc = subprocess.run([credbroker_bin(), "run", "--proxy", "-p", "bot", "--", sys.executable, "-c", ENV_BOT,
                           "proxy"], env=openbao.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout) == {"kind": kind, "signer": kind, "status": 200}
    assert [r.path for r in fake.signed()] == ["/fapi/v2/balance"] and fake.signed()[0].status == 200


def _tls_context(tmp: Path) -> tuple[Any, str]:
    """A server TLS context for 127.0.0.1 with a fresh self-signed certificate; (context, its PEM file)."""
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake binance")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp / "fake-cert.pem", tmp / "fake-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx, str(cert_file)


def test_the_exchange_is_reached_over_verified_tls_on_kept_alive_connections(tmp_path: Path) -> None:
    ctx, ca_file = _tls_context(tmp_path)
    fake = FakeBinance().start(tls=ctx)
    try:
        assert fake.url.startswith("https://127.0.0.1:")
        h = Harness(fake, ca_file=ca_file)
        try:
            for _ in range(3):
                r = h.session.get(h.url + "/fapi/v2/balance", auth=h.client())
                assert r.status_code == 200, r.text
            signed = fake.signed()
            assert len(signed) == 3 and len({r.client_port for r in signed}) == 1  # one kept-alive connection
        finally:
            h.close()
        # The same exchange with the default trust (certifi's bundle): its certificate is refused.
        h = Harness(fake, sync=False)
        try:
            r = h.session.get(h.url + "/fapi/v2/balance", auth=h.client())
            assert r.status_code == 502 and "cannot reach the exchange" in r.json()["msg"]
            assert "SSLError" in h.events("proxy_answer")[-1]["error"]
            assert len(fake.signed()) == 3
        finally:
            h.close()
    finally:
        fake.stop()


def test_a_transit_key_signs_inside_vault_for_a_binance_connector_bot(
        openbao: OpenBao, tmp_path: Path, fake: FakeBinance) -> None:
    from tests.helpers.transit_proxy import write_transit_proxy_profile

    write_transit_proxy_profile(openbao, tmp_path, fake, API_KEY, rest_url=fake.url,
                                tail='\n[profiles.bot.policy]\nsymbols = ["BTCUSDT", "ETHUSDT"]\n')
    state = tmp_path / "state-bot"
    state.mkdir()
    proc = subprocess.run([credbroker_bin(), "run", "--proxy", "-p", "bot", "--", sys.executable, str(BOT),
                           str(state)], env=openbao.env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads((state / "result.json").read_text())
    res = out["results"]
    assert res["order"]["clientOrderId"] == "cb/1 x" and res["balance"][0]["asset"] == "USDT"
    assert [o["symbol"] for o in res["batch"]] == ["BTCUSDT", "ETHUSDT"]
    assert res["withdraw"]["status"] == 403
    environ = out["environ"]
    assert environ["CREDBROKER_KEY_KIND"] == "ed25519"
    # No Vault token of any kind reaches the bot: the proxy signs with the broker's.
    assert not {"VAULT_TOKEN", "CREDBROKER_SIGNER_TOKEN", "CREDBROKER_SIGNER"} & set(environ)
    assert openbao.token not in json.dumps(environ)
    assert all(r.status == 200 for r in fake.signed()), [(r.path, r.code) for r in fake.signed()]
    # get_signer() in such a child signs with the stand-in too.
    proc = subprocess.run([credbroker_bin(), "run", "--proxy", "-p", "bot", "--", sys.executable, "-c", ENV_BOT,
                           "proxy"], env=openbao.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout) == {"kind": "ed25519", "signer": "ed25519", "status": 200}


def test_a_signed_body_that_is_not_a_form_is_refused(harness: Harness, fake: FakeBinance) -> None:
    client = harness.client()
    body = client.sign_params({"symbol": "BTCUSDT", "quantity": "1"})
    r = harness.session.post(harness.url + "/fapi/v1/order", data=body,
                             headers={**client.headers(), "Content-Type": "application/json"})
    assert r.status_code == 400 and "x-www-form-urlencoded" in r.json()["msg"]
    assert fake.signed() == []


def test_check_reports_a_bad_proxy_table(openbao: OpenBao, tmp_path: Path, fake: FakeBinance) -> None:
    proxy_profile(openbao, tmp_path, fake, "hmac")
    text = (tmp_path / "credbroker.toml").read_text().replace(f'futures = "{fake.url}"', 'futures = "http://x.test"')
    (tmp_path / "credbroker.toml").write_text(text)
    proc = subprocess.run([credbroker_bin(), "check", "-p", "bot", "--json"], env=openbao.env(),
                          capture_output=True, text=True, timeout=60)
    result = json.loads(proc.stdout)
    assert proc.returncode != 0 and result["ok"] is False
    assert any("plain HTTP to another host" in p for p in result["problems"])


# -- binance-futures-connector, from its own venv (HMAC and RSA only; Ed25519 through an HMAC stand-in) --

FUTURES_CONNECTOR = Path(__file__).resolve().parent.parent.parent / ".venv-clients" / "binance-futures-connector" / "bin" / \
    "python"


@pytest.mark.parametrize("kind, client_key", [("hmac", "same"), ("rsa", "same"), ("ed25519", "hmac")])
def test_binance_futures_connector_trades_through_the_proxy(openbao: OpenBao, tmp_path: Path, fake: FakeBinance,
                                                           kind: str, client_key: str) -> None:
    if not FUTURES_CONNECTOR.exists():
        reason = f"binance-futures-connector's venv {FUTURES_CONNECTOR.parent.parent} is missing (.ci/run makes it)"
        if os.environ.get("CREDBROKER_REQUIRE_SERVICES"):
            pytest.fail(reason)
        pytest.skip(reason)
    bot = str(Path(__file__).resolve().parent.parent / "helpers" / "proxy_bot_futures_connector.py")
    secret = proxy_profile(openbao, tmp_path, fake, kind)
    text = (tmp_path / "credbroker.toml").read_text()
    (tmp_path / "credbroker.toml").write_text(text.replace("[profiles.bot.proxy]\n",
                                                           f'[profiles.bot.proxy]\nclient_key = "{client_key}"\n'))
    state = tmp_path / "state-fc"
    state.mkdir()
    proc = subprocess.run([credbroker_bin(), "run", "--proxy", "-p", "bot", "--", str(FUTURES_CONNECTOR), bot,
                           str(state)], env={**openbao.env(), "PYTHONPATH": ""}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads((state / "result.json").read_text())
    res = out["results"]
    assert res["order"]["clientOrderId"] == "cb/1 x"
    assert res["batch"][0]["clientOrderId"] == "b1"
    assert res["balance"][0]["asset"] == "USDT" and res["cancel"]["status"] == "CANCELED"
    assert "listenKey" in res["listen_key"] and res["listen_key_renew"] == {} and res["listen_key_close"] == {}
    needle = secret if kind == "hmac" else secret.strip().splitlines()[1]
    assert needle not in json.dumps(out["environ"])
    assert all(r.status == 200 for r in fake.requests), [(r.path, r.code) for r in fake.requests]


# -- ccxt (binance, binanceusdm), from its own venv ---------------------------------------------------

CCXT = Path(__file__).resolve().parent.parent.parent / ".venv-clients" / "ccxt" / "bin" / "python"


@pytest.mark.parametrize("kind", ["hmac", "ed25519", "rsa"])
def test_ccxt_trades_through_the_proxy(openbao: OpenBao, tmp_path: Path, fake: FakeBinance, kind: str) -> None:
    if not CCXT.exists():
        reason = f"ccxt's venv {CCXT.parent.parent} is missing (.ci/run makes it)"
        if os.environ.get("CREDBROKER_REQUIRE_SERVICES"):
            pytest.fail(reason)
        pytest.skip(reason)
    bot = str(Path(__file__).resolve().parent.parent / "helpers" / "proxy_bot_ccxt.py")
    secret = proxy_profile(openbao, tmp_path, fake, kind)
    state = tmp_path / "state-ccxt"
    state.mkdir()
    proc = subprocess.run([credbroker_bin(), "run", "--proxy", "-p", "bot", "--", str(CCXT), bot, str(state)],
                          env={**openbao.env(), "PYTHONPATH": ""}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads((state / "result.json").read_text())
    res = out["results"]
    assert res["order"]["clientOrderId"] == "cb/1 x", res
    assert res["spot_order"]["clientOrderId"] == "cb/2 y"
    assert res["batch"][0]["clientOrderId"] == "b1"
    assert res["balance"][0]["asset"] == "USDT" and res["account"]["balances"][0]["asset"] == "USDT"
    assert res["cancel"]["status"] == "CANCELED"
    assert "listenKey" in res["listen_key"] and res["listen_key_renew"] == {} and res["listen_key_close"] == {}
    assert "error" in res["withdraw"]  # refused by the proxy's policy, never sent
    needle = secret if kind == "hmac" else secret.strip().splitlines()[1]
    assert needle not in json.dumps(out["environ"])
    assert all(r.status == 200 for r in fake.requests), [(r.path, r.code) for r in fake.requests]
    assert not [r for r in fake.requests if "withdraw" in r.path]


# -- Binance's modular SDK (USDⓈ-M futures), from its own venv -----------------------------------------

@pytest.mark.parametrize("kind", ["hmac", "ed25519", "rsa"])
def test_binance_modular_sdk_trades_through_the_proxy(openbao: OpenBao, tmp_path: Path, fake: FakeBinance,
                                                      kind: str) -> None:
    if not BINANCE_SDK.exists():
        reason = f"the Binance SDK's venv {BINANCE_SDK.parent.parent} is missing (.ci/run makes it)"
        if os.environ.get("CREDBROKER_REQUIRE_SERVICES"):
            pytest.fail(reason)
        pytest.skip(reason)
    bot = str(Path(__file__).resolve().parent.parent / "helpers" / "proxy_bot_binance_sdk.py")
    secret = proxy_profile(openbao, tmp_path, fake, kind)
    state = tmp_path / "state-sdk"
    state.mkdir()
    proc = subprocess.run([credbroker_bin(), "run", "--proxy", "-p", "bot", "--", str(BINANCE_SDK), bot, str(state)],
                          env={**openbao.env(), "PYTHONPATH": ""}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads((state / "result.json").read_text())
    res = out["results"]
    assert res["order"]["status"] == 200 and res["order"]["data"]["clientOrderId"] == "cb/1 x", res
    assert res["batch"]["data"][0]["clientOrderId"] == "b1"
    assert res["balance"]["data"][0]["asset"] == "USDT" and res["cancel"]["data"]["status"] == "CANCELED"
    assert res["listen_key"]["data"]["listenKey"]
    assert res["listen_key_renew"]["status"] == 200 and res["listen_key_close"]["status"] == 200
    needle = secret if kind == "hmac" else secret.strip().splitlines()[1]
    assert needle not in json.dumps(out["environ"])
    assert all(r.status == 200 for r in fake.requests), [(r.path, r.code) for r in fake.requests]


# -- rotation under --proxy: the proxy picks up a rotated key, the bot runs on -----------------------

ROTATION_BOT = """
import json, os, sys, time, requests
from pathlib import Path
from broker import get_signer
state = Path(sys.argv[1])
signer = get_signer()
url = os.environ["CREDBROKER_PROXY_URL"] + "/fapi/v2/balance"
session = requests.Session()
deadline = time.monotonic() + 90
with (state / "log").open("a") as log:
    while not (state / "stop").exists() and time.monotonic() < deadline:
        r = session.get(url, auth=signer)
        log.write(json.dumps({"pid": os.getpid(), "status": r.status_code, "code": r.json().get("code")
                              if isinstance(r.json(), dict) else None}) + "\\n")
        log.flush()
        time.sleep(0.1)
"""


def _wait_for(check: Any, what: str, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.1)


def test_a_rotated_secret_is_picked_up_by_the_proxy_without_restarting_the_bot(
        openbao: OpenBao, tmp_path: Path, fake: FakeBinance) -> None:
    old = proxy_profile(openbao, tmp_path, fake, "hmac")
    text = (tmp_path / "credbroker.toml").read_text()
    (tmp_path / "credbroker.toml").write_text(text.replace("[profiles.bot.proxy]\n",
                                                           '[profiles.bot.proxy]\nrotation_interval = "1s"\n'))
    kv = text.split('path = "secret/', 1)[1].split('"', 1)[0]
    state = tmp_path / "state-rot"
    state.mkdir()
    log = state / "log"

    def lines() -> list[dict[str, Any]]:
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    proc = subprocess.Popen([credbroker_bin(), "run", "--proxy", "-p", "bot", "--", sys.executable, "-c",
                             ROTATION_BOT, str(state)], env=openbao.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: any(x["status"] == 200 for x in lines()), "the bot's first answer")
        # The admin rotates: a new secret on the exchange (the old one stops working) and in Vault.
        new = secrets.token_hex(32)
        fake.add_hmac(API_KEY, new)
        openbao.kv_put(kv, api_key=API_KEY, api_secret=new)
        seen = len(lines())
        _wait_for(lambda: any(x["status"] == 200 for x in lines()[seen + 1:]), "an answer signed with the new key")
        (state / "stop").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out + err
    assert len({x["pid"] for x in lines()}) == 1  # one bot process all along: no restart
    assert lines()[-1]["status"] == 200
    records = audit_records()
    rotated = [r["data"] for r in records if r["event"] == "proxy_key_rotated"]
    assert [r["version"] for r in rotated] == [2] and rotated[0]["kind"] == "hmac"
    fetched = [r["data"] for r in records if r["event"] == "secret_fetched"]
    assert [f.get("by") for f in fetched][-1] == "proxy_rotation"
    # The exchange saw requests signed with the new secret after the rotation.
    assert fake.signed()[-1].status == 200
    text = json.dumps(records) + out + err
    assert old not in text and new not in text


def test_a_replaced_signer_is_closed_once_no_request_can_still_use_it(fake: FakeBinance,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.proxy import server

    class Stub:
        api_key = API_KEY
        kind = "hmac"
        closed = 0

        def close(self) -> None:
            self.closed += 1

    h = Harness(fake)
    first, second, third = Stub(), Stub(), Stub()
    clock = [1000.0]
    monkeypatch.setattr(server.time, "monotonic", lambda: clock[0])
    try:
        original = h.proxy.signer
        h.proxy.swap_signer(first)
        h.proxy.swap_signer(second)  # at once: the original may still be signing
        assert h.proxy.signer is second and first.closed == 0
        clock[0] += server._SIGNER_GRACE + 1
        h.proxy.swap_signer(third)  # the original and `first` were replaced long ago; `second` just now
        assert first.closed == 1 and second.closed == 0 and h.proxy.signer is third
        assert original is not None
    finally:
        monkeypatch.undo()
        h.close()
    assert second.closed == 1 and third.closed == 1 and first.closed == 1
