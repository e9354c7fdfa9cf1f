"""broker.childenv: the broker <-> bot variables are named in that one module, written and read through it."""

from __future__ import annotations

import re
from pathlib import Path

import broker
from broker import childenv

BROKER = Path(broker.__file__).parent


def test_no_module_spells_a_contract_variable() -> None:
    names = "|".join(sorted(re.escape(v) for v in childenv.CONTRACT))
    pattern = re.compile(rf"[\"']({names})[\"']")
    found = []
    for path in sorted(BROKER.rglob("*.py")):
        if path.name == "childenv.py" and path.parent == BROKER:
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(BROKER)}:{lineno}: {line.strip()}")
    assert found == []
    assert len(childenv.CONTRACT) == 13 and all(v.startswith("CREDBROKER_") for v in childenv.CONTRACT)


def test_env_map_round_trip_and_bad_values() -> None:
    mapping = {"BINANCE_API_KEY": "api_key", "BINANCE_API_SECRET": "api_secret"}
    environ = {childenv.ENV_MAP: childenv.encode_env_map(mapping), childenv.PROFILE: "um"}
    assert childenv.env_map(environ) == mapping and childenv.profile(environ) == "um"
    for bad in ("not json", "[1, 2]", '{"A": 1}', ""):
        assert childenv.env_map({childenv.ENV_MAP: bad}) == {}
    assert childenv.env_map({}) == {} and childenv.profile({childenv.PROFILE: ""}) is None


def test_the_writers_and_readers_use_the_same_names() -> None:
    """What the broker's side sets is what the bot's side reads (the constants other modules kept are aliases)."""
    from broker import relay, runner, signing
    from broker.agent import protocol as agent
    from broker.proxy import KIND_VAR, SECRET_VAR, URL_VAR
    from broker.signing import agent as agent_client
    from broker.signing import audit_bridge

    assert runner.NEST_VAR == signing.RUN_VAR == childenv.RUN
    assert agent.SOCKET_VAR == agent_client.SOCKET_VAR == childenv.AGENT_SOCKET
    assert relay.RELAY_FD_VAR == audit_bridge.RELAY_FD_VAR == childenv.AUDIT_FD
    assert KIND_VAR == signing.KEY_KIND_VAR == childenv.KEY_KIND
    assert (URL_VAR, SECRET_VAR) == (childenv.PROXY_URL, childenv.PROXY_SECRET)
