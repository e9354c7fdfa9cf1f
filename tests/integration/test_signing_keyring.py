"""get_signer(profile=...) through the OS keyring source, against the real Secret Service."""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from broker.errors import KeyringNotFound
from broker.signing import get_signer

pytestmark = pytest.mark.keyring


def _store(service: str, **fields: str) -> None:
    import keyring

    for name, value in fields.items():
        keyring.set_password(service, name, value)


def _config(tmp: Path, service: str) -> None:
    (tmp / "credbroker.toml").write_text(f"""
[profiles.spot]
source = "keyring"
service = "{service}"
env = {{ BINANCE_API_KEY = "api_key", BINANCE_PRIVATE_KEY = "private_key" }}
""")


def _audit() -> list[dict[str, Any]]:
    from broker.audit import open_log

    return [json.loads(line) for line in Path(open_log(None).path).read_text().splitlines() if line.strip()]


def test_ed25519_key_from_keyring(secret_service: Any, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    service = "credbroker/test-" + secrets.token_hex(4)
    api_key = "E" * 64
    _store(service, api_key=api_key, private_key=pem)
    _config(tmp_path, service)
    signer = get_signer(profile="spot")
    assert signer.kind == "ed25519"
    key.public_key().verify(base64.b64decode(signer.sign("a=1&timestamp=2")), b"a=1&timestamp=2")
    fetched = [r for r in _audit() if r.get("event") == "secret_fetched"]
    assert fetched and "spot" in json.dumps(fetched[-1])
    from broker.audit import open_log

    raw = Path(open_log(None).path).read_text()
    assert pem.splitlines()[1] not in raw and api_key not in raw


def test_missing_keyring_entry_fails_closed(secret_service: Any, tmp_path: Path) -> None:
    service = "credbroker/test-" + secrets.token_hex(4)
    _store(service, api_key="E" * 64)  # no private_key
    _config(tmp_path, service)
    with pytest.raises(KeyringNotFound) as err:
        get_signer(profile="spot")
    assert "private_key" in str(err.value) and err.value.exit_code == 125
