"""Published signature examples as test vectors, and an independent implementation.

- HMAC-SHA256: the worked examples of Binance's spot API docs ("SIGNED Endpoint
  Examples for POST /api/v3/order", examples 1-3; the WebSocket API's "SIGNED
  request example (HMAC)"), and binance-signature-examples' README.
- Ed25519: Binance's docs publish the procedure and parameters but no private
  key, so the key-level vectors are RFC 8032's (section 7.1, TEST 1-3), and the
  docs' parameters are signed and checked with the public key.
- RSA: the docs' cross-check command (``openssl dgst -sha256 -sign``) on the
  docs' payload, with a key made for the test.
- Independent implementation: binance-connector's own signing functions
  (``binance.lib.authentication``) on the same inputs give the same signatures.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

from broker.secret import Secret
from broker.signing import SignerSettings, core, make_signer
from broker.signing.ed25519 import Ed25519Signer
from broker.signing.hmac_sha256 import HmacSigner
from broker.signing.rsa import RsaSigner

# Binance's example API key and HMAC secret (published in the docs "for illustrative purposes").
DOC_API_KEY = "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A"
DOC_SECRET = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
DOC_PARAMS = {"symbol": "LTCBTC", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": 1, "price": 0.1}
DOC_TIMESTAMP = 1499827319559
DOC_QUERY = "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559"

HMAC_VECTORS = [
    # REST examples 1 and 2: the same totalParams as body or as query string.
    (DOC_QUERY, "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"),
    # REST example 3: query "...timeInForce=GTC" + body "quantity=1&...": no '&' between them.
    ("symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC" "quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559",
     "0fd168b8ddb4876a0358a8d14d0c9f3da0e9b20c5d52b2a00fcf7d1c602f9a77"),
    # binance-signature-examples README.
    ("timestamp=1578963600000", "d84e6641b1e328e7b418fff030caed655c266299c9355e36ce801ed14631eed4"),
    # WebSocket API "SIGNED request example (HMAC)": params sorted by name.
    ("apiKey=vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A&newOrderRespType=ACK&price=52000.00"
     "&quantity=0.01000000&recvWindow=100&side=SELL&symbol=BTCUSDT&timeInForce=GTC&timestamp=1645423376532&type=LIMIT",
     "cc15477742bd704c29492d96c7ead9414dfd8e0ec4a00f947bb5bb454ddbd08a"),
]

# RFC 8032 section 7.1 (Ed25519): secret key, public key, message, signature (hex).
RFC8032 = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
]

# Parameters of the docs' Ed25519/RSA REST example (POST /api/v3/order).
ASYM_PARAMS = {"symbol": "BTCUSDT", "side": "SELL", "type": "LIMIT", "timeInForce": "GTC", "quantity": 1, "price": 0.2}
ASYM_TIMESTAMP = 1668481559918


def _hmac_signer() -> HmacSigner:
    return HmacSigner(DOC_API_KEY, Secret(DOC_SECRET))


@pytest.mark.parametrize(("payload", "expected"), HMAC_VECTORS)
def test_hmac_docs_vectors(payload: str, expected: str) -> None:
    assert core.hmac_sha256_hex(DOC_SECRET.encode(), payload.encode()) == expected
    assert _hmac_signer().sign(payload) == expected
    assert _hmac_signer().sign(payload.encode()) == expected


def test_hmac_sign_params_reproduces_rest_example_2() -> None:
    signed = _hmac_signer().sign_params(DOC_PARAMS, timestamp=DOC_TIMESTAMP)
    assert signed == DOC_QUERY + "&signature=c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"


def test_hmac_detected_from_plain_secret_and_headers() -> None:
    signer = make_signer(SignerSettings(), {"api_key": Secret(DOC_API_KEY), "api_secret": Secret(DOC_SECRET)})
    assert signer.kind == "hmac"
    assert signer.headers() == {"X-MBX-APIKEY": DOC_API_KEY}


def _ed25519_from_seed(seed_hex: str):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex))


def _pem(key) -> bytes:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.mark.parametrize(("seed", "public", "message", "signature"), RFC8032)
def test_ed25519_rfc8032_vectors(seed: str, public: str, message: str, signature: str) -> None:
    key = _ed25519_from_seed(seed)
    expected_b64 = base64.b64encode(bytes.fromhex(signature)).decode()
    assert core.ed25519_sign_b64(key, bytes.fromhex(message)) == expected_b64
    # Through the signer, with the key stored as PEM the way it sits in Vault.
    signer = make_signer(SignerSettings(), {"api_key": Secret("k" * 64), "private_key": Secret(_pem(key))})
    assert signer.kind == "ed25519"
    assert signer.sign(bytes.fromhex(message)) == expected_b64
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    pub = load_pem_public_key(signer.public_key_pem().encode())
    assert pub.public_bytes_raw().hex() == public  # type: ignore[union-attr]


def test_ed25519_binance_procedure_verifies_with_public_key() -> None:
    """The docs' Ed25519 steps: payload as sent, base64 signature, percent-encoded in the query."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = Ed25519PrivateKey.generate()
    signer = Ed25519Signer("k" * 64, Secret(_pem(key)))
    signed = signer.sign_params(ASYM_PARAMS, timestamp=ASYM_TIMESTAMP, recv_window=None)
    payload, _, sig_q = signed.partition("&signature=")
    assert payload == "symbol=BTCUSDT&side=SELL&type=LIMIT&timeInForce=GTC&quantity=1&price=0.2&timestamp=1668481559918"
    assert "+" not in sig_q and "/" not in sig_q and "=" not in sig_q  # base64 escaped for the query
    raw = base64.b64decode(unquote(sig_q), validate=True)
    assert len(raw) == 64
    load_pem_public_key(signer.public_key_pem().encode()).verify(raw, payload.encode())  # type: ignore[union-attr]


def test_rsa_matches_the_docs_openssl_command(tmp_path: Path) -> None:
    """Binance's RSA cross-check: ``openssl dgst -sha256 -sign key.pem | openssl enc -base64 -A``."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "test-prv-key.pem"  # a throwaway test key, as in the docs' example
    pem.write_bytes(_pem(key))
    signer = make_signer(SignerSettings(), {"api_key": Secret("k" * 64), "private_key": Secret(pem.read_bytes())})
    assert isinstance(signer, RsaSigner)
    payload = "symbol=BTCUSDT&side=SELL&type=LIMIT&timeInForce=GTC&quantity=1&price=0.2&timestamp=1668481559918&recvWindow=5000"
    dgst = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(pem)], input=payload.encode(),
                          capture_output=True, check=True)
    expected = base64.b64encode(dgst.stdout).decode()
    assert signer.sign(payload) == expected
    # The docs list timestamp before recvWindow here: given params keep their order.
    docs_order = {**ASYM_PARAMS, "timestamp": ASYM_TIMESTAMP, "recvWindow": 5000}
    assert signer.sign_params(docs_order) == payload + "&signature=" + (
        expected.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D"))


def test_hmac_matches_the_docs_openssl_command() -> None:
    out = subprocess.run(["openssl", "dgst", "-sha256", "-hmac", DOC_SECRET], input=DOC_QUERY.encode(),
                         capture_output=True, check=True).stdout.decode()
    assert out.strip().rsplit(" ", 1)[-1] == _hmac_signer().sign(DOC_QUERY)


# -- an independent implementation: the signing code of a real client library ------------------

def _connector():  # type: ignore[no-untyped-def]
    try:
        from binance.lib import authentication  # binance-connector (test-only dependency)
    except ImportError:
        from tests.conftest import service_missing

        service_missing("binance-connector not installed (pip install binance-connector)")
    return authentication


def test_independent_hmac_binance_connector() -> None:
    auth = _connector()
    signer = _hmac_signer()
    for payload, expected in HMAC_VECTORS:
        assert auth.hmac_hashing(DOC_SECRET, payload) == signer.sign(payload) == expected


def test_independent_ed25519_binance_connector() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    auth = _connector()
    key = Ed25519PrivateKey.generate()
    pem = _pem(key)
    signer = Ed25519Signer("k" * 64, Secret(pem))
    for payload in (DOC_QUERY, "timestamp=1578963600000", "symbol=BTCUSDT&side=SELL&timestamp=1668481559918"):
        theirs = auth.ed25519_signature(pem.decode(), payload)
        assert (theirs.decode() if isinstance(theirs, bytes) else theirs) == signer.sign(payload)
    # And RFC 8032 TEST 2's key through their code.
    seed, _, _, sig = RFC8032[1]
    theirs = auth.ed25519_signature(_pem(_ed25519_from_seed(seed)).decode(), "r")  # 0x72 == "r"
    assert base64.b64decode(theirs) == bytes.fromhex(sig)


def test_independent_rsa_binance_connector() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    auth = _connector()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = _pem(key)
    signer = RsaSigner("k" * 64, Secret(pem))
    theirs = auth.rsa_signature(pem.decode(), DOC_QUERY)
    assert (theirs.decode() if isinstance(theirs, bytes) else theirs) == signer.sign(DOC_QUERY)


def test_independent_full_request_binance_connector() -> None:
    """The query string binance-connector signs and sends equals ours for the same params and time."""
    auth = _connector()
    from binance.lib.utils import encoded_string

    params = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01",
              "price": "52000.00", "recvWindow": 5000, "timestamp": DOC_TIMESTAMP}
    theirs_query = encoded_string(params)
    theirs = theirs_query + "&signature=" + auth.hmac_hashing(DOC_SECRET, theirs_query)
    assert _hmac_signer().sign_params(params) == theirs
