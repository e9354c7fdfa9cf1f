"""One review for many hosts: `credbroker audit report|verify --host-logs DIR` over logs collected as
DIR/HOST/audit.log*. Each host's chain is verified on its own: a tampered host and a host with a gap are
named, and the other hosts' findings still show; every row names its host (text, JSON, HTML); Vault
anchors (a real OpenBao) are compared per host; bad input is one line, exit 125."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from broker.audit.anchor import make_payload, place_for, write
from broker.vault.settings import VaultSettings
from broker.audit.chain import ANCHOR_LABEL, labelled_mac
from broker.audit.fleet import discover, fleet_report
from broker.audit.settings import load_settings
from broker.cli import cli
from broker.errors import AuditError
from tests.conftest import OpenBao

from tests.helpers.auditlog import KEYED_LOG_KEY as KEY, NOW, SINCE, Writer, keyed_log


def host_log(folder: Path, host: str, mp: pytest.MonkeyPatch, failures: int = 0, signs: int = 0) -> Path:
    """A host's log: three weeks of history, runs in the period, ``failures`` signature failures."""
    path = folder / host / "audit.log"
    w = Writer(path, mp)
    day0 = NOW - timedelta(days=28)
    pid = 100
    for d in range(0, 27, 2):
        pid += 1
        w.run(day0 + timedelta(days=d, hours=9), ["python", "bot.py"], 3, host=host, pid=pid,
              profile=f"futures-{host}")
        for i in range(signs):  # high-rate records, before and in the period
            w.at(day0 + timedelta(days=d, hours=10, seconds=i), "sign", host, profile=f"futures-{host}")
    for i in range(failures):
        w.at(NOW - timedelta(days=2, minutes=-i), "signature_failure", host, profile=f"futures-{host}",
             code=-2015, endpoint="https://fapi.binance.com/fapi/v1/order", status=401, host=host,
             message="Invalid API-key, IP, or permissions for action.")
    w.log.close()
    mp.undo()
    return path


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """bot-a (intact, 3 signature failures), bot-b (a record edited), bot-c (a record removed)."""
    root = tmp_path / "fleet"
    host_log(root, "bot-a", monkeypatch, failures=3)
    edited = host_log(root, "bot-b", monkeypatch)
    lines = edited.read_bytes().splitlines(keepends=True)
    at = [i for i, line in enumerate(lines) if b'"python"' in line][2]
    lines[at] = lines[at].replace(b'"python"', b'"pythoN"')
    edited.write_bytes(b"".join(lines))
    gap = host_log(root, "bot-c", monkeypatch, failures=1)
    lines = gap.read_bytes().splitlines(keepends=True)
    del lines[7]
    gap.write_bytes(b"".join(lines))
    return root


def _report(root: Path) -> dict[str, Any]:
    return fleet_report(discover([str(root)]), since=SINCE, until=NOW).to_dict()


def test_each_host_is_verified_alone_and_a_broken_one_hides_no_other_finding(fleet: Path) -> None:
    r = _report(fleet)
    chains = {c["host"]: c for c in r["chain"]["hosts"]}
    assert chains["bot-a"]["status"] == "intact" and chains["bot-a"]["records"] > 40
    assert chains["bot-b"]["status"] == "broken" and chains["bot-b"]["problem"]["kind"] == "edited"
    assert chains["bot-c"]["status"] == "broken" and chains["bot-c"]["problem"]["kind"] == "deleted"
    assert "bot-b" in chains["bot-b"]["problem"]["file"] and "bot-c" in chains["bot-c"]["problem"]["file"]
    assert r["chain"]["broken_hosts"] == ["bot-b", "bot-c"] and not r["chain"]["ok"]
    summary = {i["name"]: i for i in r["summary"]}
    assert summary["broken"]["count"] == 2 and "bot-b, bot-c" in summary["broken"]["note"]
    # The intact host's failures, and the broken gap host's, are all still reported, each with its host.
    assert summary["signature-failures"]["count"] == 4
    by_host = {g["hosts"][0]: g["count"] for g in r["signature_failures"]["by_code"]}
    assert by_host == {"bot-a": 3, "bot-c": 1}
    assert {p["host"] for p in r["profiles"]} == {"bot-a", "bot-b", "bot-c"}
    assert all(p["profile"] == f"futures-{p['host']}" for p in r["profiles"])
    hosts = {h["host"]: h for h in r["hosts"]}
    assert hosts["bot-a"]["ok"] and not hosts["bot-b"]["ok"] and hosts["bot-a"]["signature_failures"] == 3
    assert r["fleet"] is True


def test_host_column_in_text_json_and_html(fleet: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    page = tmp_path / "fleet.html"
    res = runner.invoke(cli, ["audit", "report", "--host-logs", str(fleet), "--since", SINCE.isoformat(),
                              "--until", NOW.isoformat(), "--html", str(page)])
    assert res.exit_code == 0, res.output
    text = res.output
    assert "HOSTS: 3" in text
    assert "bot-b: BROKEN:" in text and ": edited:" in text and "bot-c: BROKEN:" in text and ": deleted:" in text
    assert "bot-a: intact" in text
    profiles = text.split("PROFILES")[1].split("\n\n")[0]
    assert "host" in profiles.splitlines()[1]
    for host in ("bot-a", "bot-b", "bot-c"):
        assert any(line.strip().startswith(f"{host}  futures-{host}") for line in profiles.splitlines()), profiles
    res = runner.invoke(cli, ["audit", "report", "--host-logs", str(fleet), "--json", "--since",
                              SINCE.isoformat(), "--until", NOW.isoformat()])
    data = json.loads(res.output)
    assert all("host" in p for p in data["profiles"]) and len(data["hosts"]) == 3
    html = page.read_text()
    assert 'id="hosts-table"' in html and 'id="chain-table"' in html
    profiles_html = html.split('id="profiles-table"')[1].split("</table>")[0]
    assert "<th>Host</th>" in profiles_html and "<td>bot-c</td>" in profiles_html
    assert json.loads(html.split('id="report-data">')[1].split("</script>")[0])["hosts"][1]["host"] == "bot-b"


def test_fail_on_broken_names_the_fleet(fleet: Path) -> None:
    res = CliRunner().invoke(cli, ["audit", "report", "--host-logs", str(fleet), "--fail-on", "broken"])
    assert res.exit_code == 1


def test_verify_host_logs_names_each_host_and_exits_1(fleet: Path) -> None:
    res = CliRunner().invoke(cli, ["audit", "verify", "--host-logs", str(fleet)])
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()
    assert any(x.startswith("bot-a: audit log intact") for x in lines)
    assert any(x.startswith("bot-b: audit log NOT intact") and "edited" in x for x in lines)
    assert any(x.startswith("bot-c: audit log NOT intact") and "deleted" in x for x in lines)
    assert lines[-1] == "3 host(s): NOT intact on bot-b, bot-c"
    shutil.rmtree(fleet / "bot-b")
    shutil.rmtree(fleet / "bot-c")
    ok = CliRunner().invoke(cli, ["audit", "verify", "--host-logs", str(fleet), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["hosts"][0]["host"] == "bot-a"


def test_named_hosts_and_any_file_names_in_chain_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A collector's logrotate names (audit.log.1 older than audit.log) and NAME=PATH both work."""
    path = host_log(tmp_path, "solo", monkeypatch)
    lines = path.read_bytes().splitlines(keepends=True)
    (tmp_path / "solo" / "audit.log.1").write_bytes(b"".join(lines[:20]))
    path.write_bytes(b"".join(lines[20:]))
    hosts = discover([f"solo={tmp_path / 'solo'}", f"copy={tmp_path / 'solo' / 'audit.log.1'}"])
    assert [h.host for h in hosts] == ["solo", "copy"]
    assert [p.name for p in hosts[0].files] == ["audit.log.1", "audit.log"]
    r = fleet_report(hosts, since=SINCE, until=NOW).to_dict()
    assert [c["status"] for c in r["chain"]["hosts"]] == ["intact", "intact"]


def test_bad_input_is_one_line_exit_125(fleet: Path, tmp_path: Path, run_broker) -> None:  # type: ignore[no-untyped-def]
    def fails(*args: str) -> str:
        res = run_broker(["audit", *args], env=dict(os.environ))
        assert res.returncode == 125, res.stdout + res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr and not res.stdout
        return str(res.stderr)

    assert "no such folder" in fails("report", "--host-logs", str(tmp_path / "missing"))
    assert "no such folder" in fails("verify", "--host-logs", str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no host folders" in fails("report", "--host-logs", str(empty))
    (fleet / "junk").mkdir()
    (fleet / "junk" / "audit.log").write_bytes(b"this is not\nan audit log\n")
    assert "host junk: no audit record" in fails("report", "--host-logs", str(fleet))
    shutil.rmtree(fleet / "junk")
    (fleet / "bot-a" / "audit.log.1.gz").write_bytes(b"\x1f\x8b\x08\x00")
    assert "host bot-a" in fails("verify", "--host-logs", str(fleet)) and "is compressed" in fails(
        "report", "--host-logs", str(fleet))
    (fleet / "bot-a" / "audit.log.1.gz").unlink()
    unreadable = fleet / "bot-a" / "audit.log"
    if os.geteuid() == 0:  # root reads any file: a link to a file that is not there cannot be read by anyone
        (fleet / "bot-a" / "audit.log.1").symlink_to(tmp_path / "not-copied")
        assert "cannot read" in fails("report", "--host-logs", str(fleet))
        (fleet / "bot-a" / "audit.log.1").unlink()
    else:
        unreadable.chmod(0)
        try:
            assert "cannot read" in fails("report", "--host-logs", str(fleet))
        finally:
            unreadable.chmod(0o600)
    assert "not both" in fails("report", "--host-logs", str(fleet), "--log", str(unreadable))


def test_garbage_lines_break_only_their_host(fleet: Path) -> None:
    path = fleet / "bot-a" / "audit.log"
    lines = path.read_bytes().splitlines(keepends=True)
    lines.insert(10, b"Dec  2 10:00:01 bot-a kernel: garbage in the middle\n")
    path.write_bytes(b"".join(lines))
    r = _report(fleet)
    a = next(c for c in r["chain"]["hosts"] if c["host"] == "bot-a")
    assert a["problem"]["kind"] == "inserted" and a["problem"]["line"] == 11
    assert r["signature_failures"]["total"] == 4  # bot-a's failures are still counted


def test_a_missing_host_path_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(AuditError) as err:
        discover([f"x={tmp_path / 'nothing-here'}"])
    assert "no such file or folder" in err.value.message


def test_vault_anchors_are_compared_per_host(openbao: OpenBao, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Each host's anchor (PREFIX/<host>/<kid>-<log id>) is compared with that host's chain: the host whose
    newest records were cut after its anchor is caught, the other matches."""
    root = tmp_path / "fleet"
    prefix = f"secret/credbroker-audit-{secrets.token_hex(3)}"
    env = openbao.env()
    mac = labelled_mac(KEY, ANCHOR_LABEL)
    for host in ("bot-a", "bot-b"):
        path = root / host / "audit.log"
        w = Writer(path, monkeypatch)
        w.log = keyed_log(path)
        for i in range(4):
            w.at(NOW - timedelta(days=1, minutes=i), "secret_fetched", host, profile="p", i=i)
        w.log.close()
        monkeypatch.undo()
        last = json.loads(path.read_bytes().splitlines()[-1])
        settings = load_settings({"path": f"/home/trader/.local/state/{host}/audit.log", "anchor": prefix}, {})
        place = place_for(settings, w.log.key_id, host=host)
        assert place is not None
        write(VaultSettings.from_env(env), place,
              make_payload(last["seq"], last["hash"], w.log.key_id, str(settings.path), last["ts"], mac))
    for head in root.glob("*/*.head"):  # a collector gets the records, not the hosts' head files
        head.unlink()
    # bot-b's newest record is cut after it was anchored: only the anchor can tell.
    cut = root / "bot-b" / "audit.log"
    cut.write_bytes(b"".join(cut.read_bytes().splitlines(keepends=True)[:-1]))
    config = tmp_path / "credbroker.toml"
    config.write_text(f'[audit]\nanchor = "{prefix}"\n')
    config.chmod(0o600)
    for k, v in {**env, "CREDBROKER_AUDIT_KEY": KEY.hex()}.items():
        monkeypatch.setenv(k, v)
    assert CliRunner().invoke(cli, ["--config", str(config), "audit", "verify", "--no-vault-anchors", "--host-logs", str(root)]).exit_code == 0
    res = CliRunner().invoke(cli, ["--config", str(config), "audit", "verify", "--host-logs", str(root)])
    assert res.exit_code == 1, res.output
    assert "bot-a: audit log intact" in res.output and "1 Vault anchor(s) matched" in res.output
    b_line = next(x for x in res.output.splitlines() if x.startswith("bot-b:"))
    assert "truncated" in b_line and "anchor for seq 4" in b_line
    rep = CliRunner().invoke(cli, ["--config", str(config), "audit", "report", "--host-logs", str(root), "--json",
                                   "--since", SINCE.isoformat(), "--until", NOW.isoformat()])
    hosts = {h["host"]: h for h in json.loads(rep.output)["hosts"]}
    assert hosts["bot-a"]["ok"] and hosts["bot-a"]["anchors_checked"] == 1
    assert not hosts["bot-b"]["ok"] and hosts["bot-b"]["problem"]["kind"] == "truncated"


def test_one_host_in_the_fleet_reports_what_its_own_report_says(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The fleet's one-pass walk (older high-rate records verified, not handed to the report) gives the same
    numbers as the single-log report: over the log with one of each anomaly, and over one with high-rate
    records before and in the period."""
    from broker.audit.files import log_set
    from broker.audit.report import build_report

    from tests.helpers.auditlog import generate

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("host", "log_host")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    rich = tmp_path / "rich" / "bot-1" / "audit.log"
    rich.parent.mkdir(parents=True)
    generate(rich, monkeypatch)
    busy = host_log(tmp_path / "busy", "bot-2", monkeypatch, failures=2, signs=5)
    assert b'"sign"' in busy.read_bytes().splitlines()[3]
    for path in (rich, busy):
        alone = build_report(log_set(path), since=SINCE, until=NOW, active=path, parallel=False).to_dict()
        fleet = _report(path.parent.parent)
        for name in ("profiles", "stale_versions", "rotations", "new_commands", "new_hosts", "unusual_hours",
                     "refusals", "policy_refusals", "events", "daily"):
            assert strip(fleet[name]) == strip(alone[name]), name
        assert [(i["name"], i["count"]) for i in fleet["summary"]] == [(i["name"], i["count"])
                                                                       for i in alone["summary"]]
        assert [(f["kind"], f["seqs"]) for f in fleet["findings"]] == [(f["kind"], f["seqs"])
                                                                       for f in alone["findings"]]
        assert fleet["records_in_period"] == alone["records_in_period"] > 0
        assert fleet["chain"]["records"] == alone["chain"]["records"]
    assert alone["events"]["sign"] == 15 and alone["signature_failures"]["total"] == 2


def test_a_gap_the_writer_recorded_on_one_host_is_that_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records cut off one host's log (`head -n -3`): its next writer records a gap; the fleet report counts
    it for that host and names it in the per-host chain, the other host stays intact."""
    root = tmp_path / "fleet"
    host_log(root, "bot-a", monkeypatch, failures=1)
    cut = host_log(root, "bot-b", monkeypatch)
    lines = cut.read_bytes().splitlines(keepends=True)
    cut.write_bytes(b"".join(lines[:-3]))
    w = Writer(cut, monkeypatch)
    w.at(NOW - timedelta(hours=1), "secret_fetched", "bot-b", profile="futures-bot-b")
    w.log.close()
    monkeypatch.undo()
    r = _report(root)
    chains = {c["host"]: c for c in r["chain"]["hosts"]}
    assert chains["bot-a"]["ok"] and not chains["bot-b"]["ok"]
    assert chains["bot-b"]["problem"]["kind"] == "gap" and chains["bot-b"]["gaps"]
    assert all(g["host"] == "bot-b" for g in r["chain"]["gaps"]) and r["chain"]["gaps"]
    summary = {i["name"]: i["count"] for i in r["summary"]}
    assert summary["gaps"] == len(chains["bot-b"]["gaps"]) and summary["broken"] == 1
    assert summary["signature-failures"] == 1  # bot-a's, still there
    res = CliRunner().invoke(cli, ["audit", "verify", "--host-logs", str(root)])
    assert res.exit_code == 1 and "bot-b: audit log NOT intact" in res.output and ": gap:" in res.output


def test_vault_audit_cross_check_over_the_fleet(audited_openbao, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """One Vault audit log, two hosts' reads: each host's recorded read is matched (whichever host made it),
    a read no host recorded stands out."""
    from broker.access import fetch
    from broker.config import Profile

    from tests.helpers.auditlog import make_log

    server = audited_openbao
    server.kv_put("credbroker/binance/fleet", api_key="AK" + secrets.token_hex(8), api_secret="S" * 20)
    broker_token = server.client().auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
    profile = Profile(name="fleet", source="vault", env={"BINANCE_API_SECRET": "api_secret"},
                      options={"path": "secret/credbroker/binance/fleet"})
    for host in ("bot-a", "bot-b"):
        log = make_log(tmp_path / "fleet" / host / "audit.log")
        creds = fetch(profile, env=server.env(broker_token))
        log.record("secret_fetched", {"profile": "fleet", **creds.origin.to_dict(), "fields": ["api_secret"]})
        creds.wipe()
        log.close()
    server.cli("kv", "get", "secret/credbroker/binance/fleet")  # nobody's bot: the root token, by hand
    env = {**server.env(broker_token)}
    res = CliRunner().invoke(cli, ["audit", "report", "--json", "--host-logs", str(tmp_path / "fleet"),
                                   "--vault-audit", str(server.extra["audit_log"])], env=env,
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    va = json.loads(res.output)["vault_audit"]
    assert va["vault_reads"] == 3 and va["matched"] == 2 and va["unmatched_total"] == 1, va
    assert va["unmatched"][0]["token"] == "another token"


def test_hosts_balanced_by_size_come_back_in_the_order_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers take the largest host first; the report's rows stay in the hosts' order, each its own."""
    root = tmp_path / "fleet"
    host_log(root, "bot-a", monkeypatch)
    host_log(root, "bot-b", monkeypatch)
    host_log(root, "bot-c", monkeypatch, signs=200)  # the largest, last by name
    hosts = discover([str(root)])
    assert [h.host for h in hosts] == ["bot-a", "bot-b", "bot-c"]
    parallel = fleet_report(hosts, since=SINCE, until=NOW, workers=2).to_dict()
    alone = fleet_report(hosts, since=SINCE, until=NOW, workers=1).to_dict()
    rows = parallel["hosts"]
    assert [r["host"] for r in rows] == ["bot-a", "bot-b", "bot-c"]
    assert rows[2]["records"] > rows[0]["records"] + 2000
    assert parallel == alone
