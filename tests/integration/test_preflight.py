"""Key preflight: Binance's GET /sapi/v1/account/apiRestrictions before the bot starts (issue 6, item 4).

A local HTTP server answers as Binance documents ("Get API Key Permission
(USER_DATA)"): it checks the signature like tests/helpers/signing_verifier.py and
returns the documented object with the flags each test sets.
"""

from __future__ import annotations

import json
import secrets
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from broker.errors import ConfigError
from broker.preflight import (
    PATH,
    ExchangeUnreachable,
    PreflightError,
    PreflightOptions,
    check,
    fetch_restrictions,
    run_preflight,
)
from broker.secret import Secret
from broker.signing.hmac_sha256 import HmacSigner
from tests.conftest import OpenBao, refused_url
from tests.helpers.signing_verifier import BinanceVerifier

API_KEY = "K" + "a1" * 20
SECRET = "S" + "b2" * 20


class FakeBinance:
    """apiRestrictions as documented; signature and API key checked by BinanceVerifier's rules."""

    def __init__(self, *, withdrawals: bool = False, ip_restrict: bool = True, status: int | None = None,
                 body: Any = None, redirect: str | None = None) -> None:
        self.verifier = BinanceVerifier()
        self.verifier.add_hmac(API_KEY, SECRET)
        self.restrictions = {
            "ipRestrict": ip_restrict, "createTime": 1698645219000, "enableInternalTransfer": False,
            "enableFutures": True, "enablePortfolioMarginTrading": False, "enableVanillaOptions": False,
            "permitsUniversalTransfer": False, "enableReading": True, "enableSpotAndMarginTrading": True,
            "enableWithdrawals": withdrawals, "enableMargin": False,
        }
        self.status, self.body, self.redirect = status, body, redirect
        self.requests: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                fake.requests.append(self.path)
                if fake.redirect:
                    self.send_response(302)
                    self.send_header("Location", fake.redirect)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status, payload = fake.verifier.check("GET", self.path, self.headers, "")
                if urlsplit(self.path).path != PATH:
                    status, payload = 404, {"code": -1, "msg": "not found"}
                elif status == 200:
                    status, payload = fake.status or 200, fake.body if fake.body is not None else fake.restrictions
                data = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def exchange() -> Any:
    servers: list[FakeBinance] = []

    def make(**kw: Any) -> FakeBinance:
        servers.append(FakeBinance(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def signer() -> HmacSigner:
    return HmacSigner(API_KEY, Secret(SECRET))


def options(url: str, **kw: Any) -> PreflightOptions:
    return PreflightOptions.build(mode=kw.pop("mode", "on"), base_url=url, env={}, **kw)


# -- the exchange call and the verdict ----------------------------------------------------------


def test_request_is_signed_as_binance_documents(exchange: Any) -> None:
    ex = exchange()
    data = fetch_restrictions(signer(), options(ex.url))
    assert data["enableWithdrawals"] is False and data["ipRestrict"] is True
    (sent,) = ex.requests
    assert sent.startswith(PATH + "?recvWindow=5000&timestamp=") and "&signature=" in sent
    assert SECRET not in sent


@pytest.mark.parametrize("withdrawals,ip_restrict,flags,outcome,error", [
    (False, True, {}, "passed", None),
    (True, True, {}, None, "can withdraw funds"),
    (False, False, {}, None, "not restricted to trusted IPs"),
    (True, False, {"unsafe_allow_withdrawals": True}, None, "not restricted to trusted IPs"),
    (True, True, {"unsafe_allow_withdrawals": True}, "overridden", None),
    (False, False, {"unsafe_no_ip_restriction": True}, "overridden", None),
    (True, False, {"unsafe_allow_withdrawals": True, "unsafe_no_ip_restriction": True}, "overridden", None),
])
def test_verdicts(withdrawals: bool, ip_restrict: bool, flags: dict[str, bool], outcome: str | None,
                  error: str | None) -> None:
    opts = PreflightOptions(**flags)
    restrictions = {"enableWithdrawals": withdrawals, "ipRestrict": ip_restrict, "enableMargin": False}
    if error:
        with pytest.raises(PreflightError, match=error):
            check(restrictions, opts)
        return
    result = check(restrictions, opts)
    assert result.outcome == outcome
    assert len(result.warnings) == (withdrawals + (not ip_restrict))
    assert all(w.startswith("UNSAFE: ") for w in result.warnings)


def test_answer_without_the_documented_fields_is_refused() -> None:
    with pytest.raises(PreflightError, match="no boolean enableWithdrawals"):
        check({"ipRestrict": True}, PreflightOptions())
    with pytest.raises(PreflightError, match="no boolean ipRestrict"):
        check({"enableWithdrawals": False, "ipRestrict": "yes"}, PreflightOptions())


def test_margin_rights_are_refused_unless_overridden() -> None:
    safe = {"enableWithdrawals": False, "ipRestrict": True}
    with pytest.raises(PreflightError, match=r"can trade on margin \(enableMargin is true\)") as info:
        check({**safe, "enableMargin": True}, PreflightOptions())
    assert "--unsafe-allow-margin" in info.value.remedy
    # The override for the other danger does not cover this one.
    with pytest.raises(PreflightError, match="enableMargin"):
        check({**safe, "enableMargin": True}, PreflightOptions(unsafe_allow_withdrawals=True))
    result = check({**safe, "enableMargin": True}, PreflightOptions(unsafe_allow_margin=True))
    assert result.outcome == "overridden"
    assert result.warnings == ("UNSAFE: this API key can trade on margin (enableMargin is true); started anyway "
                               "because of --unsafe-allow-margin",)
    # Binance documents the field: an answer without it is not the documented object (fail closed).
    with pytest.raises(PreflightError, match="no boolean enableMargin"):
        check(safe, PreflightOptions())
    assert check({**safe, "enableMargin": False}, PreflightOptions()).outcome == "passed"


def test_portfolio_margin_rights_are_margin_rights() -> None:
    """A key with "Enable Portfolio Margin Trading" can trade on margin: refused like enableMargin, under the
    same override; the field is optional (older answers lack it) and judged when it is a boolean."""
    safe = {"enableWithdrawals": False, "ipRestrict": True, "enableMargin": False}
    with pytest.raises(PreflightError, match=r"portfolio margin \(enablePortfolioMarginTrading is true\)") as info:
        check({**safe, "enablePortfolioMarginTrading": True}, PreflightOptions())
    assert "--unsafe-allow-margin" in info.value.remedy and "Portfolio Margin" in info.value.remedy
    with pytest.raises(PreflightError, match="enablePortfolioMarginTrading"):
        check({**safe, "enablePortfolioMarginTrading": True}, PreflightOptions(unsafe_allow_withdrawals=True))
    result = check({**safe, "enableMargin": True, "enablePortfolioMarginTrading": True},
                   PreflightOptions(unsafe_allow_margin=True))
    assert result.outcome == "overridden" and len(result.warnings) == 2
    assert "enablePortfolioMarginTrading is true" in result.warnings[1]
    assert check({**safe, "enablePortfolioMarginTrading": False}, PreflightOptions()).outcome == "passed"
    assert check(safe, PreflightOptions()).outcome == "passed"


def test_margin_key_against_the_exchange_refused_then_started_with_a_warning_each_time(exchange: Any) -> None:
    ex = exchange()
    ex.restrictions["enableMargin"] = True
    records: list[tuple[str, dict[str, Any]]] = []
    with pytest.raises(PreflightError, match="can trade on margin"):
        run_preflight(signer(), options(ex.url), profile="p", record=lambda e, f: records.append((e, f)),
                      warn=lambda m: None)
    assert records[-1][1]["outcome"] == "refused" and records[-1][1]["restrictions"]["enableMargin"] is True
    for _ in range(2):
        said: list[str] = []
        result = run_preflight(signer(), options(ex.url, unsafe_allow_margin=True), profile="p",
                               record=lambda e, f: records.append((e, f)), warn=said.append)
        assert result is not None and result.outcome == "overridden"
        assert said == ["UNSAFE: this API key can trade on margin (enableMargin is true); started anyway because "
                        "of --unsafe-allow-margin"]
        assert records[-1][1]["overrides"] == ["--unsafe-allow-margin"]
        assert records[-1][1]["api_key"] == "********" + API_KEY[-4:]
    ex.restrictions["enableMargin"] = False
    said = []
    run_preflight(signer(), options(ex.url, unsafe_allow_margin=True), profile="p", record=lambda e, f: None,
                  warn=said.append)
    assert said == ["WARNING: --unsafe-allow-margin is given but this key cannot trade on margin; remove the flag"]


NOW = 1_800_000_000.0  # seconds since the epoch: 2027-01-15T08:00:00Z
DAY_MS = 86_400_000


@pytest.mark.parametrize("days,warned", [(5, "expires in 5 day(s), on 2027-01-20T08:00:00Z UTC"), (13.9, "expires in"),
                                         (14, None), (40, None), (-2, "expired on 2027-01-13")])
def test_trading_authority_expiry_is_recorded_and_warned_within_14_days(
        exchange: Any, days: float, warned: str | None) -> None:
    ex = exchange()
    expires = int(NOW * 1000 + days * DAY_MS)
    ex.restrictions["tradingAuthorityExpirationTime"] = expires
    said: list[str] = []
    records: list[tuple[str, dict[str, Any]]] = []
    result = run_preflight(signer(), options(ex.url), profile="p", record=lambda e, f: records.append((e, f)),
                           warn=said.append, now=lambda: NOW)
    assert result is not None and result.outcome == "passed"  # a warning, never a refusal
    (_, fields), = records
    assert fields["restrictions"]["tradingAuthorityExpirationTime"] == expires
    assert fields["trading_authority_expires"].startswith(("2027-01-", "2027-02-"))
    assert fields["trading_authority_days_left"] == round(days, 1)
    if warned is None:
        assert said == []
    else:
        (line,) = said
        assert line.startswith("WARNING: this API key's trading authority ") and warned in line


def test_no_expiry_field_no_expiry_record(exchange: Any) -> None:
    records: list[tuple[str, dict[str, Any]]] = []
    run_preflight(signer(), options(exchange().url), profile="p", record=lambda e, f: records.append((e, f)),
                  warn=lambda m: None)
    assert "trading_authority_expires" not in records[0][1]


def test_unsafe_overrides_warn_every_time_even_when_not_needed(exchange: Any) -> None:
    ex = exchange(withdrawals=True)
    for _ in range(2):
        said: list[str] = []
        records: list[tuple[str, dict[str, Any]]] = []
        result = run_preflight(signer(), options(ex.url, unsafe_allow_withdrawals=True, unsafe_no_ip_restriction=True),
                               profile="p", record=lambda e, f: records.append((e, f)), warn=said.append)
        assert result is not None and result.outcome == "overridden"
        assert said == [
            "UNSAFE: this API key can withdraw funds (enableWithdrawals is true); started anyway because of "
            "--unsafe-allow-withdrawals",
            "WARNING: --unsafe-no-ip-restriction is given but this key is IP-restricted; remove the flag"]
        (event, fields), = records
        assert event == "preflight" and fields["outcome"] == "overridden"
        assert fields["overrides"] == ["--unsafe-allow-withdrawals", "--unsafe-no-ip-restriction"]
        assert fields["restrictions"]["enableWithdrawals"] is True


def test_exchange_errors_fail_closed_even_in_auto_mode(exchange: Any) -> None:
    ex = exchange(status=401, body={"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."})
    records: list[tuple[str, dict[str, Any]]] = []
    with pytest.raises(PreflightError, match="HTTP 401 -2015 Invalid API-key"):
        run_preflight(signer(), options(ex.url, mode="auto"), profile="p",
                      record=lambda e, f: records.append((e, f)), warn=lambda m: None)
    assert records[0][1]["outcome"] == "refused"
    # A wrong secret: the fake exchange answers -1022, also a refusal.
    bad = HmacSigner(API_KEY, Secret("wrong-secret"))
    with pytest.raises(PreflightError, match="-1022"):
        fetch_restrictions(bad, options(exchange().url, mode="auto"))
    for body, match in ((b"<html>", "not a JSON object"), ([1, 2], "not a JSON object")):
        with pytest.raises(PreflightError, match=match):
            fetch_restrictions(signer(), options(exchange(body=body).url))


def test_redirect_is_refused_not_followed(exchange: Any) -> None:
    target = exchange()
    ex = exchange(redirect=target.url + PATH)
    with pytest.raises(PreflightError, match="HTTP 302"):
        fetch_restrictions(signer(), options(ex.url))
    assert target.requests == []  # the API key never went to the redirect's target


def test_unreachable_exchange_skips_in_auto_and_refuses_in_on() -> None:
    with refused_url() as url:  # nothing listens there: connection refused
        said: list[str] = []
        records: list[tuple[str, dict[str, Any]]] = []
        result = run_preflight(signer(), options(url, mode="auto"), profile="p",
                               record=lambda e, f: records.append((e, f)), warn=said.append)
        assert result is not None and result.outcome == "skipped"
        assert records[0][1]["outcome"] == "skipped"
        assert said[0].startswith("WARNING: key preflight: cannot reach http://127.0.0.1:")
        with pytest.raises(ExchangeUnreachable, match="cannot reach"):
            run_preflight(signer(), options(url, mode="on"), profile="p", record=lambda e, f: None, warn=said.append)


def test_read_timeout_after_connect_is_a_refusal_not_unreachable() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection (reachable) but never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        opts = PreflightOptions.build(mode="auto", base_url=url, env={}, timeout=0.5)
        with pytest.raises(PreflightError, match="did not answer") as info:
            fetch_restrictions(signer(), opts)
        assert not isinstance(info.value, ExchangeUnreachable)
    finally:
        listener.close()


def test_base_url_rules() -> None:
    assert PreflightOptions.build(mode="auto", env={}).base_url == "https://api.binance.com"
    assert PreflightOptions.build(mode="auto", env={"CREDBROKER_PREFLIGHT_URL": "http://127.0.0.1:9/"}).base_url \
        == "http://127.0.0.1:9"
    with pytest.raises(ConfigError, match="unencrypted"):
        PreflightOptions.build(mode="on", base_url="http://api.binance.com", env={})
    with pytest.raises(ConfigError, match="not an http"):
        PreflightOptions.build(mode="on", base_url="ftp://x", env={})
    for bad in ("http://[::1", "http://127.0.0.1:99999", "https://api.binance.com:port"):  # once a ValueError
        with pytest.raises(ConfigError, match="not an http"):
            PreflightOptions.build(mode="auto", env={"CREDBROKER_PREFLIGHT_URL": bad})
    with pytest.raises(ConfigError, match="unknown preflight mode"):
        PreflightOptions.build(mode="maybe", env={})


# -- through `credbroker run` ---------------------------------------------------------------------


def setup_profile(server: OpenBao, tmp: Path) -> None:
    kv = f"credbroker/binance/pre-{secrets.token_hex(3)}"
    server.kv_put(kv, api_key=API_KEY, api_secret=SECRET)
    (tmp / "credbroker.toml").write_text(f"""
[profiles.bot]
source = "vault"
path = "secret/{kv}"
env = {{ BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }}
""")


def env_for(server: OpenBao, url: str) -> dict[str, str]:
    env = server.env()
    env["CREDBROKER_PREFLIGHT_URL"] = url
    return env


def preflight_records() -> list[dict[str, Any]]:
    from broker.audit import open_log

    path = Path(open_log(None).path)
    return [json.loads(line)["data"] for line in path.read_text().splitlines()
            if json.loads(line)["event"] == "preflight"]


def test_run_agent_refuses_a_key_that_can_withdraw_and_starts_with_the_override(
        openbao: OpenBao, tmp_path: Path, exchange: Any, run_broker: Any) -> None:
    setup_profile(openbao, tmp_path)
    ex = exchange(withdrawals=True)
    marker = tmp_path / "bot-ran"
    bot = [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]
    res = run_broker(["run", "--agent", "--profile", "bot", "--", *bot], env=env_for(openbao, ex.url))
    assert res.returncode == 125, res.stdout + res.stderr
    assert res.stderr.strip().count("\n") == 0
    assert "key preflight: this API key can withdraw funds (enableWithdrawals is true)" in res.stderr
    assert "--unsafe-allow-withdrawals" in res.stderr and not marker.exists()

    res = run_broker(["run", "--agent", "--unsafe-allow-withdrawals", "--profile", "bot", "--", *bot],
                     env=env_for(openbao, ex.url))
    assert res.returncode == 0, res.stderr
    assert "UNSAFE: this API key can withdraw funds" in res.stderr and marker.exists()
    assert [r["outcome"] for r in preflight_records()] == ["refused", "overridden"]
    assert SECRET not in res.stderr


def test_run_agent_refuses_a_margin_key_and_starts_with_unsafe_allow_margin(
        openbao: OpenBao, tmp_path: Path, exchange: Any, run_broker: Any) -> None:
    setup_profile(openbao, tmp_path)
    ex = exchange()
    ex.restrictions["enableMargin"] = True
    res = run_broker(["run", "--agent", "--profile", "bot", "--", "true"], env=env_for(openbao, ex.url))
    assert res.returncode == 125 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "key preflight: this API key can trade on margin (enableMargin is true)" in res.stderr
    assert "--unsafe-allow-margin" in res.stderr
    for _ in range(2):  # warned at every start
        res = run_broker(["run", "--agent", "--unsafe-allow-margin", "--profile", "bot", "--", "true"],
                         env=env_for(openbao, ex.url))
        assert res.returncode == 0, res.stderr
        assert "UNSAFE: this API key can trade on margin" in res.stderr
    assert [r["outcome"] for r in preflight_records()] == ["refused", "overridden", "overridden"]
    assert preflight_records()[-1]["overrides"] == ["--unsafe-allow-margin"]
    # A safe key whose trading authority ends in 5 days: started, warned, the date recorded.
    import time

    ex.restrictions.update(enableMargin=False, tradingAuthorityExpirationTime=int(time.time() * 1000) + 5 * 86_400_000)
    res = run_broker(["run", "--agent", "--profile", "bot", "--", "true"], env=env_for(openbao, ex.url))
    assert res.returncode == 0, res.stderr
    assert "WARNING: this API key's trading authority expires in 5 day(s)" in res.stderr
    last = preflight_records()[-1]
    assert last["outcome"] == "passed" and last["trading_authority_days_left"] == 5.0
    assert last["api_key"] == "********" + API_KEY[-4:]


def test_run_agent_refuses_a_key_without_ip_restriction(
        openbao: OpenBao, tmp_path: Path, exchange: Any, run_broker: Any) -> None:
    setup_profile(openbao, tmp_path)
    ex = exchange(ip_restrict=False)
    res = run_broker(["run", "--agent", "--profile", "bot", "--", "true"], env=env_for(openbao, ex.url))
    assert res.returncode == 125 and "ipRestrict is false" in res.stderr
    res = run_broker(["run", "--agent", "--unsafe-no-ip-restriction", "--profile", "bot", "--", "true"],
                     env=env_for(openbao, ex.url))
    assert res.returncode == 0 and "UNSAFE: this API key works from any IP address" in res.stderr


def test_run_agent_safe_key_passes_quietly_and_unreachable_is_skipped_in_auto(
        openbao: OpenBao, tmp_path: Path, exchange: Any, run_broker: Any) -> None:
    setup_profile(openbao, tmp_path)
    ex = exchange()
    res = run_broker(["run", "--agent", "--profile", "bot", "--", "true"], env=env_for(openbao, ex.url))
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert len(ex.requests) == 1
    with refused_url() as closed:
        res = run_broker(["run", "--agent", "--profile", "bot", "--", "true"], env=env_for(openbao, closed))
        assert res.returncode == 0 and "restrictions were NOT checked" in res.stderr
        res = run_broker(["run", "--agent", "--preflight", "--profile", "bot", "--", "true"],
                         env=env_for(openbao, closed))
        assert res.returncode == 125 and "cannot reach" in res.stderr
        res = run_broker(["run", "--agent", "--no-preflight", "--profile", "bot", "--", "true"],
                         env=env_for(openbao, closed))
        assert res.returncode == 0 and res.stderr == ""
    assert [r["outcome"] for r in preflight_records()] == ["passed", "skipped", "refused"]


def test_run_without_agent_preflight_is_opt_in(openbao: OpenBao, tmp_path: Path, exchange: Any,
                                               run_broker: Any) -> None:
    setup_profile(openbao, tmp_path)
    ex = exchange(withdrawals=True)
    res = run_broker(["run", "--profile", "bot", "--", "true"], env=env_for(openbao, ex.url))
    assert res.returncode == 0 and ex.requests == []
    res = run_broker(["run", "--preflight", "--profile", "bot", "--", "true"], env=env_for(openbao, ex.url))
    assert res.returncode == 125 and "can withdraw funds" in res.stderr
