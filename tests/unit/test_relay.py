"""The audit relay: only small signature_failure events from the child get recorded."""

from __future__ import annotations

import json
import os

from broker.relay import AuditRelay


def test_relays_signature_failures_and_drops_everything_else() -> None:
    got: list[tuple[str, dict[str, object]]] = []
    relay = AuditRelay(lambda event, fields: got.append((event, fields)))
    relay.child_pid = 4242
    fd = relay.child_fd
    good = {"event": "signature_failure", "fields": {"code": -1022, "endpoint": "/fapi/v1/order", "status": 400,
                                                     "params": ["symbol", "side"]}}
    lines = [
        json.dumps(good),
        json.dumps({"event": "secret_fetched", "fields": {"profile": "x"}}),  # not relayable
        json.dumps({"event": "signature_failure", "fields": {"nested": {"a": 1}}}),  # not flat
        json.dumps({"event": "signature_failure", "fields": {"msg": "x" * 1000}}),  # value too long
        "not json",
        "",
    ]
    # Split one write across the line boundary to check reassembly.
    data = ("\n".join(lines) + "\n").encode()
    os.write(fd, data[:10])
    os.write(fd, data[10:])
    assert relay.child_env() == {"CREDBROKER_AUDIT_FD": str(fd)}
    relay.close()
    assert got == [("signature_failure", {**good["fields"], "relayed_from": 4242})]  # type: ignore[dict-item]
    assert relay.dropped == 4


def test_a_failing_recorder_does_not_kill_the_relay() -> None:
    calls = []

    def boom(event: str, fields: dict[str, object]) -> None:
        calls.append(event)
        raise OSError("disk full")

    relay = AuditRelay(boom)
    line = json.dumps({"event": "signature_failure", "fields": {"code": -2015}}) + "\n"
    os.write(relay.child_fd, line.encode() * 2)
    relay.close()
    assert calls == ["signature_failure", "signature_failure"]
    assert relay.dropped == 2


def test_the_broker_stamps_relayed_failures_with_its_own_profile_host_and_pid() -> None:
    """A bot calling report_response() without a profile, or naming another one, is filed under its run."""
    got: list[tuple[str, dict[str, object]]] = []
    relay = AuditRelay(lambda event, fields: got.append((event, fields)), profile="um-futures", host="bot-7",
                       user="trader")
    relay.child_pid = 4242
    lines = [
        {"event": "signature_failure", "fields": {"code": -1022, "profile": None, "host": "forged"}},
        {"event": "signature_failure", "fields": {"code": -2015, "profile": "spot"}},
        {"event": "signature_failure", "fields": {"code": -2014, "profile": "um-futures", "claimed_profile": "x",
                                                  "relayed_from": 1, "user": "root"}},
    ]
    os.write(relay.child_fd, "".join(json.dumps(line) + "\n" for line in lines).encode())
    relay.close()
    assert [f for _, f in got] == [
        {"code": -1022, "profile": "um-futures", "host": "bot-7", "user": "trader", "relayed_from": 4242},
        {"code": -2015, "profile": "um-futures", "claimed_profile": "spot", "host": "bot-7", "user": "trader",
         "relayed_from": 4242},
        {"code": -2014, "profile": "um-futures", "host": "bot-7", "user": "trader", "relayed_from": 4242},
    ]


def test_a_run_of_several_profiles_files_each_report_under_the_profile_its_signer_names() -> None:
    """`run -p spot -p um-futures`: get_signer("spot") reports as spot; a claim outside the run is not taken."""
    got: list[tuple[str, dict[str, object]]] = []
    relay = AuditRelay(lambda event, fields: got.append((event, fields)), profile="spot,um-futures",
                       profiles=("spot", "um-futures"))
    relay.child_pid = 7
    lines = [
        {"event": "signature_failure", "fields": {"code": -1022, "profile": "spot"}},
        {"event": "signature_failure", "fields": {"code": -2015, "profile": "um-futures"}},
        {"event": "signature_failure", "fields": {"code": -2014, "profile": "other"}},
        {"event": "signature_failure", "fields": {"code": -1021}},
    ]
    os.write(relay.child_fd, "".join(json.dumps(line) + "\n" for line in lines).encode())
    relay.close()
    assert [(f["code"], f["profile"], f.get("claimed_profile")) for _, f in got] == [
        (-1022, "spot", None), (-2015, "um-futures", None), (-2014, "spot,um-futures", "other"),
        (-1021, "spot,um-futures", None),
    ]
