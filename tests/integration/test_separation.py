"""`credbroker run --agent` keeps the broker's own Vault credential from the bot.

The issue's reproduction: a bot of the same user read ~/.vault-token and
fetched the secret itself. Now that is refused (exit 125, one line) unless the
bot runs as another user (--user, the broker as root), in a sandbox
(--sandbox, bubblewrap) that hides the credential files, or the operator says
--unsafe-shared-credentials (warned at every start).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.errors import RunError
from broker.separation import Credential, check_separation

from tests.conftest import REPO, OpenBao, credbroker_bin, service_missing

pytestmark = pytest.mark.vault

API_KEY = "K-separation-0123456789"
SECRET = "S-separation-" + "9" * 20
KV = "credbroker/binance/separation"
CONFIG = """
[vault]
{vault}
[profiles.bot]
source = "vault"
path = "secret/{kv}"
env = {{ BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }}
"""
# The issue's bot: it reads the broker's token file and fetches the secret with it.
THIEF = ('t=$(cat "$HOME/.vault-token" 2>/dev/null); echo "token:${#t}" > "$1"; '
         'curl -s -H "X-Vault-Token: $t" "$VAULT_ADDR/v1/secret/data/' + KV + '" >> "$1"; exit 0')


@pytest.fixture
def setup(openbao: OpenBao, tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """The broker's token only in ~/.vault-token, as `vault login` leaves it."""
    openbao.kv_put(KV, api_key=API_KEY, api_secret=SECRET)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    token = home / ".vault-token"
    token.write_text(openbao.token)
    token.chmod(0o600)
    cfg = tmp_path / "credbroker.toml"
    cfg.write_text(CONFIG.format(vault="", kv=KV))
    env = {k: v for k, v in openbao.env().items() if k != "VAULT_TOKEN"}
    env.update(HOME=str(home), CREDBROKER_CONFIG=str(cfg), CREDBROKER_AUDIT_LOG=str(tmp_path / "audit.log"))
    yield env, tmp_path


def run(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([credbroker_bin(), "run", "--agent", "--no-preflight", "-p", "bot", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def public_dir() -> Path:
    """A folder another user can write (the test's own tmp_path is closed to it)."""
    d = Path(tempfile.mkdtemp(prefix="credbroker-sep-"))
    d.chmod(0o777)
    return d


@pytest.fixture
def bwrap() -> str:
    """bubblewrap: installed here if missing and possible (root, apt); a failure in CI otherwise."""
    found = shutil.which("bwrap")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "bubblewrap"], capture_output=True, timeout=600,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which("bwrap")
    if found is None:
        service_missing("bubblewrap (bwrap) is not installed (apt-get install bubblewrap)")
        raise AssertionError("unreachable")
    probe = subprocess.run([found, "--dev-bind", "/", "/", "--", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        service_missing(f"bwrap cannot make a sandbox here: {probe.stderr.strip()}")
    return found


def test_the_issues_repro_is_refused(setup: tuple[dict[str, str], Path]) -> None:
    env, tmp = setup
    out = tmp / "stolen"
    res = run(env, "--", "sh", "-c", THIEF, "sh", str(out))
    assert res.returncode == 125, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert ".vault-token" in lines[0] and "--user" in lines[0] and "--sandbox" in lines[0]
    assert not out.exists()  # the bot never ran
    assert SECRET not in res.stderr


def test_unsafe_flag_starts_and_warns_every_time(setup: tuple[dict[str, str], Path]) -> None:
    env, tmp = setup
    for _ in range(2):
        res = run(env, "--unsafe-shared-credentials", "--", "true")
        assert res.returncode == 0, res.stderr
        assert "WARNING" in res.stderr and "--unsafe-shared-credentials" in res.stderr


def test_approle_secret_id_file_counts_too(openbao: OpenBao, setup: tuple[dict[str, str], Path]) -> None:
    env, tmp = setup
    Path(env["HOME"], ".vault-token").unlink()
    ids = tmp / "ids"
    ids.mkdir(mode=0o700)
    (ids / "role-id").write_text("role\n")
    (ids / "secret-id").write_text("secret\n")
    for p in ids.iterdir():
        p.chmod(0o600)
    cfg = Path(env["CREDBROKER_CONFIG"])
    cfg.write_text(CONFIG.format(kv=KV, vault=f'role_id_file = "{ids / "role-id"}"\n'
                                              f'secret_id_file = "{ids / "secret-id"}"'))
    res = run({**env, "VAULT_TOKEN": openbao.token}, "--", "true")
    assert res.returncode == 125 and "role_id_file" in res.stderr and "(and 1 more)" in res.stderr, res.stderr


def test_the_bot_gets_no_config_path_under_agent(setup: tuple[dict[str, str], Path]) -> None:
    env, tmp = setup
    out = tmp / "env"
    res = run(env, "--unsafe-shared-credentials", "--", "sh", "-c", 'env > "$1"', "sh", str(out))
    assert res.returncode == 0, res.stderr
    names = {line.split("=", 1)[0] for line in out.read_text().splitlines()}
    assert "CREDBROKER_CONFIG" not in names and "BINANCE_API_SECRET" not in names
    assert "CREDBROKER_AGENT_SOCKET" in names


def test_sandbox_hides_the_token_file(setup: tuple[dict[str, str], Path], bwrap: str) -> None:
    env, tmp = setup
    out = tmp / "stolen"
    res = run(env, "--sandbox", "--", "sh", "-c", THIEF, "sh", str(out))
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert text.startswith("token:0\n"), text  # the file reads empty inside the sandbox
    assert SECRET not in text
    assert Path(env["HOME"], ".vault-token").read_text()  # outside, untouched


def test_sandbox_passes_signals_and_statuses(setup: tuple[dict[str, str], Path], bwrap: str) -> None:
    env, tmp = setup
    assert run(env, "--sandbox", "--", "sh", "-c", "exit 7").returncode == 7
    assert run(env, "--sandbox", "--", "sh", "-c", "kill -TERM $$").returncode == 128 + signal.SIGTERM
    log = tmp / "sig"
    proc = subprocess.Popen([credbroker_bin(), "run", "--agent", "--no-preflight", "-p", "bot", "--sandbox", "--",
                             "sh", "-c", 'trap "echo usr1 >> $1" USR1; trap "exit 42" TERM; echo up > "$1"; '
                             'while :; do sleep 0.05; done', "sh", str(log)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and "up" in log.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
        while "usr1" not in log.read_text():
            assert time.monotonic() < deadline + 30
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 42
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user `nobody` on this machine")
        raise


def test_user_runs_the_bot_as_that_user_who_cannot_read_the_token(setup: tuple[dict[str, str], Path]) -> None:
    if os.geteuid() != 0:
        pytest.skip("--user needs credbroker to run as root (CI runs as root)")
    env, tmp = setup
    who = nobody()
    shared = public_dir()
    try:
        out = shared / "stolen"
        res = run(env, "--user", "nobody", "--", "sh", "-c", 'id -u > "$1.id"; ' + THIEF, "sh", str(out))
        assert res.returncode == 0, res.stderr
        assert (shared / "stolen.id").read_text().strip() == str(who.pw_uid)
        text = out.read_text()
        assert text.startswith("token:0\n") and SECRET not in text, text
    finally:
        shutil.rmtree(shared)


def test_user_bot_signs_through_the_agent(setup: tuple[dict[str, str], Path]) -> None:
    """The socket admits the bot's uid (and its tree) only."""
    python = "/usr/bin/python3"
    if os.geteuid() != 0 or not os.access(python, os.X_OK):
        pytest.skip("needs root and a system python3 the other user can run")
    env, tmp = setup
    nobody()
    shared = public_dir()
    bot = ("import sys\nfrom broker.signing.agent import AgentSigner\n"
           "import os\ns = AgentSigner(None, os.environ['CREDBROKER_AGENT_SOCKET'])\nq = s.sign_params({'symbol': 'BTCUSDT'}, endpoint='/fapi/v1/openOrders')\n"
           "open(sys.argv[1], 'w').write('signed ' + str('signature=' in q))\n")
    try:
        # The bot imports the agent's client from a copy the other user can read: the clone may sit in a
        # folder closed to it (`git clone . "$(mktemp -d)/c"` makes a 0700 parent).
        library = shared / "lib"
        shutil.copytree(REPO / "broker", library / "broker", ignore=shutil.ignore_patterns("__pycache__"))
        for folder, _, files in os.walk(library):
            os.chmod(folder, 0o755)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o644)
        res = run({**env, "PYTHONPATH": str(library)}, "--user", "nobody", "--", python, "-c", bot,
                  str(shared / "out"))
        assert res.returncode == 0, res.stderr
        assert (shared / "out").read_text() == "signed True"
    finally:
        shutil.rmtree(shared)


def test_user_who_can_read_the_token_is_refused(setup: tuple[dict[str, str], Path]) -> None:
    if os.geteuid() != 0:
        pytest.skip("--user needs credbroker to run as root (CI runs as root)")
    env, tmp = setup
    nobody()
    shared = public_dir()
    try:
        home = shared / "home"
        home.mkdir()
        home.chmod(0o755)
        token = home / ".vault-token"
        token.write_text(Path(env["HOME"], ".vault-token").read_text())
        token.chmod(0o644)
        res = run({**env, "HOME": str(home)}, "--user", "nobody", "--", "true")
        assert res.returncode == 125 and "nobody" in res.stderr and str(token) in res.stderr, res.stderr
        assert "chmod 600" in res.stderr
    finally:
        shutil.rmtree(shared)


def test_user_errors_are_one_line(setup: tuple[dict[str, str], Path]) -> None:
    env, _ = setup
    for args, needle in ((["--user", "no-such-user-xyz"], "no such user"), (["--group", "root"], "--group needs --user"),
                         (["--user", "root"], "another user"),
                         # A digit to str.isdigit that int() refuses; a gid past what getgrgid takes.
                         (["--user", "\u00b2"], "no such user"),
                         (["--user", "nobody", "--group", "99999999999999999999"], "no such group")):
        res = run(env, *args, "--", "true")
        assert res.returncode == 125 and needle in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def test_keyring_is_not_hidden_by_a_sandbox() -> None:
    keyring = Credential("the OS keyring (the bot could ask it over D-Bus)", None)
    with pytest.raises(RunError) as err:
        check_separation([keyring], user=None, sandbox=True, agent=True, unsafe=False)
    assert "--user" in str(err.value)
    assert check_separation([keyring], user=None, sandbox=True, agent=False, unsafe=False) is None


def test_sandbox_hides_the_approle_files(openbao: OpenBao, setup: tuple[dict[str, str], Path], bwrap: str) -> None:
    env, tmp = setup
    ids = tmp / "ids"
    ids.mkdir(mode=0o700)
    for name in ("role-id", "secret-id"):
        (ids / name).write_text(f"{name}-value\n")
        (ids / name).chmod(0o600)
    Path(env["CREDBROKER_CONFIG"]).write_text(CONFIG.format(
        kv=KV, vault=f'role_id_file = "{ids / "role-id"}"\nsecret_id_file = "{ids / "secret-id"}"'))
    out = tmp / "seen"
    res = run({**env, "VAULT_TOKEN": openbao.token}, "--sandbox", "--", "sh", "-c",
              'cat "$2/role-id" "$2/secret-id" > "$1"; ls "$2" >> "$1"', "sh", str(out), str(ids))
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert "value" not in text and "secret-id" in text, text  # there, but empty
