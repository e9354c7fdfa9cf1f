"""Every secret source passes tests/helpers/source_conformance.py, against the real backend.

- Vault KV v2 against the real OpenBao, fetched three ways: in this process,
  through a running ``credbroker daemon``, and in a forked child
  (``credbroker run``'s isolated fetch when no daemon runs);
- the OS keyring against the real Secret Service.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from broker import daemon, sources
from broker.config import Profile
from broker.secret import Credentials

from tests.conftest import OpenBao, SecretService, credbroker_bin, refused_url
from tests.helpers.source_conformance import SourceAdapter, SourceConformance

#: Values every backend can hold and no bot can use (empty and oversized values are cases of their own).
NUL_VALUE = "nul-\x00-in-the-middle"


class VaultAdapter(SourceAdapter):
    """A KV v2 secret at ``secret/conform/<random>``, fetched in this process."""

    source = "vault"
    request_ids = True

    def __init__(self, server: OpenBao, env: Mapping[str, str] | None = None) -> None:
        self.server = server
        self._env = dict(env if env is not None else server.env())

    @property
    def env(self) -> dict[str, str]:
        return self._env

    def store(self, values: Mapping[str, Any]) -> dict[str, Any]:
        path = f"conform/{uuid.uuid4().hex}"
        self.server.client().secrets.kv.v2.create_or_update_secret(path=path, secret=dict(values),
                                                                     mount_point="secret")
        return {"path": f"secret/{path}"}

    def absent(self) -> dict[str, Any]:
        return {"path": f"secret/conform/absent-{uuid.uuid4().hex}"}

    def refused_locations(self) -> list[dict[str, Any]]:
        return [{"path": ""}, {"path": "secret/conform/../other"}, {"path": "secret//conform"}]

    def bad_values(self) -> dict[str, Any]:
        return {"a NUL byte": NUL_VALUE, "a map": {"k": "map-value-1234"}, "a list": ["list-value-1234"],
                "a boolean": True, "null": None}

    def fetch(self, profile: Profile) -> Credentials:
        return sources.fetch(profile, env=self.env, use_daemon=False)

    @contextmanager
    def offline(self) -> Iterator[None]:
        saved = self.env["VAULT_ADDR"]
        with refused_url() as url:
            self.env["VAULT_ADDR"] = url
            try:
                yield
            finally:
                self.env["VAULT_ADDR"] = saved


class VaultDaemonAdapter(VaultAdapter):
    """The same secret, fetched through a running ``credbroker daemon`` (never in-process behind its back)."""

    in_process = False
    use_daemon = True

    def __init__(self, server: OpenBao, env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(server, env)
        original = daemon.fetch

        def through_the_daemon(profile: Profile, env: Mapping[str, str]) -> Credentials | None:
            creds = original(profile, env)
            assert creds is not None, "the daemon did not answer: the fetch would have run in-process"
            return creds

        monkeypatch.setattr(daemon, "fetch", through_the_daemon)

    def fetch(self, profile: Profile) -> Credentials:
        creds = sources.fetch(profile, env=self.env)
        assert creds.origin.via == "daemon"
        return creds


class VaultChildAdapter(VaultAdapter):
    """The same secret, fetched in a forked child, as ``credbroker run`` does when no daemon runs.

    (``broker.access.fetch`` has no isolated mode: its records are those of an in-process fetch.)"""

    in_process = False

    def __init__(self, server: OpenBao, env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(server, env)
        original = daemon.fetch_isolated

        def in_a_child(profile: Profile, env: Mapping[str, str]) -> Credentials | None:
            creds = original(profile, env)
            assert creds is not None, "the child gave no answer: the fetch would have run in-process"
            return creds

        monkeypatch.setattr(daemon, "fetch_isolated", in_a_child)

    def fetch(self, profile: Profile) -> Credentials:
        creds = sources.fetch(profile, env=self.env, isolate=True)
        assert creds.origin.via == "child"
        return creds


class KeyringAdapter(SourceAdapter):
    """Entries of a service ``credbroker/conform-<random>`` in the real Secret Service."""

    source = "keyring"

    @property
    def env(self) -> Mapping[str, str]:
        return os.environ

    def store(self, values: Mapping[str, Any]) -> dict[str, Any]:
        import keyring

        service = f"credbroker/conform-{uuid.uuid4().hex}"
        for field, value in values.items():
            if isinstance(value, bytes):  # what another program may have stored: keyring itself writes text
                backend: Any = keyring.get_keyring()  # the SecretService backend (the fixture checks)
                collection = backend.get_preferred_collection()
                collection.create_item(f"{field} on {service}",
                                       backend._query(service, field, application=backend.appid), value,
                                       replace=True)
            else:
                keyring.set_password(service, field, value)
        return {"service": service}

    def absent(self) -> dict[str, Any]:
        return {"service": f"credbroker/conform-absent-{uuid.uuid4().hex}"}

    def refused_locations(self) -> list[dict[str, Any]]:
        return [{"service": ""}, {"service": "credbroker/../other"}]

    def bad_values(self) -> dict[str, Any]:
        return {"a NUL byte": NUL_VALUE, "bytes that are not UTF-8": b"not-utf8-\xff\xfe\x80-value"}

    def fetch(self, profile: Profile) -> Credentials:
        return sources.fetch(profile, env=os.environ)


@pytest.mark.vault
class TestVaultConformance(SourceConformance):
    @pytest.fixture
    def adapter(self, openbao: OpenBao) -> SourceAdapter:
        return VaultAdapter(openbao)


@pytest.fixture(scope="module")
def running_daemon(openbao: OpenBao, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A ``credbroker daemon`` for this module; the environment that reaches it."""
    sock = tmp_path_factory.mktemp("conform-daemon") / "rt" / "credbroker" / "daemon.sock"
    env = {**openbao.env(), "CREDBROKER_DAEMON_SOCKET": str(sock)}
    proc = subprocess.Popen([credbroker_bin(), "daemon"], env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "serving on" in line, line
    try:
        yield env
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


@pytest.mark.vault
class TestVaultThroughTheDaemonConformance(SourceConformance):
    @pytest.fixture
    def adapter(self, openbao: OpenBao, running_daemon: dict[str, str],
                monkeypatch: pytest.MonkeyPatch) -> SourceAdapter:
        return VaultDaemonAdapter(openbao, running_daemon, monkeypatch)


@pytest.mark.vault
class TestVaultInAChildConformance(SourceConformance):
    @pytest.fixture
    def adapter(self, openbao: OpenBao, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SourceAdapter:
        env = {**openbao.env(), "CREDBROKER_DAEMON_SOCKET": str(tmp_path / "no-daemon" / "daemon.sock")}
        return VaultChildAdapter(openbao, env, monkeypatch)


@pytest.mark.keyring
class TestKeyringConformance(SourceConformance):
    @pytest.fixture
    def adapter(self, secret_service: SecretService) -> SourceAdapter:
        return KeyringAdapter()


def test_every_registered_source_has_a_conformance_class() -> None:
    """A new source module cannot be added without plugging it into the suite."""
    covered = {VaultAdapter.source, KeyringAdapter.source}
    assert set(sources._REGISTRY) == covered

