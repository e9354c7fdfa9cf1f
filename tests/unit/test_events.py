"""broker.events: every audit event name in one StrEnum, the recorder type spelled once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import broker
from broker.events import Event, Recorder

BROKER = Path(broker.__file__).parent
#: Functions that write an audit record; their first argument is the event's name.
RECORDING = re.compile(r"^_?(rec|record|recorded|record_event|_recorded)$")


def _calls() -> list[tuple[str, int, ast.expr]]:
    out = []
    for path in sorted(BROKER.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and node.args:
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
                if RECORDING.match(name):
                    out.append((f"{path.relative_to(BROKER)}", node.lineno, node.args[0]))
    return out


def test_no_event_name_is_written_as_a_bare_string() -> None:
    calls = _calls()
    assert len(calls) > 30
    bare = [f"{where}:{line}: {arg.value!r}" for where, line, arg in calls
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
    assert bare == []


def test_event_names_are_unique_and_fit_the_log_schema() -> None:
    values = [e.value for e in Event]
    assert len(values) == len(set(values))
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", v) for v in values)
    assert Event.SECRET_FETCHED == "secret_fetched" and f"{Event.GAP}" == "gap"  # written as plain text


def test_the_recorder_type_is_spelled_once() -> None:
    spelled = []
    for path in sorted(BROKER.rglob("*.py")):
        if path.name == "events.py":
            continue
        text = path.read_text(encoding="utf-8")
        for pattern in (r"Callable\[\[str, (dict|Mapping)\[str, (Any|object)\]\], (Any|object|None)\]",
                        r"^Recorder\s*="):
            spelled += [f"{path.relative_to(BROKER)}: {m.group(0)}" for m in re.finditer(pattern, text, re.M)]
    assert spelled == []


def test_the_report_counts_events_by_their_names() -> None:
    from broker.audit.report import CHART_EVENTS, DETAIL_EVENTS

    assert all(isinstance(e, Event) for e in DETAIL_EVENTS)
    assert {e for _, e in CHART_EVENTS} == set(DETAIL_EVENTS)


def test_a_plain_function_and_the_audit_log_are_recorders(tmp_path: Path) -> None:
    from broker.audit import open_log

    seen: list[tuple[str, dict[str, object]]] = []

    def collect(event: str, fields: dict[str, object]) -> None:
        seen.append((event, fields))

    recorders: list[Recorder] = [collect, open_log(None, env={"XDG_STATE_HOME": str(tmp_path)}).record]
    for record in recorders:
        record(Event.PREFLIGHT, {"profile": "p", "outcome": "ok"})
    assert seen == [("preflight", {"profile": "p", "outcome": "ok"})]
    assert '"event":"preflight"' in (tmp_path / "credbroker" / "audit.log").read_text()
