"""The key preflight under `credbroker run --proxy`: on by default, asking the proxy's spot upstream.

A bot behind the proxy holds no key, but the key the proxy signs with must
still have Read, Trade and Futures rights only. End to end: the key in the
real OpenBao, the real `credbroker run --proxy`, tests/helpers/fake_binance.py as the
exchange (spot and futures upstreams), which answers apiRestrictions.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from broker.preflight import DEFAULT_BASE_URL, PATH, PreflightOptions
from broker.proxy.settings import TESTNET, ProxySettings
from tests.conftest import OpenBao, credbroker_bin, free_port
from tests.helpers.fake_binance import FakeBinance
from tests.helpers.auditlog import audit_records
from tests.helpers.proxy import fake, proxy_profile  # noqa: F401  (fake: the fixture)

BOT = "import sys; open(sys.argv[1], 'w').write('started')"


def preflights() -> list[dict[str, Any]]:
    return [r["data"] for r in audit_records() if r["event"] == "preflight"]


def run_proxy(openbao: OpenBao, tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    marker = tmp_path / f"started-{len(list(tmp_path.glob('started-*')))}-{len(flags)}"
    proc = subprocess.run([credbroker_bin(), "run", "--proxy", *flags, "-p", "bot", "--", sys.executable, "-c", BOT,
                           str(marker)], env=openbao.env(), capture_output=True, text=True, timeout=120)
    return proc, marker


def test_a_margin_key_is_refused_under_proxy_and_starts_with_unsafe_allow_margin(
        openbao: OpenBao, tmp_path: Path, fake: FakeBinance) -> None:  # noqa: F811
    proxy_profile(openbao, tmp_path, fake, "hmac")
    fake.restrictions["enableMargin"] = True
    proc, marker = run_proxy(openbao, tmp_path)
    assert proc.returncode == 125, proc.stderr
    assert "key preflight: this API key can trade on margin (enableMargin is true)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()  # the bot never started
    # Asked on the proxy's spot upstream (the profile's [proxy] spot), signed with the real key.
    asked = fake.preflights()
    assert len(asked) == 1 and asked[0].status == 200 and asked[0].api_key is not None
    assert [(r["outcome"], r["url"], r["mode"]) for r in preflights()] == [("refused", fake.url + PATH, "auto")]
    assert not [r for r in audit_records() if r["event"] == "proxy_started"]
    # The override lets it start, with the warning at every start.
    for _ in range(2):
        proc, marker = run_proxy(openbao, tmp_path, "--unsafe-allow-margin")
        assert proc.returncode == 0, proc.stderr
        assert marker.read_text() == "started"
        assert "UNSAFE: this API key can trade on margin (enableMargin is true); started anyway because of " \
               "--unsafe-allow-margin" in proc.stderr
    assert [r["outcome"] for r in preflights()] == ["refused", "overridden", "overridden"]
    assert preflights()[-1]["overrides"] == ["--unsafe-allow-margin"]
    assert len(fake.preflights()) == 3


def test_a_safe_key_passes_quietly_and_no_preflight_skips_it(openbao: OpenBao, tmp_path: Path,
                                                             fake: FakeBinance) -> None:  # noqa: F811
    proxy_profile(openbao, tmp_path, fake, "ed25519")
    fake.clock_offset_ms = 8_000  # this host's clock is 8 s behind the exchange's: more than recvWindow
    proc, marker = run_proxy(openbao, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert marker.exists() and "preflight" not in proc.stderr
    proc, marker = run_proxy(openbao, tmp_path, "--no-preflight")
    assert proc.returncode == 0 and marker.exists(), proc.stderr
    assert [r["outcome"] for r in preflights()] == ["passed"]
    # Signed with the exchange's clock, learned first from its time endpoint (as the proxy signs): no -1021.
    assert [(r.status, r.code) for r in fake.preflights()] == [(200, None)]
    assert [r.path for r in fake.requests][:2] == ["/api/v3/time", PATH]


def test_an_unreachable_spot_upstream_is_a_warning_in_auto_and_a_refusal_with_preflight(
        openbao: OpenBao, tmp_path: Path, fake: FakeBinance) -> None:  # noqa: F811
    proxy_profile(openbao, tmp_path, fake, "hmac")
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = tmp_path / "credbroker.toml"
    config.write_text(config.read_text().replace(f'spot = "{fake.url}"', f'spot = "{closed}"'))
    proc, marker = run_proxy(openbao, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert marker.exists()
    assert f"WARNING: key preflight: cannot reach {closed}" in proc.stderr
    assert "the key's restrictions were NOT checked" in proc.stderr
    proc, marker = run_proxy(openbao, tmp_path, "--preflight")
    assert proc.returncode == 125 and not marker.exists()
    assert f"key preflight: cannot reach {closed}" in proc.stderr
    assert [(r["outcome"], r["url"]) for r in preflights()] == [("skipped", closed + PATH), ("refused", closed + PATH)]
    assert fake.preflights() == []


def test_a_1021_from_this_hosts_clock_is_asked_again_with_the_exchanges_clock(fake: FakeBinance) -> None:  # noqa: F811
    from broker.preflight import run_preflight
    from broker.secret import Secret
    from broker.signing.hmac_sha256 import HmacSigner

    fake.add_hmac("K" * 64, "s" * 64)
    fake.clock_offset_ms = 8_000
    records: list[tuple[str, dict[str, Any]]] = []
    result = run_preflight(HmacSigner("K" * 64, Secret("s" * 64)), PreflightOptions.build(mode="on", base_url=fake.url),
                           profile="p", record=lambda e, f: records.append((e, f)) is None, warn=lambda m: None)
    assert result is not None and result.outcome == "passed"
    assert [(r.status, r.code) for r in fake.preflights()] == [(400, -1021), (200, None)]
    assert [r.path for r in fake.requests] == [PATH, "/api/v3/time", PATH]
    assert [f["outcome"] for _, f in records] == ["passed"]


def test_the_proxy_spot_upstream_is_the_default_url_a_named_one_wins_and_auto_skips_testnets() -> None:
    local = ProxySettings.from_mapping({"spot": "http://127.0.0.1:9", "unsafe_plain_http_loopback": True}, "t")
    auto = PreflightOptions.build(mode="auto", env={})
    assert auto.base_url == DEFAULT_BASE_URL and not auto.url_given
    assert auto.for_proxy(local) == auto._replace(base_url="http://127.0.0.1:9", sync_clock=True)
    # no [proxy] table: production spot, the default
    assert auto.for_proxy(ProxySettings()) == auto._replace(sync_clock=True)
    named = PreflightOptions.build(mode="auto", base_url="http://127.0.0.1:7/", env={})
    assert named.url_given and named.for_proxy(local) == named._replace(sync_clock=True)
    from_env = PreflightOptions.build(mode="on", env={"CREDBROKER_PREFLIGHT_URL": "https://example.com"})
    assert from_env.for_proxy(local).base_url == "https://example.com"
    testnet = ProxySettings.from_mapping({"testnet": True}, "t")
    assert auto.for_proxy(testnet) is None  # no /sapi/ on Binance's testnets
    assert PreflightOptions.build(mode="on", env={}).for_proxy(testnet).base_url == TESTNET["spot"]


def test_an_unsafe_switch_for_a_proxy_run_without_preflight_is_warned_about(capsys: Any) -> None:
    from broker.agent.run import RunSigning
    from broker.config import Profile

    env = {"BINANCE_API_KEY": "api_key", "BINANCE_API_SECRET": "api_secret"}
    testnet = Profile(name="p", source="vault", env=env, sections={"proxy": {"testnet": True}})
    margin = PreflightOptions.build(mode="auto", env={}, unsafe_allow_margin=True)
    signing = RunSigning.prepare(testnet, agent=False, preflight=margin, env={}, proxy=True)
    assert signing.preflight is None
    assert "WARNING: --unsafe-allow-margin is given but the key preflight does not run" in capsys.readouterr().err
    # A production upstream: the check runs there, and nothing is said before it does.
    prod = RunSigning.prepare(testnet._replace(sections={}), agent=False, preflight=margin, env={}, proxy=True)
    assert prod.preflight is not None and prod.preflight.base_url == DEFAULT_BASE_URL and prod.preflight.sync_clock
    assert capsys.readouterr().err == ""
