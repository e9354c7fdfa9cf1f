"""broker.signing: Binance rules, requests auth, failure recording, settings, secrecy."""

from __future__ import annotations

import base64
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest
import requests

from broker.config import parse_dict
from broker.errors import BrokerError, ConfigError, SigningError
from broker.secret import Secret
from broker.signing import SignerSettings, binance, child_env, failures, get_signer, make_signer, report_response
from broker.signing.ed25519 import Ed25519Signer
from broker.signing.hmac_sha256 import HmacSigner
from tests.helpers.signing_verifier import BinanceVerifier

API_KEY = "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A"
SECRET = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Capture audit events instead of writing them (the audit log has its own tests)."""
    events: list[tuple[str, dict[str, Any]]] = []

    def fake(event: str, fields: Any, *, audit_config: Any = None, durable: bool = True) -> None:
        events.append((event, dict(fields)))

    monkeypatch.setattr("broker.signing.audit_bridge.record_event", fake)
    return events


@pytest.fixture
def verifier() -> Iterator[BinanceVerifier]:
    v = BinanceVerifier().start()
    v.add_hmac(API_KEY, SECRET)
    try:
        yield v
    finally:
        v.stop()


def hmac_signer(**kw: Any) -> HmacSigner:
    return HmacSigner(API_KEY, Secret(SECRET), **kw)


def ed_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


# -- Binance rules ----------------------------------------------------------------------------

def test_sign_params_adds_recvwindow_timestamp_and_signature() -> None:
    signer = hmac_signer(clock=lambda: 1700000000.123)
    signed = signer.sign_params({"symbol": "BTCUSDT", "reduceOnly": True, "note": "a b&c", "skip": None})
    query, _, sig = signed.partition("&signature=")
    assert query == "symbol=BTCUSDT&reduceOnly=true&note=a%20b%26c&recvWindow=5000&timestamp=1700000000123"
    assert sig == signer.sign(query)


def test_sign_params_keeps_given_timing_and_order() -> None:
    signer = hmac_signer()
    signed = signer.sign_params([("timestamp", 5), ("recvWindow", 100), ("a", "1")])
    assert signed.startswith("timestamp=5&recvWindow=100&a=1&signature=")
    assert hmac_signer().sign_params({"a": 1}, timestamp=7, recv_window=None) == (
        "a=1&timestamp=7&signature=" + hmac_signer().sign("a=1&timestamp=7"))


@pytest.mark.parametrize("bad", [0, -1, 60001, "5000", 2.5])
def test_recv_window_bounds(bad: Any) -> None:
    with pytest.raises(SigningError, match="recvWindow"):
        hmac_signer().sign_params({"a": 1}, recv_window=bad)


def test_sign_params_rejects_signature_and_odd_values() -> None:
    with pytest.raises(SigningError, match="already contain a signature"):
        hmac_signer().sign_params({"signature": "x"})
    with pytest.raises(SigningError, match="type object"):
        hmac_signer().sign_params({"a": object()})
    with pytest.raises(SigningError, match="cannot sign"):
        hmac_signer().sign(12)  # type: ignore[arg-type]


def test_total_params_is_query_then_body() -> None:
    assert binance.total_params("a=1&b=2", "c=3") == "a=1&b=2c=3"


# -- requests auth ----------------------------------------------------------------------------

def _prepared(method: str, url: str, **kw: Any) -> requests.PreparedRequest:
    return requests.Request(method, url, **kw).prepare()


def test_requests_auth_get_signs_query_as_sent() -> None:
    signer = hmac_signer()
    req = signer(_prepared("GET", "https://fapi.example/fapi/v2/account", params={"symbol": "BTCUSDT"}))
    query = urlsplit(req.url).query
    unsigned, _, sig = query.partition("&signature=")
    assert unsigned.startswith("symbol=BTCUSDT&recvWindow=5000&timestamp=")
    assert sig == signer.sign(unsigned)
    assert req.headers["X-MBX-APIKEY"] == API_KEY


def test_requests_auth_post_form_body_signs_query_plus_body() -> None:
    """Example 3 of the docs: mixed query string and body, signature at the end of the body."""
    signer = hmac_signer()
    req = signer(_prepared("POST", "https://api.example/api/v3/order?symbol=LTCBTC&side=BUY",
                           data={"quantity": "1", "price": "0.1"}))
    query = urlsplit(req.url).query
    body = req.body if isinstance(req.body, str) else req.body.decode()  # type: ignore[union-attr]
    assert query == "symbol=LTCBTC&side=BUY"
    rest, _, sig = body.partition("&signature=")
    assert rest.startswith("quantity=1&price=0.1&recvWindow=5000&timestamp=")
    assert sig == signer.sign(query + rest)
    assert req.headers["Content-Length"] == str(len(body))


def test_requests_auth_refuses_json_and_double_signing() -> None:
    with pytest.raises(SigningError, match="application/json"):
        hmac_signer()(_prepared("POST", "https://x/api", json={"a": 1}))
    with pytest.raises(SigningError, match="already signed"):
        hmac_signer()(_prepared("GET", "https://x/api", params={"signature": "abc"}))


@pytest.mark.parametrize("kind", ["hmac", "ed25519", "rsa"])
def test_requests_auth_accepted_by_binance_style_server(verifier: BinanceVerifier, kind: str,
                                                        recorded: list[Any]) -> None:
    if kind == "hmac":
        signer = hmac_signer()
    else:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        if kind == "ed25519":
            pem = ed_pem()
        else:
            pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        signer = make_signer(SignerSettings(), {"api_key": Secret("A" * 64), "private_key": Secret(pem)})
        assert signer.kind == kind
        verifier.add_public_key("A" * 64, signer.public_key_pem())
    get = requests.get(verifier.url + "/fapi/v2/account", params={"symbol": "BTCUSDT"}, auth=signer, timeout=10)
    assert get.status_code == 200, get.text
    post = requests.post(verifier.url + "/fapi/v1/order?symbol=BTCUSDT", data={"side": "BUY", "quantity": "0.5"},
                         auth=signer, timeout=10)
    assert post.status_code == 200, post.text
    # sign_params + headers, by hand, as a bot without requests auth would do.
    manual = requests.delete(verifier.url + "/fapi/v1/order?" + signer.sign_params({"symbol": "BTCUSDT"}),
                             headers=signer.headers(), timeout=10)
    assert manual.status_code == 200, manual.text
    assert recorded == []  # no key trouble, nothing recorded


# -- signature failures ------------------------------------------------------------------------

def test_bad_signature_recorded_by_requests_hook(verifier: BinanceVerifier, recorded: list[Any]) -> None:
    wrong = HmacSigner(API_KEY, Secret("not-the-secret-binance-has-" + "x" * 20), profile="um-futures")
    resp = requests.get(verifier.url + "/fapi/v2/account", params={"symbol": "BTCUSDT"}, auth=wrong, timeout=10)
    assert resp.status_code == 400 and resp.json()["code"] == -1022
    assert len(recorded) == 1
    event, fields = recorded[0]
    assert event == "signature_failure"
    assert fields["code"] == -1022
    assert fields["message"] == "Signature for this request is not valid."
    assert fields["endpoint"] == verifier.url + "/fapi/v2/account"  # no query string, so no signature
    assert fields["method"] == "GET" and fields["profile"] == "um-futures"
    assert fields["api_key"].endswith(API_KEY[-4:]) and API_KEY not in json.dumps(fields)
    sent_sig = unquote(resp.request.url.rsplit("signature=", 1)[1])
    assert sent_sig not in json.dumps(fields)
    assert wrong.last_failure is not None and wrong.last_failure.code == -1022


def test_timestamp_and_unknown_key_recorded(verifier: BinanceVerifier, recorded: list[Any]) -> None:
    verifier.clock_offset_ms = 60_000  # the server's clock is a minute ahead of ours
    r = requests.get(verifier.url + "/api/v3/account", auth=hmac_signer(), timeout=10)
    assert r.json()["code"] == -1021
    verifier.clock_offset_ms = 0
    stranger = HmacSigner("B" * 64, Secret(SECRET))
    r = requests.get(verifier.url + "/api/v3/account", auth=stranger, timeout=10)
    assert r.status_code == 401 and r.json()["code"] == -2015
    assert [f["code"] for _, f in recorded] == [-1021, -2015]


@pytest.mark.parametrize(("status", "body", "code"), [
    (400, b'{"code":-1022,"msg":"Signature for this request is not valid."}', -1022),
    (401, '{"code":-2014,"msg":"API-key format invalid."}', -2014),
    (401, {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}, -2015),
    (400, {"code": "-1021", "msg": "Timestamp for this request is outside of the recvWindow."}, -1021),
    (401, "<html>Unauthorized</html>", None),
])
def test_classify_key_trouble(status: int, body: Any, code: int | None) -> None:
    failure = failures.classify(status, body, "https://fapi.binance.com/fapi/v1/order?x=1&signature=abc")
    assert failure is not None and failure.code == code
    assert failure.endpoint == "https://fapi.binance.com/fapi/v1/order"


@pytest.mark.parametrize(("status", "body"), [
    (400, {"code": -1121, "msg": "Invalid symbol."}),
    (429, {"code": -1003, "msg": "Too many requests"}),
    (503, "down"),
])
def test_other_errors_are_not_key_trouble(status: int, body: Any, recorded: list[Any]) -> None:
    assert report_response(status, body, "/fapi/v1/order") is None
    assert recorded == []


def test_report_response_for_other_clients(recorded: list[Any]) -> None:
    """binance-connector raises ClientError(status_code, error_code, error_message, ...)."""
    failure = report_response(400, {"code": -1022, "msg": "Signature for this request is not valid."},
                              "https://user:pw@api.binance.com/api/v3/order?signature=SECRETSIG#frag",
                              method="post", profile="spot", api_key=API_KEY)
    assert failure is not None
    assert recorded[0][1]["endpoint"] == "https://api.binance.com/api/v3/order"
    assert recorded[0][1]["method"] == "POST"
    assert "SECRETSIG" not in json.dumps(recorded) and "pw" not in recorded[0][1]["endpoint"]


def test_failure_message_redacts_long_tokens() -> None:
    f = failures.classify(400, {"code": -1022, "msg": "bad sig " + "ab12" * 16 + " for key"}, "/x")
    assert f is not None and f.message == "bad sig <redacted> for key"


def test_audit_error_in_hook_does_not_break_the_request(verifier: BinanceVerifier, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from broker.errors import AuditError

    def broken(*a: Any, **k: Any) -> None:
        raise AuditError("cannot write the audit log: disk full", "free space")

    monkeypatch.setattr("broker.signing.audit_bridge.record_event", broken)
    wrong = HmacSigner(API_KEY, Secret("wrong-secret-" + "y" * 30))
    r = requests.get(verifier.url + "/api/v3/account", auth=wrong, timeout=10)
    assert r.status_code == 400
    assert "could not record a signature failure" in capsys.readouterr().err
    with pytest.raises(AuditError):  # called directly, it raises
        wrong.check_response(r)


# -- secrecy ------------------------------------------------------------------------------------

def test_repr_masks_api_key_and_never_shows_secret() -> None:
    signer = hmac_signer(profile="um-futures")
    for text in (repr(signer), str(signer), repr(signer.api_key), f"{signer!r}"):
        assert API_KEY not in text and SECRET not in text
    assert repr(signer.api_key) == "ApiKey('********Eh8A')"
    assert str(signer.api_key) == API_KEY  # usable in a header
    with pytest.raises(TypeError):
        pickle.dumps(signer)


def test_errors_never_contain_key_material() -> None:
    pem = ed_pem()
    broken = pem.replace(b"\n", b"\n!", 2)
    with pytest.raises(SigningError) as err:
        Ed25519Signer(API_KEY, Secret(broken))
    assert pem.decode().splitlines()[1] not in str(err.value)
    assert err.value.remedy


def test_encrypted_pem_needs_passphrase() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.BestAvailableEncryption(b"hunter22"))
    with pytest.raises(SigningError, match="encrypted and no passphrase"):
        make_signer(SignerSettings(), {"api_key": Secret(API_KEY), "private_key": Secret(pem)})
    signer = make_signer(SignerSettings(), {"api_key": Secret(API_KEY), "private_key": Secret(pem),
                                            "private_key_passphrase": Secret("hunter22")})
    assert signer.kind == "ed25519"
    sig = base64.b64decode(signer.sign("a=1"))
    key.public_key().verify(sig, b"a=1")


def test_close_forgets_the_key() -> None:
    for signer in (hmac_signer(), Ed25519Signer(API_KEY, Secret(ed_pem()))):
        with signer:
            signer.sign("a=1")
        with pytest.raises(SigningError, match="closed"):
            signer.sign("a=1")


# -- settings and kind detection ----------------------------------------------------------------

def test_type_mismatch_and_missing_fields() -> None:
    with pytest.raises(ConfigError, match="is 'ed25519' but the key stored in 'api_secret' is hmac"):
        make_signer(SignerSettings(type="ed25519"), {"api_key": Secret(API_KEY), "api_secret": Secret(SECRET)})
    with pytest.raises(ConfigError, match="is 'hmac' but the key stored in 'api_secret' is ed25519"):
        make_signer(SignerSettings(type="hmac"), {"api_key": Secret(API_KEY), "api_secret": Secret(ed_pem())})
    with pytest.raises(ConfigError, match="no 'api_key' field"):
        make_signer(SignerSettings(), {"api_secret": Secret(SECRET)})
    with pytest.raises(ConfigError, match="no signing key field"):
        make_signer(SignerSettings(), {"api_key": Secret(API_KEY)})
    with pytest.raises(SigningError, match="empty or contains spaces"):
        make_signer(SignerSettings(), {"api_key": Secret("a b"), "api_secret": Secret(SECRET)})


def test_pem_in_api_secret_is_detected() -> None:
    signer = make_signer(SignerSettings(), {"api_key": Secret(API_KEY), "api_secret": Secret(ed_pem())})
    assert signer.kind == "ed25519"


def _profile(signer_table: str) -> Any:
    text = f"""
[profiles.p]
source = "vault"
path = "secret/p"
env = {{ BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }}
{signer_table}
"""
    import tomllib

    return parse_dict(tomllib.loads(text), origin="cfg.toml").profile("p")


@pytest.mark.parametrize(("table", "message"), [
    ('[profiles.p.signer]\ntype = "dsa"', "unknown signer type"),
    ("[profiles.p.signer]\nrecv_window = 70000", "recv_window"),
    ('[profiles.p.signer]\ntype = "transit"', "transit_key: missing"),
    ('[profiles.p.signer]\ntype = "hmac"\ntransit_key = "k"', "transit_key: set, but type"),
    ('[profiles.p.signer]\ncolour = "red"', "unknown key"),
    ('[profiles.p.signer]\ntoken_ttl = "forever"', "token_ttl"),
    ('[profiles.p.signer]\ntransit_key = "a/b"', "transit_key"),
])
def test_settings_validation(table: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        SignerSettings.for_profile(_profile(table))
    assert "cfg.toml: profiles.p.signer" in str(err.value)


def test_settings_transit_key_implies_transit() -> None:
    s = SignerSettings.for_profile(_profile('[profiles.p.signer]\ntransit_key = "bot"\ntoken_ttl = 90'))
    assert s.type == "transit" and s.transit_mount == "transit" and s.ttl_seconds() == 90


# -- get_signer inside and outside `credbroker run` ------------------------------------------------

def test_get_signer_without_profile_outside_run_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="only inside `credbroker run`") as err:
        get_signer(env={})
    assert isinstance(err.value, BrokerError) and err.value.remedy


def test_get_signer_in_child_uses_injected_variables(verifier: BinanceVerifier, recorded: list[Any]) -> None:
    env = {
        "CREDBROKER_RUN": "12345",
        "CREDBROKER_PROFILE": "um-futures",
        "CREDBROKER_ENV_MAP": json.dumps({"K": "api_key", "S": "api_secret"}),
        "K": API_KEY,
        "S": SECRET,
        "CREDBROKER_SIGNER": json.dumps({"recv_window": 2000}),
    }
    signer = get_signer(env=env)
    assert signer.kind == "hmac" and signer.profile == "um-futures" and signer.recv_window == 2000
    assert requests.get(verifier.url + "/api/v3/account", auth=signer, timeout=10).status_code == 200
    assert get_signer("um-futures", env=env).kind == "hmac"  # its own profile by name: same path


@pytest.mark.parametrize(("env", "message"), [
    ({"CREDBROKER_RUN": "1"}, "CREDBROKER_ENV_MAP is missing"),
    ({"CREDBROKER_RUN": "1", "CREDBROKER_ENV_MAP": "{nope"}, "not valid JSON"),
    ({"CREDBROKER_RUN": "1", "CREDBROKER_ENV_MAP": '{"K":"api_key"}', "K": "x" * 10}, "no signing key field"),
    ({"CREDBROKER_RUN": "1", "CREDBROKER_ENV_MAP": '{"K":"api_key"}', "K": "x" * 10,
      "CREDBROKER_SIGNER": '{"type":"transit","transit_key":"k"}'}, "no signing token"),
])
def test_get_signer_in_child_bad_environment(env: dict[str, str], message: str) -> None:
    with pytest.raises(BrokerError, match=message):
        get_signer(env=env)


def test_child_env_for_local_kinds_has_no_secret() -> None:
    prof = _profile('[profiles.p.signer]\ntype = "hmac"\nrecv_window = 3000')
    out = child_env(prof)
    assert json.loads(out["CREDBROKER_SIGNER"])["recv_window"] == 3000
    assert out["CREDBROKER_CONFIG"].endswith("cfg.toml")
    assert "CREDBROKER_SIGNER_TOKEN" not in out


def test_signature_placement_matches_docs_example_3_against_server(verifier: BinanceVerifier) -> None:
    """The verifier strips the signature wherever it is; prove it accepts body placement only when right."""
    signer = hmac_signer()
    body = signer.sign_params({"quantity": 1, "price": 0.1})
    # Signed as body alone, but sent with an extra query string: totalParams differ -> -1022.
    r = requests.post(verifier.url + "/api/v3/order?symbol=LTCBTC", data=body, headers={
        **signer.headers(), "Content-Type": "application/x-www-form-urlencoded"}, timeout=10)
    assert r.json()["code"] == -1022
    assert dict(parse_qsl(urlsplit(r.request.url).query)) == {"symbol": "LTCBTC"}


# -- the real audit log ----------------------------------------------------------------------------

def _audit_records() -> list[dict[str, Any]]:
    from broker.audit import open_log

    path = Path(open_log(None).path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_signature_failure_lands_in_the_real_audit_log(verifier: BinanceVerifier) -> None:
    wrong_secret = "wrong-secret-" + "z" * 40
    wrong = HmacSigner(API_KEY, Secret(wrong_secret), profile="um-futures")
    resp = requests.get(verifier.url + "/fapi/v2/account", params={"symbol": "BTCUSDT"}, auth=wrong, timeout=10)
    assert resp.status_code == 400
    records = [r for r in _audit_records() if r.get("event") == "signature_failure"]
    assert len(records) == 1
    text = json.dumps(records)
    assert "-1022" in text and "/fapi/v2/account" in text
    sent_sig = unquote(resp.request.url.rsplit("signature=", 1)[1])
    from broker.audit import open_log

    raw = Path(open_log(None).path).read_text()
    for needle in (wrong_secret, sent_sig, API_KEY, "symbol=BTCUSDT"):
        assert needle not in raw


def test_redirect_to_another_host_is_refused(verifier: BinanceVerifier) -> None:
    """requests keeps custom headers across redirects: the signer refuses to carry the API key away."""
    other = BinanceVerifier().start()
    try:
        target = other.url.replace("127.0.0.1", "localhost") + "/api/v3/account"
        with pytest.raises(SigningError, match="refusing to follow a redirect"):
            requests.get(verifier.url + "/redirect", params={"to": target}, auth=hmac_signer(), timeout=10)
        assert other.seen == []
        # Same origin: followed (the redirected request is not re-signed, so the server rejects it).
        same = requests.get(verifier.url + "/redirect", params={"to": "/api/v3/account"}, auth=hmac_signer(),
                            timeout=10)
        assert same.status_code == 400
    finally:
        other.stop()


def test_hmac_path_stays_lean() -> None:
    """`from broker import get_signer` and HMAC signing load no requests, hvac or cryptography."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from broker import get_signer\n"
            "from broker.signing import make_signer, SignerSettings\n"
            "from broker.secret import Secret\n"
            "s = make_signer(SignerSettings(), {'api_key': Secret('k' * 64), 'api_secret': Secret('s' * 64)})\n"
            "s.sign_params({'a': 1})\n"
            "print(sorted(m for m in ('requests', 'hvac', 'cryptography', 'keyring') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(("value", "kind"), [(SECRET.encode(), "hmac"), (b"  -----BEGIN PRIVATE KEY-----x", None)])
def test_detect_kind(value: bytes, kind: str | None) -> None:
    from broker.signing import core

    if kind is None:
        with pytest.raises(SigningError, match="not a valid PEM"):
            core.detect_kind(value)
    else:
        assert core.detect_kind(value) == kind
        assert core.detect_kind(ed_pem()) == "ed25519"


def test_events_go_through_the_broker_relay_when_given(verifier: BinanceVerifier,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With CREDBROKER_AUDIT_FD (a keyed log the child cannot write), failures go to the broker as JSON lines."""
    import os

    read_fd, write_fd = os.pipe()
    try:
        monkeypatch.setenv("CREDBROKER_AUDIT_FD", str(write_fd))
        wrong = HmacSigner(API_KEY, Secret("wrong-" + "w" * 30), profile="p")
        requests.get(verifier.url + "/api/v3/account", auth=wrong, timeout=10)
        line = os.read(read_fd, 65536).decode()
    finally:
        os.close(read_fd)
        os.close(write_fd)
    msg = json.loads(line)
    assert msg["event"] == "signature_failure" and msg["fields"]["code"] == -1022
    assert "w" * 30 not in line and API_KEY not in line



def test_signer_registry() -> None:
    from broker.signing import signer_class

    assert {signer_class(k).kind for k in ("hmac", "ed25519", "rsa", "transit")} == {"hmac", "ed25519", "rsa",
                                                                                      "transit"}
    with pytest.raises(ConfigError, match="unknown signer type"):
        signer_class("dsa")


def test_record_failures_off_still_guards_redirects(verifier: BinanceVerifier, recorded: list[Any]) -> None:
    quiet = HmacSigner(API_KEY, Secret("wrong-" + "q" * 30), record_failures=False)
    r = requests.get(verifier.url + "/api/v3/account", auth=quiet, timeout=10)
    assert r.status_code == 400 and recorded == []
    with pytest.raises(SigningError, match="redirect"):
        requests.get(verifier.url + "/redirect", params={"to": "http://localhost:9/x"}, auth=quiet, timeout=10)
    with pytest.raises(SigningError, match="not UTF-8"):
        quiet(_prepared("POST", "https://x/api", data=b"\xff\xfe", headers={
            "Content-Type": "application/x-www-form-urlencoded"}))
