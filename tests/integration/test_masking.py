"""Output masking (`credbroker run --mask`, issue 6 item 5).

The masker is pure: it is checked against a simple, independent reference
(mark every byte any occurrence covers, one marker per marked run) at every
split point. The plumbing is checked in-process (pipes, a pty) and through
the installed `credbroker` as a real subprocess against the real OpenBao
server, on pipes and on a terminal (the broker on a pty of its own, with a
session and controlling terminal, as a user's shell would give it).
"""

from __future__ import annotations

import fcntl
import itertools
import os
import random
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cli import cli
from broker.masking import MARKER, Masker, MaskedOutput, check_not_agent, mask_all, secret_values
from broker.secret import Secret

from tests.conftest import OpenBao, credbroker_bin

# ---------------------------------------------------------------------------------------
# The pure masker


def reference(data: bytes, values: Sequence[bytes], marker: bytes = MARKER) -> bytes:
    """Every occurrence of every value as a span; overlapping spans -> one marker each run."""
    spans = sorted((i, i + len(v)) for v in values if v for i in range(len(data) - len(v) + 1)
                   if data[i:i + len(v)] == v)
    out = bytearray()
    pos = 0
    for start, end in spans:
        if start < pos:  # overlaps the run just masked: extend it
            pos = max(pos, end)
            continue
        out += data[pos:start]
        out += marker
        pos = end
    out += data[pos:]
    return bytes(out)


def streamed(data: bytes, values: Sequence[bytes], cuts: Sequence[int]) -> bytes:
    m = Masker(values)
    out = []
    prev = 0
    for c in [*cuts, len(data)]:
        out.append(m.feed(data[prev:c]))
        assert m.pending <= max(len(v) for v in values) - 1  # the carry-over stays bounded
        prev = c
    out.append(m.flush())
    assert m.pending == 0
    return b"".join(out)


CASES: list[tuple[bytes, list[bytes]]] = [
    # one secret, inside text, twice, at both ends
    (b"key=S3CR3T-v4lue; again S3CR3T-v4lue.", [b"S3CR3T-v4lue"]),
    (b"S3CR3T-v4lueS3CR3T-v4lue", [b"S3CR3T-v4lue"]),  # touching: one marker each
    # several secrets (API key and secret), one right after the other
    (b"k=AK-1234 s=deadbeefcafe|AK-1234deadbeefcafe", [b"AK-1234", b"deadbeefcafe"]),
    # one secret is a prefix of another
    (b"<abc><abcdef><abcde>", [b"abc", b"abcdef"]),
    # overlapping secrets: no byte of either may show
    (b"xxabcdefxx abcd cdef", [b"abcd", b"cdef"]),
    # secrets that could overlap, in output where they do not (the fast path)
    (b"abcd cdef abcd|cdef", [b"abcd", b"cdef"]),
    # self-overlapping secret, and a near miss at the end
    (b"aabaabaab aaba aab", [b"aabaab"]),
    # a secret that is a suffix of another
    (b"--0123456789--6789--", [b"0123456789", b"6789"]),
    # text that keeps starting a secret without finishing it
    (b"sesesecsecrsecre secret se", [b"secret"]),
    # bytes that are not UTF-8, and the marker's own characters
    (b"\xff\xfe[credbroker:masked]\xff\xfe\x00", [b"\xfe\x00", b"masked"]),
]


@pytest.mark.parametrize(("data", "values"), CASES)
def test_every_split_point_gives_the_same_masked_output(data: bytes, values: list[bytes]) -> None:
    expected = reference(data, values)
    assert mask_all(data, values) == expected
    for v in values:
        assert v not in expected.replace(MARKER, b"\0")
    for k in (1, 2):
        for cuts in itertools.combinations(range(1, len(data)), k):
            assert streamed(data, values, cuts) == expected, cuts
    assert streamed(data, values, range(1, len(data))) == expected  # one byte at a time


def test_random_streams_against_the_reference() -> None:
    rng = random.Random(6)
    for _ in range(4000):
        values = [bytes(rng.choice(b"ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        data = bytes(rng.choice(b"abc") for _ in range(rng.randint(0, 24)))
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(0, len(data) - 1))) if len(data) > 1 else []
        assert streamed(data, values, cuts) == reference(data, values), (data, values, cuts)


def test_ordinary_output_is_not_held_back() -> None:
    m = Masker([b"deadbeef", b"AK-1234"])
    assert m.feed(b"order filled\n") == b"order filled\n"
    assert m.pending == 0
    assert m.feed(b"prompt> dead") == b"prompt> "  # may be the start of a secret: held
    assert m.pending == 4
    assert m.flush() == b"dead"  # idle or end of stream: released as it is
    assert m.feed(b"beef") == b"beef"  # a flush cut it: documented trade-off
    assert m.feed(b"deadbe") == b""
    assert m.feed(b"ef!") == MARKER + b"!"


def test_a_masked_run_that_reaches_the_held_tail_is_never_shown() -> None:
    # "aab" is masked at once; the last "aa" may continue the run (an overlapping
    # occurrence) and must not be shown when the next write decides it.
    m = Masker([b"aab", b"aabaa"])
    out = m.feed(b"x aabaa")
    out += m.feed(b"b y")
    out += m.flush()
    assert out == b"x " + MARKER + b" y"
    assert out == reference(b"x aabaab y", [b"aab", b"aabaa"])


def test_no_values_pass_everything_through_and_empty_values_are_ignored() -> None:
    m = Masker([b"", b""])
    assert m.feed(b"anything") == b"anything" and m.flush() == b""
    assert mask_all(b"a secret", [b"", b"secret"]) == b"a " + MARKER


def test_wipe_zeroes_the_values_the_masker_owns() -> None:
    value = bytearray(b"wipe-me-0123")
    m = Masker([value])
    owned = list(m._values)  # noqa: SLF001 - checking the wipe itself
    assert owned and owned[0] is not value  # the masker keeps its own copy
    m.wipe()
    assert all(b == 0 for b in owned[0])
    assert value == bytearray(b"wipe-me-0123")  # the caller's copy is the caller's to wipe
    assert m.feed(b"wipe-me-0123") == b"wipe-me-0123"


def test_secret_values_copies_into_bytearrays_and_repr_hides_nothing_secret() -> None:
    s = Secret(b"abc-secret")
    vals = secret_values([s])
    assert vals == [bytearray(b"abc-secret")] and isinstance(vals[0], bytearray)
    assert b"abc-secret" not in repr(Masker(vals)).encode()


def test_mask_and_agent_are_refused_together() -> None:
    from broker.errors import RunError

    check_not_agent(mask=True, agent=False)
    check_not_agent(mask=False, agent=True)
    with pytest.raises(RunError) as err:
        check_not_agent(mask=True, agent=True)
    assert "\n" not in str(err.value) and "--agent" in str(err.value)


def test_run_refuses_mask_with_agent_before_fetching(tmp_path: Path) -> None:
    from broker.config import Profile
    from broker.errors import RunError
    from broker.runner import RunOptions, run

    records: list[tuple[str, dict[str, object]]] = []
    prof = Profile.adhoc(env={"S": "api_secret"}, vault_path="secret/never/read")
    with pytest.raises(RunError) as err:
        run(RunOptions.build(prof, ["true"], environ={"PATH": os.defpath},
                             record=lambda e, f: records.append((e, f)), agent=True, mask=True))
    assert "--mask" in str(err.value) and "\n" not in str(err.value)
    assert records == []  # nothing fetched, nothing started


def test_cli_refuses_mask_with_agent_in_one_line(setup: tuple[dict[str, str], Path]) -> None:
    env, _ = setup
    res = broker(["run", "--mask", "--agent", "-p", "mask", "--", "true"], env)
    assert res.returncode == 125
    assert res.stderr.count(b"\n") == 1 and b"--mask" in res.stderr


def test_run_help_mentions_mask() -> None:
    res = CliRunner().invoke(cli, ["run", "--help"])
    assert res.exit_code == 0
    assert "--mask" in res.output and "pseudo-terminal" in res.output


# ---------------------------------------------------------------------------------------
# The plumbing, in-process

SECRET = "mask-secret-5e7c2b9a-0ff1ce"
API_KEY = "AK-mask-8765"

PIECES = r"""
import os, sys
s = os.environ["S"]
for stream in (sys.stdout, sys.stderr):
    for i in range(0, len(s), 5):  # the value in pieces, flushed one by one
        stream.write(s[i:i + 5])
        stream.flush()
    stream.write(" tty=%s\n" % stream.isatty())
    stream.flush()
"""


def read_all(fd: int, timeout: float = 60) -> bytes:
    """Read a pipe or pty master until end of file (EIO for a pty)."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.5)
        if not r:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        out += data
    return bytes(out)


def spawn_masked(output: MaskedOutput, code: str, secret: str) -> subprocess.Popen[bytes]:
    from broker.runner import spawn

    env = {**os.environ, "S": secret}
    stdio = output.child_stdio([Secret(secret)])
    child = spawn([sys.executable, "-c", code], sys.executable,
                  {k.encode(): v.encode() for k, v in env.items()}, stdio)
    return child.proc


def test_pipes_mask_stdout_and_stderr_in_process() -> None:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    output = MaskedOutput(stdin_fd=0, stdout_fd=out_w, stderr_fd=err_w)
    assert not output.use_pty
    proc = spawn_masked(output, PIECES, SECRET)
    pump = output._pump  # noqa: SLF001 - checking the wipe
    assert pump is not None
    held = [*pump.values, *(v for s in pump.streams for v in s.masker._values)]  # noqa: SLF001
    assert held and all(bytes(v) == SECRET.encode() for v in held)
    assert proc.wait(timeout=60) == 0
    output.close()
    assert all(not any(v) for v in held)  # every copy zeroed once the child's output is done
    os.close(out_w)
    os.close(err_w)
    out, err = read_all(out_r), read_all(err_r)
    assert out == MARKER + b" tty=False\n"
    assert err == MARKER + b" tty=False\n"


def test_a_pty_when_stdout_is_a_terminal_in_process() -> None:
    master, slave = os.openpty()
    err_r, err_w = os.pipe()
    output = MaskedOutput(stdin_fd=slave, stdout_fd=slave, stderr_fd=err_w)
    assert output.use_pty
    proc = spawn_masked(output, PIECES, SECRET)
    assert proc.wait(timeout=60) == 0
    output.close()
    os.close(slave)
    os.close(err_w)
    text = read_all(master).replace(b"\r", b"")
    # stderr was redirected (not a terminal): it stays a separate, masked pipe
    assert text == MARKER + b" tty=True\n"
    assert read_all(err_r) == MARKER + b" tty=False\n"


def test_a_held_tail_is_released_when_the_stream_goes_quiet() -> None:
    # A prompt that happens to end in the first bytes of a secret is shown
    # after a short pause, without waiting for more output or the end.
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    output = MaskedOutput(stdin_fd=0, stdout_fd=out_w, stderr_fd=err_w)
    code = ("import os, sys, time\n"
            "sys.stdout.write('enter amount> ' + os.environ['S'][:4]); sys.stdout.flush()\n"
            "time.sleep(600)\n")  # killed below; outlives any pause, however slow the machine
    proc = spawn_masked(output, code, SECRET)
    try:
        r, _, _ = select.select([out_r], [], [], 60)
        assert r, "the held tail was never released"
        shown = b""
        while not shown.endswith(SECRET[:4].encode()):
            shown += os.read(out_r, 100)
        assert shown == b"enter amount> " + SECRET[:4].encode()
        assert proc.poll() is None  # released by the pause, not by the end of the stream
    finally:
        proc.kill()
        proc.wait()
        output.close()
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)


def test_all_output_is_drained_before_close_returns() -> None:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    output = MaskedOutput(stdin_fd=0, stdout_fd=out_w, stderr_fd=err_w)
    code = ("import os, sys\ns = os.environ['S']\n"
            "for i in range(20000):\n    sys.stdout.write('%06d ' % i + s + '\\n')\n")
    collected = bytearray()
    import threading

    reader = threading.Thread(target=lambda: collected.extend(read_all(out_r, timeout=60)))
    reader.start()
    proc = spawn_masked(output, code, SECRET)
    assert proc.wait(timeout=60) == 0
    output.close()
    os.close(out_w)
    reader.join()
    os.close(err_w)
    lines = bytes(collected).split(b"\n")
    assert lines[-1] == b"" and len(lines) == 20001
    assert lines[19999] == b"019999 " + MARKER
    assert SECRET.encode() not in collected


# ---------------------------------------------------------------------------------------
# The real `credbroker run --mask`, against the real OpenBao server

PATH = "secret/credbroker/binance/mask"


@pytest.fixture
def setup(openbao: OpenBao, tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    openbao.kv_put("credbroker/binance/mask", api_key=API_KEY, api_secret=SECRET)
    cfg = tmp_path / "credbroker.toml"
    cfg.write_text(
        f"""
[profiles.mask]
source = "vault"
path = "{PATH}"
env = {{ BINANCE_API_KEY = "api_key", S = "api_secret" }}
"""
    )
    env = openbao.env()
    env["CREDBROKER_CONFIG"] = str(cfg)
    env["HOME"] = str(tmp_path / "home")
    yield env, tmp_path


def broker(args: list[str], env: dict[str, str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    res: subprocess.CompletedProcess[bytes] = subprocess.run(  # type: ignore[call-overload]
        [credbroker_bin(), *args], env=env, capture_output=True, timeout=60, **kw)
    return res


BOTH = PIECES + r"""
k = os.environ["BINANCE_API_KEY"]
sys.stdout.write("key " + k[:3])
sys.stdout.flush()
print(k[3:] + " end", flush=True)
print("raw", s, k, sep="", flush=True)
sys.exit(int(sys.argv[1]))
"""


def test_run_mask_on_pipes_never_shows_a_secret(setup: tuple[dict[str, str], Path]) -> None:
    env, _ = setup
    res = broker(["run", "--mask", "-p", "mask", "--", sys.executable, "-c", BOTH, "7"], env)
    assert res.returncode == 7, res.stderr  # the child's own status
    for value in (SECRET, API_KEY):
        assert value.encode() not in res.stdout + res.stderr
    # every injected field is masked, the public key too ("every field the profile injects")
    assert res.stdout == (MARKER + b" tty=False\n" + b"key " + MARKER + b" end\n" + b"raw" + MARKER + MARKER + b"\n")
    assert res.stderr.startswith(MARKER + b" tty=False\n")
    # without --mask the same child shows them (the test proves something)
    plain = broker(["run", "-p", "mask", "--", sys.executable, "-c", BOTH, "0"], env)
    assert SECRET.encode() in plain.stdout and plain.returncode == 0


def test_run_mask_exit_status_and_signals_unchanged(setup: tuple[dict[str, str], Path]) -> None:
    env, tmp = setup
    assert broker(["run", "--mask", "-p", "mask", "--", "sh", "-c", "kill -KILL $$"], env).returncode == 137
    nf = broker(["run", "--mask", "-p", "mask", "--", "no-such-bot-xyz"], env)
    assert nf.returncode == 127 and b"command not found" in nf.stderr
    out = tmp / "bot.log"
    bot = tmp / "bot.py"
    bot.write_text(BOT)
    proc = subprocess.Popen([credbroker_bin(), "run", "--mask", "-p", "mask", "--", sys.executable, str(bot),
                             str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(out, r"ready \d+")
        proc.send_signal(signal.SIGUSR1)
        wait_for(out, rf"sig {int(signal.SIGUSR1)}\n")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 42
        stdout = proc.stdout.read() if proc.stdout else b""
        assert SECRET.encode() not in stdout and MARKER in stdout
    finally:
        proc.kill()
        proc.wait()


def test_run_mask_drains_everything_before_exiting(setup: tuple[dict[str, str], Path]) -> None:
    env, _ = setup
    code = ("import os, sys\ns = os.environ['S']\n"
            "for i in range(30000):\n    sys.stdout.write('%06d %s\\n' % (i, s))\n"
            "sys.stderr.write('last words ' + s)\n"  # no newline, no flush: written at exit
            "sys.exit(3)\n")
    res = broker(["run", "--mask", "-p", "mask", "--", sys.executable, "-c", code], env)
    assert res.returncode == 3
    lines = res.stdout.split(b"\n")
    assert len(lines) == 30001 and lines[29999] == b"029999 " + MARKER
    assert res.stderr.endswith(b"last words " + MARKER)
    assert SECRET.encode() not in res.stdout + res.stderr


def test_run_mask_child_still_dies_with_the_broker(setup: tuple[dict[str, str], Path]) -> None:
    env, tmp = setup
    out = tmp / "bot.log"
    bot = tmp / "bot.py"
    bot.write_text(BOT)
    proc = subprocess.Popen([credbroker_bin(), "run", "--mask", "-p", "mask", "--", sys.executable, str(bot),
                             str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        text = wait_for(out, r"ready \d+")
        child_pid = int(re.search(r"ready (\d+)", text).group(1))  # type: ignore[union-attr]
        proc.kill()  # SIGKILL: the parent-death signal still reaches the child
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
    finally:
        proc.kill()
        proc.wait()


def test_run_mask_every_incarnation_is_masked(setup: tuple[dict[str, str], Path]) -> None:
    env, tmp = setup
    flag = tmp / "second"
    code = ("import os, sys\n"
            f"flag = {str(flag)!r}\n"
            "second = os.path.exists(flag)\n"
            "open(flag, 'w').close()\n"
            "print('run', 2 if second else 1, os.environ['S'], flush=True)\n"
            "sys.exit(0 if second else 3)\n")
    res = broker(["run", "--mask", "--restart", "on-failure", "-p", "mask", "--", sys.executable, "-c", code], env)
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"run 1 " + MARKER + b"\nrun 2 " + MARKER + b"\n"
    assert SECRET.encode() not in res.stderr


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
def winch(sig, frame):
    print("size %dx%d" % os.get_terminal_size(), flush=True)
signal.signal(signal.SIGWINCH, winch)
tty = [os.isatty(fd) for fd in (0, 1, 2)]
size = os.get_terminal_size() if tty[1] else None
log(f"tty {tty} size {size} sid {os.getsid(0) == os.getpid()}")
print("secret " + os.environ["S"], flush=True)
log(f"ready {os.getpid()}")
deadline = time.time() + 600  # a bound for a bot the test forgot, never reached by a passing test
while time.time() < deadline:
    if tty[0]:
        r = __import__("select").select([0], [], [], 0.02)[0]
        if r:
            line = os.read(0, 100)
            log(f"read {line!r}")
    else:
        time.sleep(0.02)
sys.exit(9)
"""


def wait_for(path: Path, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if re.search(pattern, text):
            return text
        time.sleep(0.02)
    raise AssertionError(f"{pattern!r} never appeared in {path}: {path.read_text() if path.exists() else ''!r}")


class Terminal:
    """The broker on a pty of its own: session leader, controlling terminal, foreground."""

    def __init__(self, args: list[str], env: dict[str, str], rows: int = 33, cols: int = 111) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.cooked = termios.tcgetattr(slave)
        self.slave_fd = os.dup(slave)  # kept to read the terminal's mode after the broker exits

        def controlling_tty() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen([credbroker_bin(), *args], env=env, stdin=slave, stdout=slave, stderr=slave,
                                     preexec_fn=controlling_tty)
        os.close(slave)
        self.output = bytearray()

    def pump(self, seconds: float = 0.0) -> bytes:
        deadline = time.monotonic() + seconds
        while True:
            r, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if r:
                try:
                    data = os.read(self.master, 65536)
                except OSError:
                    data = b""
                if data:
                    self.output += data
                    continue
            if time.monotonic() >= deadline:
                return bytes(self.output)

    def wait_output(self, needle: bytes, timeout: float = 60) -> bytes:
        return self.wait_match(re.escape(needle), timeout)

    def wait_match(self, pattern: bytes, timeout: float = 60) -> bytes:
        """Everything shown so far, once ``pattern`` is in it (carriage returns removed before matching)."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output.replace(b"\r", b"")):
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} never appeared: {bytes(self.output)!r}")
            self.pump(0.05)
        return bytes(self.output)

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self.master)
        os.close(self.slave_fd)


def test_run_mask_on_a_terminal_gives_the_child_a_pty(setup: tuple[dict[str, str], Path]) -> None:
    env, tmp = setup
    out = tmp / "bot.log"
    (tmp / "bot.py").write_text(BOT)
    term = Terminal(["run", "--mask", "-p", "mask", "--", sys.executable, str(tmp / "bot.py"), str(out)], env)
    try:
        text = wait_for(out, r"ready \d+")
        # isatty() on all three, the broker's window size, its own session (the pty is its terminal)
        assert "tty [True, True, True] size os.terminal_size(columns=111, lines=33) sid True" in text, text
        term.wait_output(b"secret " + MARKER)
        # the broker's terminal is in raw mode while the child runs: typed keys pass through
        mode = termios.tcgetattr(term.slave_fd)
        assert not mode[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
        os.write(term.master, b"hi\r")
        wait_for(out, r"read b'hi\\n'")  # the pty's own line discipline (ICRNL, canonical mode)
        # a window size change reaches the child (SIGWINCH copied through)
        term.resize(40, 100)
        term.wait_output(b"size 100x40")
        # Ctrl-C: raw mode passes the byte; the pty signals the child, once
        os.write(term.master, b"\x03")
        wait_for(out, rf"sig {int(signal.SIGINT)}\n")
        # a signal some process sends to the broker is forwarded; the exit status is the child's
        term.proc.send_signal(signal.SIGTERM)
        assert term.proc.wait(timeout=60) == 42
        # Counted once the child has exited on the TERM sent after it: a second INT would be in the log.
        assert out.read_text().count(f"sig {int(signal.SIGINT)}\n") == 1
        shown = term.pump(0.3)
        assert SECRET.encode() not in shown and API_KEY.encode() not in shown
        # the echo of what was typed went through the masker too, and the terminal is restored
        restored = termios.tcgetattr(term.slave_fd)
        assert restored[3] == term.cooked[3] and restored[0] == term.cooked[0]
    finally:
        term.close()


def test_run_mask_on_a_terminal_shows_line_ends_as_the_bot_run_directly(setup: tuple[dict[str, str], Path]) -> None:
    """The pty in between adds no carriage return: "1\\n" and "2\\r\\n" look as they do without credbroker."""
    env, _ = setup
    bot = "import sys; sys.stdout.buffer.write(b'1\\n2\\r\\n3'); sys.stdout.flush()"
    shown = []
    for args in (["run", "--mask", "-p", "mask", "--", sys.executable, "-c", bot],
                 ["run", "-p", "mask", "--", sys.executable, "-c", bot]):
        term = Terminal(args, env)
        try:
            assert term.proc.wait(timeout=30) == 0
            shown.append(term.pump(0.3))
        finally:
            term.close()
    masked, direct = shown
    assert direct.endswith(b"1\r\n2\r\r\n3"), direct  # the terminal's own ONLCR, once
    assert masked.endswith(b"1\r\n2\r\r\n3"), masked


def test_run_mask_on_a_terminal_masks_stderr_and_split_writes(setup: tuple[dict[str, str], Path]) -> None:
    env, _ = setup
    term = Terminal(["run", "--mask", "-p", "mask", "--", sys.executable, "-c", BOTH, "5"], env)
    try:
        assert term.proc.wait(timeout=60) == 5
        # The broker has exited; its last line reaches the master side when the kernel passes it on.
        shown = term.wait_match(rb"\nraw[^\n]*\n").replace(b"\r", b"")
        # stdout and stderr share the terminal: both are the pty, both masked
        assert shown.count(MARKER + b" tty=True\n") == 2, shown
        assert b"key " + MARKER + b" end\n" in shown
        assert SECRET.encode() not in shown and API_KEY.encode() not in shown
        restored = termios.tcgetattr(term.slave_fd)
        assert restored[3] == term.cooked[3]
    finally:
        term.close()


def test_run_mask_terminal_is_restored_when_the_command_is_not_found(setup: tuple[dict[str, str], Path]) -> None:
    env, _ = setup
    term = Terminal(["run", "--mask", "-p", "mask", "--", "no-such-bot-xyz"], env)
    try:
        assert term.proc.wait(timeout=60) == 127
        assert termios.tcgetattr(term.slave_fd)[3] == term.cooked[3]
        assert b"command not found" in term.wait_output(b"command not found")
    finally:
        term.close()


def test_run_mask_on_a_pipe_gives_the_child_pipes_even_with_a_terminal_stdin(
        setup: tuple[dict[str, str], Path]) -> None:
    env, _ = setup
    master, slave = os.openpty()
    try:
        code = "import os; print([os.isatty(fd) for fd in (0, 1, 2)], os.environ['S'])"
        res = broker(["run", "--mask", "-p", "mask", "--", sys.executable, "-c", code], env, stdin=slave)
        assert res.returncode == 0, res.stderr
        # stdout is a pipe: no pty; stdin is the broker's own (a terminal here), untouched
        assert res.stdout == b"[True, False, False] " + MARKER + b"\n"
    finally:
        os.close(master)
        os.close(slave)
