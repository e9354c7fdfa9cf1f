"""broker.errors: the whole exception tree lives there, and one pair of functions carries it across processes."""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
from pathlib import Path

import pytest

import broker
from broker import errors
from broker.errors import BrokerError, PolicyRefused, VaultNotFound, from_dict

BROKER = Path(broker.__file__).parent
#: Not a credbroker error: a requests exception that transport raises inside requests' own redirect
#: handling, and turns into a VaultBadResponse at its boundary.
NOT_OURS = {
    ("broker/vault/transport.py", "RedirectRefused"),
    # Control flow between the proxy's HTTP parser and its event loop, never raised out of them: the
    # answer to send back to the bot.
    ("broker/proxy/http11.py", "BadRequest"),
    ("broker/proxy/ws.py", "Reply"),
    ("broker/preflight.py", "_ClockRefused"),  # -1021: ask once more with the exchange's clock
}


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_all_subclasses(sub)}
    return out


def _every_error_class() -> list[type[BrokerError]]:
    for info in pkgutil.walk_packages(broker.__path__, "broker."):
        if info.name != "broker.__main__":
            importlib.import_module(info.name)
    return sorted(_all_subclasses(BrokerError) | {BrokerError}, key=lambda c: c.__name__)


def test_every_error_class_lives_in_errors_py() -> None:
    classes = _every_error_class()
    assert len(classes) > 25
    outside = [f"{c.__module__}.{c.__name__}" for c in classes if c.__module__ != "broker.errors"]
    assert outside == []


def test_no_exception_class_is_defined_outside_errors_py() -> None:
    """Read every module: a class deriving from anything named ...Error/...Exception/...Refused is in errors.py."""
    found = []
    for path in sorted(BROKER.rglob("*.py")):
        rel = f"broker/{path.relative_to(BROKER).as_posix()}"
        if rel == "broker/errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and (rel, node.name) not in NOT_OURS:
                for base in node.bases:
                    name = ast.unparse(base).rsplit(".", 1)[-1]
                    if name.endswith(("Error", "Exception", "Refused", "Unreachable")):
                        found.append(f"{rel}: class {node.name}({ast.unparse(base)})")
    assert found == []


def _sample(cls: type[BrokerError]) -> BrokerError:
    if cls is PolicyRefused:
        return PolicyRefused("symbols", "ETHUSDT is not in [policy] symbols")
    return cls(f"{cls.__name__} happened", f"fix the {cls.__name__}")


@pytest.mark.parametrize("cls", _every_error_class(), ids=lambda c: c.__name__)
def test_every_error_survives_the_wire(cls: type[BrokerError]) -> None:
    err = _sample(cls)
    for wire in (err.to_dict(), err.to_wire(), {k: v for k, v in err.to_wire().items() if k != "error"}):
        back = from_dict(json.loads(json.dumps(wire)))
        assert type(back) is cls
        assert (back.message, back.remedy, back.exit_code, str(back)) == (err.message, err.remedy, err.exit_code,
                                                                          str(err))
        assert back.to_dict() == err.to_dict()


def test_fields_travel_with_the_error() -> None:
    err = VaultNotFound("secret/p has no field api_secret", "check the path")
    err.request_id, err.secret_path = "req-1", "secret/data/p"
    back = from_dict(err.to_dict())
    assert isinstance(back, VaultNotFound) and (back.request_id, back.secret_path) == ("req-1", "secret/data/p")
    refused = from_dict(PolicyRefused("max_notional", "5000 > 1000").to_wire())
    assert isinstance(refused, PolicyRefused) and refused.rule == "max_notional"
    assert refused.message == "signing policy refused the request (max_notional): 5000 > 1000"


def test_unknown_or_malformed_descriptions() -> None:
    assert type(from_dict({"error": "NoSuchError", "message": "m"})) is BrokerError
    assert type(from_dict({"type": "Exception", "message": "m"}, default=errors.SigningError)) is errors.SigningError
    bad = from_dict(["not", "a", "dict"])
    assert type(bad) is BrokerError and "invalid error" in bad.message
