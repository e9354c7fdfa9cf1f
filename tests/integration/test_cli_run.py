"""`credbroker run` as a real subprocess of the installed console script.

Process behaviour (signals, exit codes, environment, what is written where)
is only real in a real process, against the real OpenBao server.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cli import cli

from tests.conftest import OpenBao, credbroker_bin, service_missing

pytestmark = pytest.mark.vault

SECRET = "run-secret-c0ffee-5e7c2b9a"
API_KEY = "AK-run-4321"
PATH = "secret/credbroker/binance/um-futures"

BOT = r"""
import os, signal, sys, time
out = sys.argv[1]
def log(line):
    with open(out, "a") as f:
        f.write(line + "\n")
def on(sig, frame):
    log(f"sig {sig}")
    if sig == signal.SIGTERM:
        sys.exit(42)
for s in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
    signal.signal(s, on)
log(f"ready {os.getpid()}")
deadline = time.time() + 600  # a bound for a bot the test forgot, never reached by a passing test
while time.time() < deadline:
    time.sleep(0.02)
sys.exit(9)
"""


@pytest.fixture
def setup(openbao: OpenBao, tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    openbao.kv_put("credbroker/binance/um-futures", api_key=API_KEY, api_secret=SECRET)
    cfg = tmp_path / "credbroker.toml"
    cfg.write_text(
        f"""
[profiles.um-futures]
source = "vault"
path = "{PATH}"
env = {{ BINANCE_API_KEY = "api_key", BINANCE_API_SECRET = "api_secret" }}
"""
    )
    env = openbao.env()
    env["CREDBROKER_CONFIG"] = str(cfg)
    env["HOME"] = str(tmp_path / "home")
    yield env, tmp_path


def broker(args: list[str], env: dict[str, str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([credbroker_bin(), *args], env=env, capture_output=True, text=True, timeout=60,
                          **kw)  # type: ignore[call-overload]


def wait_for(path: Path, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if re.search(pattern, text):
            return text
        time.sleep(0.02)
    raise AssertionError(f"{pattern!r} never appeared in {path}: {path.read_text() if path.exists() else ''!r}")


def wait_for_child(parent: int, argv: list[str], timeout: float = 60) -> int:
    """The pid of ``parent``'s child once it runs ``argv`` (after its exec, not between fork and exec)."""
    want = b"\0".join(a.encode() for a in argv) + b"\0"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                if ppid == parent and (stat.parent / "cmdline").read_bytes() == want:
                    return int(stat.parent.name)
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
        time.sleep(0.02)
    raise AssertionError(f"process {parent} never ran {argv}")


def test_injects_secrets_and_strips_broker_credentials(setup: tuple[dict[str, str], Path]) -> None:
    env, tmp = setup
    env = {**env, "BINANCE_API_SECRET": "stale", "VAULT_ROLE_ID": "r", "BAO_TOKEN": "b"}
    out = tmp / "env.txt"
    res = broker(["run", "-p", "um-futures", "--", sys.executable, "-c",
                  f"import os, json; open({str(out)!r}, 'w').write(json.dumps(dict(os.environ)))"], env)
    assert res.returncode == 0, res.stderr
    import json

    child = json.loads(out.read_text())
    assert child["BINANCE_API_SECRET"] == SECRET
    assert child["BINANCE_API_KEY"] == API_KEY
    for gone in ("VAULT_TOKEN", "BAO_TOKEN", "VAULT_ROLE_ID"):
        assert gone not in child
    assert child["CREDBROKER_PROFILE"] == "um-futures"
    assert child["CREDBROKER_RUN"].isdigit()
    assert SECRET not in res.stdout + res.stderr


def test_one_off_run_with_flags_only(openbao: OpenBao, setup: tuple[dict[str, str], Path]) -> None:
    env, tmp = setup
    env.pop("CREDBROKER_CONFIG")
    res = broker(["run", "--vault-path", PATH, "--env", "S=api_secret", "--", "sh", "-c",
                  f'test "$S" = "{SECRET}"'], env)
    assert res.returncode == 0, res.stderr


def test_exit_status_is_the_childs(setup: tuple[dict[str, str], Path]) -> None:
    env, tmp = setup
    assert broker(["run", "-p", "um-futures", "--", "sh", "-c", "exit 7"], env).returncode == 7
    assert broker(["run", "-p", "um-futures", "--", "sh", "-c", "kill -KILL $$"], env).returncode == 137
    nf = broker(["run", "-p", "um-futures", "--", "no-such-bot-xyz"], env)
    assert nf.returncode == 127 and "command not found: no-such-bot-xyz" in nf.stderr
    plain = tmp / "plain.txt"
    plain.write_text("not a program\n")
    plain.chmod(0o644)
    ne = broker(["run", "-p", "um-futures", "--", str(plain)], env)
    assert ne.returncode == 126 and "not executable" in ne.stderr
    plain.chmod(0o755)  # executable bit but no #! line and not ELF: exec format error, also 126
    fmt = broker(["run", "-p", "um-futures", "--", str(plain)], env)
    assert fmt.returncode == 126 and "exec format error" in fmt.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2])
def test_signals_are_forwarded(setup: tuple[dict[str, str], Path], sig: signal.Signals) -> None:
    env, tmp = setup
    out = tmp / "bot.log"
    bot = tmp / "bot.py"
    bot.write_text(BOT)
    proc = subprocess.Popen([credbroker_bin(), "run", "-p", "um-futures", "--", sys.executable, str(bot), str(out)],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(out, r"ready \d+")
        proc.send_signal(sig)
        wait_for(out, rf"sig {int(sig)}\n")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 42  # the child's own status, after its SIGTERM handler
        log = out.read_text()
        assert log.count(f"sig {int(sig)}\n") == 1, log
    finally:
        proc.kill()
        proc.wait()


def test_child_killed_by_signal_gives_128_plus_n(setup: tuple[dict[str, str], Path]) -> None:
    env, tmp = setup
    proc = subprocess.Popen([credbroker_bin(), "run", "-p", "um-futures", "--", "sleep", "30"], env=env)
    try:
        # Sent before the child runs, the signal would reach a broker still fetching the secret.
        wait_for_child(proc.pid, ["sleep", "30"])
        proc.send_signal(signal.SIGTERM)  # forwarded; sleep dies of it
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


def test_child_is_not_left_running_when_the_broker_is_killed(setup: tuple[dict[str, str], Path]) -> None:
    env, tmp = setup
    out = tmp / "bot.log"
    bot = tmp / "bot.py"
    bot.write_text(BOT)
    proc = subprocess.Popen([credbroker_bin(), "run", "-p", "um-futures", "--", sys.executable, str(bot), str(out)],
                            env=env)
    text = wait_for(out, r"ready \d+")
    child_pid = int(re.search(r"ready (\d+)", text).group(1))  # type: ignore[union-attr]
    proc.kill()  # SIGKILL: nothing to forward; the kernel's parent-death signal acts
    proc.wait()
    wait_for(out, rf"sig {int(signal.SIGTERM)}\n")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the child outlived its broker")


def test_terminal_ctrl_c_reaches_the_child_once(setup: tuple[dict[str, str], Path]) -> None:
    import fcntl
    import termios

    env, tmp = setup
    out = tmp / "bot.log"
    bot = tmp / "bot.py"
    bot.write_text(BOT)
    master, slave = os.openpty()

    def controlling_tty() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([credbroker_bin(), "run", "-p", "um-futures", "--", sys.executable, str(bot), str(out)],
                            env=env, stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_tty)
    os.close(slave)
    try:
        wait_for(out, r"ready \d+")
        os.write(master, b"\x03")  # Ctrl-C: the kernel signals the whole foreground group
        wait_for(out, rf"sig {int(signal.SIGINT)}\n")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 42
        # Counted once the child has exited on the TERM sent after it: a second INT, had the
        # broker forwarded one, was delivered before that TERM and is in the log by now.
        assert out.read_text().count(f"sig {int(signal.SIGINT)}\n") == 1
    finally:
        proc.kill()
        proc.wait()
        os.close(master)


def test_nested_run_is_refused(setup: tuple[dict[str, str], Path]) -> None:
    env, _ = setup
    res = broker(["run", "-p", "um-futures", "--", credbroker_bin(), "run", "-p", "um-futures", "--", "true"], env)
    assert res.returncode == 125
    assert "already inside `credbroker run`" in res.stderr


def test_hardening_core_dumps_off_and_not_dumpable(setup: tuple[dict[str, str], Path]) -> None:
    env, tmp = setup
    out = tmp / "bot.log"
    bot = tmp / "bot.py"
    bot.write_text(BOT)
    proc = subprocess.Popen([credbroker_bin(), "run", "-p", "um-futures", "--", sys.executable, str(bot), str(out)],
                            env=env)
    try:
        text = wait_for(out, r"ready \d+")
        child_pid = int(re.search(r"ready (\d+)", text).group(1))  # type: ignore[union-attr]
        status = Path(f"/proc/{proc.pid}/status").read_text()
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        child_limits = Path(f"/proc/{child_pid}/limits").read_text()
        core = re.compile(r"Max core file size\s+0\s+0")
        assert core.search(limits), limits
        assert core.search(child_limits), child_limits
        assert "Name:" in status
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_harden_process_makes_the_process_not_dumpable() -> None:
    code = (
        "import ctypes, resource\n"
        "from broker.hardening import harden_process, PR_GET_DUMPABLE\n"
        "r = harden_process()\n"
        "libc = ctypes.CDLL(None)\n"
        "print(r.core_dumps_off, r.not_dumpable, libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0),"
        " resource.getrlimit(resource.RLIMIT_CORE))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "0", "(0,", "0)"]


def test_secret_never_in_argv_output_or_files(setup: tuple[dict[str, str], Path]) -> None:
    """strace the whole run: no write of the secret, no file holding it, no argv with it."""
    strace = shutil.which("strace")
    if strace is None:
        service_missing("strace is not installed (apt-get install strace)")
        return
    env, tmp = setup
    trace = tmp / "trace.txt"
    cmdlines = tmp / "cmdlines.txt"
    # The child scans every process's argv while the broker is alive, then exits.
    scan = (
        "import glob, sys\n"
        "found = []\n"
        "for p in glob.glob('/proc/[0-9]*/cmdline'):\n"
        "    try: found.append(open(p, 'rb').read())\n"
        "    except OSError: pass\n"
        f"open({str(cmdlines)!r}, 'wb').write(b'\\n'.join(found))\n"
        "import os; ppid = os.getppid()\n"
        f"open({str(tmp / 'broker-environ')!r}, 'wb').write(open(f'/proc/{{ppid}}/environ', 'rb').read())\n"
    )
    res = subprocess.run(
        [strace, "-f", "-qq", "-e", "trace=write,pwrite64,writev,openat,execve", "-s", "65536", "-o", str(trace),
         credbroker_bin(), "run", "-v", "-p", "um-futures", "--", sys.executable, "-c", scan],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    text = trace.read_text(errors="replace")
    assert "execve(" in text and "openat(" in text  # the trace really covered the run
    assert SECRET not in text, "the secret appeared in a write, an open or an argv"
    assert SECRET not in res.stdout + res.stderr
    assert "BINANCE_API_SECRET" in res.stderr  # -v names the variables...
    assert SECRET.encode() not in cmdlines.read_bytes()
    assert cmdlines.read_bytes()  # ...and the scan did read argvs
    assert SECRET.encode() not in (tmp / "broker-environ").read_bytes()
    # Every file opened for writing during the run: none may hold the secret.
    written = set(re.findall(r'openat\([^,]+, "([^"]+)", [^)]*O_(?:WRONLY|RDWR)', text))
    for name in written:
        p = Path(name)
        if p.is_file() and not name.startswith("/proc/"):
            assert SECRET.encode() not in p.read_bytes(), name
    # No temporary file of ours. (Not the clone's own files: CI clones into `mktemp -d`, /tmp/tmp.XXXX, and
    # Python may write a module's __pycache__ .pyc there the first time any process imports it.)
    clone = str(Path(__file__).resolve().parents[2])
    temporary = [n for n in written if re.search(r"/tmp/(tmp|credbroker)", n)
                 and not (n.startswith(clone + "/") and n.endswith(".pyc"))]
    assert not temporary, temporary


def test_fail_closed_messages_are_one_line_with_a_fix(setup: tuple[dict[str, str], Path], openbao: OpenBao) -> None:
    env, tmp = setup
    cases = [
        ({**env, "VAULT_TOKEN": "hvs.bogus"}, ["-p", "um-futures"], "rejected the token"),
        ({**env, "VAULT_ADDR": "http://127.0.0.1:9"}, ["-p", "um-futures"], "cannot reach Vault"),
        (env, ["--vault-path", "secret/credbroker/none", "--env", "X=api_key"], "nothing found"),
        (env, ["--vault-path", PATH, "--env", "X=missing_field"], "field 'missing_field' not found"),
        (env, ["-p", "nope"], "profile 'nope' not found"),
        ({**env, "CREDBROKER_CONFIG": str(tmp / "missing.toml")}, ["-p", "x"], "not found"),
    ]
    marker = tmp / "started"
    for case_env, args, expected in cases:
        res = broker(["run", *args, "--", "touch", str(marker)], case_env)
        assert res.returncode == 125, (args, res.stderr)
        assert expected in res.stderr, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("credbroker: ") and "fix:" in lines[0], res.stderr
        assert "Traceback" not in res.stderr
        assert not marker.exists(), "the child ran although a secret could not be fetched"


def test_bad_config_file_is_one_line(setup: tuple[dict[str, str], Path]) -> None:
    env, tmp = setup
    bad = tmp / "bad.toml"
    bad.write_text('[profiles.x]\nsource = "vault"\npath = "secret/x"\nenv = { A = 1 }\n')
    res = broker(["--config", str(bad), "run", "-p", "x", "--", "true"], env)
    assert res.returncode == 125
    assert f"{bad}: profiles.x.env.A: expected a field name" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_debug_shows_a_traceback_without_secrets(setup: tuple[dict[str, str], Path]) -> None:
    env, _ = setup
    res = broker(["--debug", "run", "--vault-path", PATH, "--env", "X=missing", "--", "true"], env)
    assert res.returncode == 125
    assert "Traceback" in res.stderr
    assert SECRET not in res.stderr and env["VAULT_TOKEN"] not in res.stderr


def test_usage_errors_exit_125() -> None:
    res = subprocess.run([credbroker_bin(), "run", "--bogus-flag", "--", "true"], capture_output=True, text=True)
    assert res.returncode == 125 and "no such option" in res.stderr.lower()


def test_run_help_explains_behaviour() -> None:
    result = CliRunner().invoke(cli, ["run", "--help"])
    assert result.exit_code == 0
    for phrase in ("Fail closed", "VAULT_TOKEN", "SIGUSR2", "128+N", "127", "PDEATHSIG", "core dumps"):
        assert phrase in result.output, phrase


def test_check_and_profiles_have_json(setup: tuple[dict[str, str], Path]) -> None:
    import json

    env, _ = setup
    res = broker(["check", "-p", "um-futures", "--json"], env)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["fields"]["api_secret"]["bytes"] == len(SECRET)
    assert SECRET not in res.stdout
    listing = json.loads(broker(["profiles", "--json"], env).stdout)
    assert listing["profiles"][0]["name"] == "um-futures"


def test_run_is_audited_and_the_fetch_is_on_disk_before_the_child_starts(
    setup: tuple[dict[str, str], Path],
) -> None:
    import json

    env, tmp = setup
    log = tmp / "audit" / "audit.log"
    env = {**env, "CREDBROKER_AUDIT_LOG": str(log)}
    seen = tmp / "seen-by-child"
    res = broker(["run", "-p", "um-futures", "--", "sh", "-c", f"cat {log} > {seen}; exit 4"], env)
    assert res.returncode == 4, res.stderr
    at_start = [json.loads(line)["event"] for line in seen.read_text().splitlines()]
    # The fetch record was on disk when the child began (the injection record,
    # written right after the spawn, may or may not have landed yet).
    assert "secret_fetched" in at_start, at_start
    records = [json.loads(line) for line in log.read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events[-3:] == ["secret_fetched", "secret_injected", "child_exited"]
    assert records[-3]["data"]["version"] is not None and records[-3]["data"]["fields"] == ["api_key", "api_secret"]
    assert records[-1]["data"]["status"] == 4
    assert SECRET not in log.read_text() and API_KEY not in log.read_text()
    assert oct(log.stat().st_mode & 0o777) == "0o600"

    refused = broker(["run", "--vault-path", "secret/credbroker/none", "--env", "X=api_key", "--", "true"], env)
    assert refused.returncode == 125
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["event"] == "refused" and last["data"]["error"] == "VaultNotFound"


def test_unwritable_audit_log_fails_closed(setup: tuple[dict[str, str], Path]) -> None:
    env, tmp = setup
    blocker = tmp / "not-a-folder"
    blocker.write_text("")
    marker = tmp / "started"
    res = broker(["run", "-p", "um-futures", "--", "touch", str(marker)],
                 {**env, "CREDBROKER_AUDIT_LOG": str(blocker / "audit.log")})
    assert res.returncode == 125, res.stderr
    assert "audit" in res.stderr.lower()
    assert not marker.exists()
    # Checked before Vault is asked anything: with a bad token too, the audit log is what fails.
    early = broker(["run", "-p", "um-futures", "--", "touch", str(marker)],
                   {**env, "VAULT_TOKEN": "hvs.bogus", "CREDBROKER_AUDIT_LOG": str(blocker / "audit.log")})
    assert early.returncode == 125 and "audit log folder" in early.stderr, early.stderr
    assert "token" not in early.stderr


def test_child_signature_failures_reach_a_keyed_log_through_the_broker(setup: tuple[dict[str, str], Path]) -> None:
    import json
    import secrets as pysecrets

    env, tmp = setup
    log = tmp / "keyed" / "audit.log"
    key = pysecrets.token_hex(32)
    env = {**env, "CREDBROKER_AUDIT_LOG": str(log), "CREDBROKER_AUDIT_KEY": key}
    bot = (
        "import os\n"
        "assert 'CREDBROKER_AUDIT_KEY' not in os.environ  # the chain key stays with the broker\n"
        "from broker.signing import report_response\n"
        "report_response(400, {'code': -1022, 'msg': 'Signature for this request is not valid.'},"
        " 'https://fapi.binance.com/fapi/v1/order')\n"
    )
    res = broker(["run", "-p", "um-futures", "--", sys.executable, "-c", bot], env)
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    failures = [r for r in records if r["event"] == "signature_failure"]
    assert len(failures) == 1
    assert failures[0]["data"]["code"] == -1022
    assert failures[0]["data"]["relayed_from"] == next(
        r["data"]["pid"] for r in records if r["event"] == "secret_injected")
    verify = broker(["audit", "verify", str(log)], env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert SECRET not in log.read_text()
