"""The client matrix: each Binance client library, in env mode and in proxy mode, with each key kind.

Every bot (tests/proxy_bot*.py) runs from its client's own venv under the real
``credbroker run`` with the key in OpenBao, against tests/helpers/fake_binance.py,
which verifies signatures as Binance documents. Env mode: the bot holds the
key and talks to the exchange itself. Proxy mode: it holds the proxy secret
and talks to the proxy. A transit key cannot be held by a bot, so it has no
env-mode cell. Cells tested elsewhere (tests/integration/test_proxy.py): binance-connector
in proxy mode (all kinds and transit), python-binance (env and proxy),
binance-futures-connector, ccxt and the USDⓈ-M SDK in proxy mode.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import OpenBao, credbroker_bin
from tests.helpers.fake_binance import FakeBinance
from tests.helpers.proxy import API_KEY, client_python, fake, proxy_profile  # noqa: F401 - fake is a fixture

HERE = Path(__file__).resolve().parent.parent / "helpers"
VENVS = HERE.parent.parent / ".venv-clients"

#: client -> (its python, its bot). Each venv is made by .ci/run (no network during the tests).
CLIENTS = {
    "binance-connector": (Path(sys.executable), "proxy_bot.py"),
    "binance-futures-connector": (VENVS / "binance-futures-connector" / "bin" / "python",
                                  "proxy_bot_futures_connector.py"),
    "ccxt": (VENVS / "ccxt" / "bin" / "python", "proxy_bot_ccxt.py"),
    "binance-sdk-usds-futures": (VENVS / "binance-sdk" / "bin" / "python", "proxy_bot_binance_sdk.py"),
    "binance-sdk-spot": (VENVS / "binance-sdk-spot" / "bin" / "python", "proxy_bot_binance_sdk_spot.py"),
    "python-binance": (VENVS / "python-binance" / "bin" / "python", "proxy_bot_python_binance.py"),
}


def _run(openbao: OpenBao, tmp: Path, client: str, mode: str, exchange_url: str) -> dict[str, Any]:
    """Run ``client``'s bot under ``credbroker run`` (``--proxy`` in proxy mode); its results."""
    python = client_python(CLIENTS[client][0], client)
    bot = str(HERE / CLIENTS[client][1])
    state = tmp / f"state-{client}-{mode}"
    state.mkdir()
    if client == "python-binance":
        args = [python, bot, str(state), "direct" if mode == "env" else "proxy", exchange_url]
        result = state / ("result-direct.json" if mode == "env" else "result-proxy.json")
    else:
        args = [python, bot, str(state)] + ([exchange_url] if mode == "env" else [])
        result = state / "result.json"
    run = [credbroker_bin(), "run", *(["--proxy"] if mode == "proxy" else []), "-p", "bot", "--", *args]
    env = {**openbao.env(), **({"PYTHONPATH": ""} if client != "binance-connector" else {})}
    proc = subprocess.run(run, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out: dict[str, Any] = json.loads(result.read_text())
    return out


def _check(client: str, res: dict[str, Any], *, listen_key: bool = True) -> None:
    """Place an order, a batch order, read the balance, cancel, and the listenKey calls, as each client shows them."""
    if client == "binance-connector":
        assert res["order"]["clientOrderId"] == "cb/1 x" and res["order"]["status"] == "NEW"
        assert [o["symbol"] for o in res["batch"]] == ["BTCUSDT", "ETHUSDT"]
        assert res["balance"][0]["asset"] == "USDT" and res["account"]["balances"][0]["asset"] == "USDT"
        assert res["cancel"]["status"] == "CANCELED"
        assert "listenKey" in res["futures_listen_key"] and res["futures_listen_key_renew"] == {}
    elif client == "binance-futures-connector":
        assert res["order"]["clientOrderId"] == "cb/1 x" and res["batch"][0]["clientOrderId"] == "b1"
        assert res["balance"][0]["asset"] == "USDT" and res["cancel"]["status"] == "CANCELED"
        assert "listenKey" in res["listen_key"] and res["listen_key_renew"] == {} and res["listen_key_close"] == {}
    elif client == "ccxt":
        assert res["order"]["clientOrderId"] == "cb/1 x", res
        assert res["spot_order"]["clientOrderId"] == "cb/2 y" and res["batch"][0]["clientOrderId"] == "b1"
        assert res["balance"][0]["asset"] == "USDT" and res["account"]["balances"][0]["asset"] == "USDT"
        assert res["cancel"]["status"] == "CANCELED"
        assert "listenKey" in res["listen_key"] and res["listen_key_renew"] == {} and res["listen_key_close"] == {}
    elif client == "binance-sdk-usds-futures":
        assert res["order"]["status"] == 200 and res["order"]["data"]["clientOrderId"] == "cb/1 x", res
        assert res["batch"]["data"][0]["clientOrderId"] == "b1"
        assert res["balance"]["data"][0]["asset"] == "USDT" and res["cancel"]["data"]["status"] == "CANCELED"
        assert res["listen_key"]["data"]["listenKey"]
        assert res["listen_key_renew"]["status"] == 200 and res["listen_key_close"]["status"] == 200
    elif client == "binance-sdk-spot":
        assert res["order"]["status"] == 200 and res["order"]["data"]["clientOrderId"] == "cb/1 x", res
        assert res["balance"]["data"]["balances"][0]["asset"] == "USDT"
        assert res["cancel"]["data"]["status"] == "CANCELED"
    elif client == "python-binance":
        assert res["order"]["clientOrderId"] == "cb/1 x" and res["spot_order"]["clientOrderId"] == "cb/2 y", res
        assert res["balance"][0]["asset"] == "USDT" and res["account"]["balances"][0]["asset"] == "USDT"
        assert res["cancel"]["status"] == "CANCELED"
        assert isinstance(res["listen_key"], str) and res["listen_key_renew"] == {} and res["listen_key_close"] == {}
    else:
        raise AssertionError(client)


ENV_CELLS = [
    ("binance-connector", "hmac"), ("binance-connector", "ed25519"), ("binance-connector", "rsa"),
    ("binance-futures-connector", "hmac"), ("binance-futures-connector", "rsa"),  # it has no Ed25519
    ("ccxt", "hmac"), ("ccxt", "ed25519"), ("ccxt", "rsa"),
    ("binance-sdk-usds-futures", "hmac"), ("binance-sdk-usds-futures", "ed25519"),
    ("binance-sdk-usds-futures", "rsa"),
    ("binance-sdk-spot", "hmac"), ("binance-sdk-spot", "ed25519"), ("binance-sdk-spot", "rsa"),
]


@pytest.mark.parametrize("client, kind", ENV_CELLS)
def test_client_in_env_mode(openbao: OpenBao, tmp_path: Path, fake: FakeBinance, client: str, kind: str) -> None:
    secret = proxy_profile(openbao, tmp_path, fake, kind)
    out = _run(openbao, tmp_path, client, "env", fake.url)
    _check(client, out["results"])
    assert out["environ"]["CREDBROKER_KEY_KIND"] == kind
    assert "CREDBROKER_PROXY_URL" not in out["environ"]
    # The bot held the real key (env mode) and the exchange accepted every signature it made.
    held = out["environ"].get("BINANCE_API_SECRET") or out["environ"]["BINANCE_PRIVATE_KEY"]
    assert held.strip() == secret.strip()
    assert fake.signed() and all(r.status == 200 for r in fake.requests), \
        [(r.path, r.code) for r in fake.requests if r.status != 200]


@pytest.mark.parametrize("kind", ["hmac", "ed25519", "rsa"])
def test_binance_sdk_spot_trades_through_the_proxy(openbao: OpenBao, tmp_path: Path, fake: FakeBinance,
                                                   kind: str) -> None:
    secret = proxy_profile(openbao, tmp_path, fake, kind)
    out = _run(openbao, tmp_path, "binance-sdk-spot", "proxy", fake.url)
    _check("binance-sdk-spot", out["results"])
    needle = secret if kind == "hmac" else secret.strip().splitlines()[1]
    assert needle not in json.dumps(out["environ"])
    assert {r.path for r in fake.signed()} == {"/api/v3/order", "/api/v3/account"}
    assert all(r.status == 200 for r in fake.requests), [(r.path, r.code) for r in fake.requests]


def _transit_profile(openbao: OpenBao, tmp: Path, fake: FakeBinance, client_key: str) -> None:
    from tests.helpers.transit_proxy import write_transit_proxy_profile

    write_transit_proxy_profile(openbao, tmp, fake, API_KEY, rest_url=fake.url,
                                proxy_extra=f'client_key = "{client_key}"\n')


#: client -> the stand-in it gets for a transit (Ed25519) key: "hmac" where the client cannot sign with
#: Ed25519 (binance-futures-connector) or crashes on a batch order with a PEM key (python-binance).
TRANSIT_CELLS = [("binance-futures-connector", "hmac"), ("ccxt", "same"), ("binance-sdk-usds-futures", "same"),
                 ("binance-sdk-spot", "same"), ("python-binance", "hmac")]


@pytest.mark.parametrize("client, client_key", TRANSIT_CELLS)
def test_client_with_a_transit_key_through_the_proxy(openbao: OpenBao, tmp_path: Path, fake: FakeBinance,
                                                     client: str, client_key: str) -> None:
    _transit_profile(openbao, tmp_path, fake, client_key)
    out = _run(openbao, tmp_path, client, "proxy", fake.url)
    _check(client, out["results"])
    environ = out["environ"]
    assert environ["CREDBROKER_KEY_KIND"] == ("ed25519" if client_key == "same" else "hmac")
    assert openbao.token not in json.dumps(environ) and "VAULT_TOKEN" not in environ
    # Every signed request reached the exchange signed inside Vault with the transit key, and passed.
    assert fake.signed() and all(r.status == 200 for r in fake.requests), \
        [(r.path, r.code) for r in fake.requests if r.status != 200]
