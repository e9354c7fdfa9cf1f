"""Output masking for ``credbroker run --mask`` (issue 6, item 5).

Two layers:

* ``Masker``: pure and streaming. Every occurrence of a secret value in a
  byte stream becomes ``MARKER``, also when the value is split across reads.
  Occurrences that overlap (or one inside another, e.g. a value that is a
  prefix of another) are covered together by one marker, so no byte of any
  occurrence is ever shown; occurrences that merely touch get one marker
  each. It holds back only the shortest tail it must: the longest suffix of
  what it has seen that is a proper prefix of some value (at most
  ``len(longest) - 1`` bytes). Ordinary output, which rarely ends in the
  first bytes of a secret, is passed on at once. ``flush()`` releases that
  tail; the plumbing calls it at the end of a stream and after the stream
  has been quiet for a moment: ``IDLE_FLUSH_TTY`` (0.1 s) on a terminal, so
  a prompt or a typed echo is never visibly held back, ``IDLE_FLUSH_PIPE``
  (1 s) on pipes, where nobody types. Without idle flushes the streamed
  result equals masking the whole output at once, for every way of cutting
  it into reads (tests/integration/test_masking.py checks every split point).

  Speed: where no two values can partly overlap in the piece at hand (the
  usual case: random keys), masking is C-speed ``split``/``join`` per value,
  longest first; otherwise every occurrence becomes a span and overlapping
  spans are merged (scripts/bench_mask.py).

  The trade-off of the idle flush: a value written in pieces more than
  that pause apart is no longer seen whole. Masking is a guard against
  accidents (a bot that logs its config or environment, a crash dump of
  ``os.environ``), which write a value in one go or in pieces microseconds
  apart; it is not a defence against a child that means to leak (that child
  can print the value base64-encoded). Agent mode is the defence there.

* ``MaskedOutput``: the plumbing ``runner.run`` uses for each child it starts
  (rotation restarts included). When the broker's stdout is a terminal, the
  child gets a pseudo-terminal, so ``isatty()`` is true and colours and
  full-screen programs work:

  - the pty's settings and window size are copied from the broker's
    terminal at start, and the size again on every SIGWINCH;
  - the broker's stdin, when it is the terminal and the broker is in its
    foreground, is put in raw mode and forwarded to the pty (keys such as
    Ctrl-C then reach the child through the pty's own line discipline, so
    the child gets SIGINT once, from its terminal); the mode is restored at
    exit, also on errors. Output post-processing (``\\n`` -> ``\\r\\n``) of
    the broker's terminal stays on, so credbroker's own messages keep their
    line starts. A stdin that is not a terminal is given to the child as it
    is (its end of file stays an end of file);
  - the child runs in its own session with the pty as its controlling
    terminal. Ctrl-Z is disabled on that pty (passed as a byte): a bot
    stopped there would have no shell to resume it;
  - stdout and stderr share a terminal: when the broker's stderr is the
    terminal too, the child's stderr is the pty as well (one masked stream
    to the broker's stdout, as on any terminal); when the broker's stderr is
    redirected, the child's stderr is a pipe, masked separately into it, so
    ``2>file`` keeps working.

  Otherwise the child's stdout and stderr are pipes, each masked into the
  broker's own stdout and stderr, and its stdin is the broker's.

  One thread per child copies and masks. It is started by the main thread
  after the forwarded signals are blocked (``runner.run`` blocks them before
  spawning), so it never takes a signal meant for ``runner.supervise``.
  After the child exits, output is drained until end of file, or until it
  has been quiet for ``DRAIN_IDLE`` seconds when a background process of the
  child still holds the stream open. The values to mask are copied into
  bytearrays owned here and zeroed when the child's output is finished.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import selectors
import signal
import struct
import termios
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import RunError

#: What replaces every secret value in the child's output.
MARKER = b"[credbroker:masked]"

#: A stream quiet this long releases the tail held back (see the module doc).
IDLE_FLUSH_TTY = 0.1
IDLE_FLUSH_PIPE = 1.0

#: After the child exited: stop reading a stream that stays quiet this long
#: without reaching end of file (a background process of the child holds it).
DRAIN_IDLE = 0.5

#: Read size: below glibc's mmap threshold, so the buffers are reused heap
#: memory (1 MiB reads measured 2x slower: fresh pages every read).
_READ_SIZE = 1 << 16
#: The pipe buffer asked for (Linux lets any user have 1 MiB,
#: /proc/sys/fs/pipe-max-size): the child blocks less often on a busy broker.
_PIPE_SIZE = 1 << 20


class _Revealable(Protocol):
    def reveal(self) -> bytes: ...


class Masker:
    """Streaming replacement of secret values by ``marker`` (pure: bytes in, bytes out).

    ``feed(data)`` returns what can be shown now; ``flush()`` returns the rest
    (call it at the end of the stream, or when the stream goes idle).
    ``wipe()`` zeroes the values held.

    Semantics: every byte of every occurrence is hidden; occurrences that
    overlap (or nest) form one run under one marker; occurrences that merely
    touch get one marker each.
    """

    __slots__ = ("_values", "_marker", "_carry", "_run", "_conflicts", "_plain")

    def __init__(self, values: Iterable[bytes | bytearray], marker: bytes = MARKER) -> None:
        seen: list[bytearray] = []
        for v in values:
            if v and not any(v == s for s in seen):
                seen.append(bytearray(v))
        seen.sort(key=len, reverse=True)  # longest first: a value inside another goes with it
        self._values = seen
        self._marker = bytes(marker)
        self._carry = b""  # held back: may start a value (or continue a masked run)
        # An open masked run: its marker is out and it covers this many bytes
        # at the start of _carry; an occurrence starting there extends it.
        self._run: int | None = None
        # Fast path (C-speed bytes.replace, longest value first) is exact for a
        # piece of output where no two occurrences partly overlap. They can
        # only where the output holds one of these strings: two values (or
        # one twice) overlapping. Values that overlap the marker text itself
        # would make replacement order matter: never the fast path then.
        self._conflicts = _overlap_strings(seen)
        m = self._marker
        self._plain = not any(m in v or v in m or _overlaps(v, m) or _overlaps(m, v) for v in seen)

    @property
    def pending(self) -> int:
        """How many bytes are held back, waiting for more data or ``flush()``."""
        return len(self._carry)

    def feed(self, data: bytes) -> bytes:
        """Mask ``data``, the next piece of the stream; return what can be shown now."""
        if not self._values:
            return data
        buf = self._carry + data if self._carry else data
        return self._process(buf, final=False)

    def flush(self) -> bytes:
        """Release the held-back tail (masked where it holds a whole value); close any masked run."""
        if not self._carry:
            self._run = None
            return b""
        return self._process(self._carry, final=True)

    def wipe(self) -> None:
        """Zero the values held (in place: they are bytearrays owned here)."""
        for v in (*self._values, *self._conflicts):
            v[:] = bytes(len(v))
        self._values = []
        self._conflicts = []
        self._carry = b""
        self._run = None

    def _hold_from(self, buf: bytes) -> int:
        """Start of the longest suffix of ``buf`` that is a proper prefix of a value."""
        n = len(buf)
        best = n
        for v in self._values:
            first = v[0]
            # A proper prefix is shorter than v: it starts after n - len(v).
            i = buf.find(first, max(0, n - len(v) + 1), best)  # memchr: only where v could start
            while i != -1:
                if v.startswith(buf[i:]):
                    best = i
                    break
                i = buf.find(first, i + 1, best)
        return best

    def _crosses(self, buf: bytes, hold: int) -> bool:
        """Does an occurrence start before ``hold`` and end after it?"""
        if hold >= len(buf):
            return False
        for v in self._values:
            i = buf.find(v, max(0, hold - len(v) + 1))
            if i != -1 and i < hold:
                return True
        return False

    def _process(self, buf: bytes, *, final: bool) -> bytes:
        hold = len(buf) if final else self._hold_from(buf)
        if (self._plain and self._run is None and not self._crosses(buf, hold)
                and not (self._conflicts and any(c in buf for c in self._conflicts))):
            head = buf[:hold] if hold < len(buf) else buf
            for v in self._values:  # longest first; split+join: replace() is slower with many matches
                head = self._marker.join(head.split(v))
            self._carry = b"" if final else buf[hold:]
            return head
        return self._process_spans(buf, hold, final=final)

    def _process_spans(self, buf: bytes, hold: int, *, final: bool) -> bytes:
        """The general case: every occurrence as a span, overlapping spans merged."""
        run = self._run
        spans: list[tuple[int, int]] = []
        for v in self._values:
            i = buf.find(v)
            while i != -1:
                spans.append((i, i + len(v)))
                i = buf.find(v, i + 1)
        if run is not None:
            spans.append((0, run))  # the masked run whose marker is already out
        spans.sort()
        out: list[bytes] = []
        pos = 0
        run_end: int | None = None  # end of the last run emitted
        i = 0
        while i < len(spans):
            start, end = spans[i]
            continued = run is not None and i == 0  # every span at 0 merges with (0, run)
            if start >= hold and not continued:
                break  # starts in the held tail: decided with the next data
            i += 1
            while i < len(spans) and spans[i][0] < end:  # overlapping: one run, one marker
                end = max(end, spans[i][1])
                i += 1
            out.append(buf[pos:start])
            if not continued:
                out.append(self._marker)
            pos = run_end = end
        if run_end is not None and run_end > hold and not final:
            # The run reaches into the held tail: its marker is out, so the
            # covered bytes are never shown, and an occurrence overlapping
            # them extends it.
            self._run = run_end - hold
        else:
            out.append(buf[pos:hold])
            self._run = None
        self._carry = b"" if final else buf[hold:]
        return b"".join(out)


def _overlaps(a: bytes | bytearray, b: bytes | bytearray) -> bool:
    """Does a proper suffix of ``a`` equal a proper prefix of ``b``?"""
    return any(_suffix_is_prefix(a, b, k) for k in range(1, min(len(a), len(b))))


def _suffix_is_prefix(a: bytes | bytearray, b: bytes | bytearray, k: int) -> bool:
    # memoryviews compare without copying: no stray copies of secret bytes
    return memoryview(a)[len(a) - k:] == memoryview(b)[:k]


def _overlap_strings(values: list[bytearray]) -> list[bytearray]:
    """Every string in which two values (or one value twice) partly overlap."""
    out: list[bytearray] = []
    for a in values:
        for b in values:
            for k in range(1, min(len(a), len(b))):
                if _suffix_is_prefix(a, b, k):
                    c = bytearray(len(a) + len(b) - k)  # sized once: no reallocation leaves a copy behind
                    c[:len(a)] = a
                    c[len(a):] = memoryview(b)[k:]
                    if c in out:
                        c[:] = bytes(len(c))
                    else:
                        out.append(c)
    return out


def mask_all(data: bytes, values: Iterable[bytes | bytearray], marker: bytes = MARKER) -> bytes:
    """Mask a whole byte string at once (the reference the streaming result equals)."""
    m = Masker(values, marker)
    try:
        return m.feed(data) + m.flush()
    finally:
        m.wipe()


def secret_values(secrets: Iterable[_Revealable]) -> list[bytearray]:
    """Copies of the secrets' bytes in bytearrays the caller owns and must zero."""
    out: list[bytearray] = []
    for s in secrets:
        value = s.reveal()
        out.append(bytearray(value))
        del value  # an immutable copy cannot be zeroed; drop it at once
    return out


# ---------------------------------------------------------------------------------------
# The plumbing: pseudo-terminal or pipes, and one copying thread per child.


def _is_tty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _get_winsize(fd: int) -> bytes | None:
    try:
        return fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    except OSError:
        return None


def _copy_winsize(src: int, dst: int) -> None:
    size = _get_winsize(src)
    if size is not None and struct.unpack("HHHH", size)[:2] != (0, 0):
        try:
            fcntl.ioctl(dst, termios.TIOCSWINSZ, size)  # the kernel sends the child SIGWINCH
        except OSError:
            pass


def _grow_pipe(fd: int) -> None:
    """Ask for a larger pipe buffer: fewer, larger reads (best effort; Linux)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    except (AttributeError, OSError):
        pass


def _raw_input_mode(mode: list[Any]) -> list[Any]:
    """``mode`` with input made raw (as cfmakeraw) but output processing left on."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = mode
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
               | termios.IGNCR | termios.ICRNL | termios.IXON)
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


@dataclass
class ChildStdio:
    """The standard streams one child gets, and what to do around its start."""

    stdin: int | None
    stdout: int
    stderr: int
    new_session: bool  # a pty: the child leads a new session with it as its terminal
    child_ends: list[int] = field(default_factory=list)  # closed in the broker after the spawn
    _pump: _Pump | None = None

    def popen_args(self) -> dict[str, Any]:
        """Keyword arguments for ``subprocess.Popen``."""
        return {"stdin": self.stdin, "stdout": self.stdout, "stderr": self.stderr,
                "start_new_session": self.new_session}

    def in_child(self) -> None:
        """Between fork and exec (after setsid): make the pty the controlling terminal."""
        if self.new_session:
            fcntl.ioctl(1, termios.TIOCSCTTY, 0)

    def spawned(self) -> None:
        """In the broker right after the spawn (or its failure): close the child's ends, start copying."""
        for fd in self.child_ends:
            try:
                os.close(fd)
            except OSError:
                pass
        self.child_ends = []
        if self._pump is not None:
            self._pump.start()


class MaskedOutput:
    """Masked stdout/stderr for every child of one ``credbroker run``.

    ``child_stdio(secrets)`` before each spawn (it finishes the previous
    child's output first); ``close()`` once at the end: drains, restores the
    terminal, zeroes the values.
    """

    def __init__(self, stdin_fd: int = 0, stdout_fd: int = 1, stderr_fd: int = 2) -> None:
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        self.use_pty = _is_tty(stdout_fd)
        self._saved_mode: list[Any] | None = None  # the broker's terminal, to restore
        self._forward_stdin = False
        self._winch: tuple[int, int] | None = None  # (read, write) of the SIGWINCH wake-up pipe
        self._old_wakeup: int | None = None
        self._old_handler: Any = None
        self._pump: _Pump | None = None
        self._setup_done = False

    # -- per run ---------------------------------------------------------------------------
    def _setup_terminal(self) -> None:
        """Once per run: raw input and SIGWINCH following (pty mode only)."""
        if self._setup_done:
            return
        self._setup_done = True
        fd = self.stdin_fd
        if _is_tty(fd):
            try:
                foreground = os.tcgetpgrp(fd) == os.getpgrp()
            except OSError:
                foreground = False
            if foreground:  # a background job must not touch the terminal (SIGTTOU/SIGTTIN)
                try:
                    mode = termios.tcgetattr(fd)
                    termios.tcsetattr(fd, termios.TCSADRAIN, _raw_input_mode(mode))
                    self._saved_mode = mode
                    self._forward_stdin = True
                except termios.error:
                    pass
        self._follow_window_size()

    def _follow_window_size(self) -> None:
        """Have SIGWINCH wake the copying thread, whichever thread the kernel picks.

        Python's C-level handler writes the signal number to the wake-up fd in
        any thread; the copying thread watches that pipe and copies the size.
        Only the main thread may install handlers; elsewhere the size is copied
        at start only.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        try:
            self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self._old_handler = signal.signal(signal.SIGWINCH, _ignore_signal)
        except (ValueError, OSError):
            os.close(r)
            os.close(w)
            return
        self._winch = (r, w)

    def _pty_mode(self) -> list[Any] | None:
        """Settings for the child's pty: the broker's terminal as it was, Ctrl-Z disabled, and no
        output processing: the broker's own terminal turns LF into CR LF once, as it would for
        the bot run directly (with both doing it, every line ended CR CR LF)."""
        mode = self._saved_mode
        if mode is None:
            try:
                mode = termios.tcgetattr(self.stdout_fd)
            except termios.error:
                return None
        mode = [*mode[:6], list(mode[6])]
        mode[1] &= ~termios.OPOST
        mode[6][termios.VSUSP] = 0  # _POSIX_VDISABLE on Linux
        return mode

    # -- per child -------------------------------------------------------------------------
    def child_stdio(self, secrets: Iterable[_Revealable]) -> ChildStdio:
        """Streams for the next child, masking ``secrets`` (every injected field)."""
        self.finish_child()
        values = secret_values(secrets)
        opened: list[int] = []
        try:
            return self._child_stdio(values, opened)
        except OSError as exc:
            for v in values:
                v[:] = bytes(len(v))
            for fd in opened:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise RunError(f"cannot set up output masking: {exc.strerror or exc}",
                           "run without --mask, or check the limits on open files and ptys") from exc

    def _child_stdio(self, values: list[bytearray], opened: list[int]) -> ChildStdio:
        streams: list[_Stream] = []
        child_ends: list[int] = []
        if self.use_pty:
            self._setup_terminal()
            master, slave = os.openpty()
            opened += [master, slave]
            child_ends.append(slave)
            mode = self._pty_mode()
            if mode is not None:
                try:
                    termios.tcsetattr(slave, termios.TCSANOW, mode)
                except termios.error:
                    pass
            _copy_winsize(self.stdout_fd, master)
            streams.append(_Stream(master, self.stdout_fd, Masker(values)))
            stderr = slave
            if not _is_tty(self.stderr_fd):
                err_r, stderr = os.pipe()
                opened += [err_r, stderr]
                child_ends.append(stderr)
                streams.append(_Stream(err_r, self.stderr_fd, Masker(values), is_pipe=True))
            stdin: int | None = slave if (self._forward_stdin or _is_tty(self.stdin_fd)) else None
            pump = _Pump(streams, stdin_src=self.stdin_fd if self._forward_stdin else None,
                         stdin_dst=master, winch=(self._winch[0] if self._winch else None),
                         winch_src=self.stdout_fd, values=values)
            stdio = ChildStdio(stdin=stdin, stdout=slave, stderr=stderr, new_session=True,
                               child_ends=child_ends, _pump=pump)
        else:
            out_r, out_w = os.pipe()
            opened += [out_r, out_w]
            err_r, err_w = os.pipe()
            opened += [err_r, err_w]
            child_ends += [out_w, err_w]
            for fd in (out_r, err_r):
                _grow_pipe(fd)
            streams.append(_Stream(out_r, self.stdout_fd, Masker(values), is_pipe=True))
            streams.append(_Stream(err_r, self.stderr_fd, Masker(values), is_pipe=True))
            pump = _Pump(streams, values=values)
            stdio = ChildStdio(stdin=None, stdout=out_w, stderr=err_w, new_session=False,
                               child_ends=child_ends, _pump=pump)
        self._pump = pump
        return stdio

    def finish_child(self) -> None:
        """The child exited: drain its output, close the streams, zero the values."""
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.finish()

    def close(self) -> None:
        """Drain the last child's output, restore the terminal and SIGWINCH. Idempotent."""
        try:
            self.finish_child()
        finally:
            if self._saved_mode is not None:
                try:
                    termios.tcsetattr(self.stdin_fd, termios.TCSADRAIN, self._saved_mode)
                except termios.error:
                    pass
                self._saved_mode = None
            if self._winch is not None:
                try:
                    signal.set_wakeup_fd(self._old_wakeup if self._old_wakeup is not None else -1)
                    signal.signal(signal.SIGWINCH, self._old_handler if self._old_handler is not None
                                  else signal.SIG_DFL)
                except (ValueError, OSError):
                    pass
                for fd in self._winch:
                    os.close(fd)
                self._winch = None


def _ignore_signal(signum: int, frame: object) -> None:
    """SIGWINCH's Python handler: the work is done by the copying thread."""


class _Stream:
    """One output of the child: where it is read, where it goes, its masker."""

    __slots__ = ("src", "dst", "masker", "is_pipe", "idle", "last", "open", "broken")

    def __init__(self, src: int, dst: int, masker: Masker, *, is_pipe: bool = False) -> None:
        self.src = src
        self.dst = dst
        self.masker = masker
        self.is_pipe = is_pipe
        # How long a held-back tail may wait for more output (module doc).
        self.idle = IDLE_FLUSH_PIPE if is_pipe and not _is_tty(dst) else IDLE_FLUSH_TTY
        self.last = time.monotonic()
        self.open = True
        self.broken = False  # the broker's own output is gone (EPIPE)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:  # the broker's output was left non-blocking by someone
            select.select([], [fd], [])
            continue
        view = view[n:]


class _Pump(threading.Thread):
    """Copies the child's outputs through their maskers; forwards stdin to the pty."""

    def __init__(self, streams: list[_Stream], *, stdin_src: int | None = None, stdin_dst: int | None = None,
                 winch: int | None = None, winch_src: int | None = None,
                 values: list[bytearray] | None = None) -> None:
        super().__init__(name="credbroker-mask", daemon=True)
        self.streams = streams
        self.stdin_src = stdin_src
        self.stdin_dst = stdin_dst
        self.winch = winch
        self.winch_src = winch_src
        self.values = values or []
        self._ctl_r, self._ctl_w = os.pipe()
        self.error: BaseException | None = None

    # -- main thread -----------------------------------------------------------------------
    def finish(self) -> None:
        """Tell the thread the child is gone, wait until it has drained, release everything."""
        try:
            if self.is_alive():
                try:
                    os.write(self._ctl_w, b"x")
                except OSError:
                    pass
                self.join()
        finally:
            for s in self.streams:
                if s.open:
                    self._close_stream(s)
                s.masker.wipe()
            for v in self.values:
                v[:] = bytes(len(v))
            for fd in (self._ctl_r, self._ctl_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._ctl_r = self._ctl_w = -1

    # -- the thread ------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - never leave the child blocked on a full pipe
            self.error = exc
            for s in self.streams:
                if s.open:
                    self._close_stream(s)
            try:
                os.write(2, f"credbroker: output masking failed ({type(exc).__name__}); the rest of "
                            "the bot's output is dropped\n".encode())
            except OSError:
                pass

    def _close_stream(self, s: _Stream) -> None:
        s.open = False
        if s.src != self.stdin_dst:
            try:
                os.close(s.src)
            except OSError:
                pass
        elif self.stdin_dst is not None:
            try:
                os.close(self.stdin_dst)
            except OSError:
                pass
            self.stdin_dst = None

    def _emit(self, s: _Stream, data: bytes) -> None:
        if not data or s.broken:
            return
        try:
            _write_all(s.dst, data)
        except BrokenPipeError:
            # Whoever read our output is gone: a pipe tells the child so (EPIPE,
            # as in a shell pipeline); a pty has no such signal, so drop.
            s.broken = True
        except OSError:
            s.broken = True

    def _read_stream(self, sel: selectors.BaseSelector, s: _Stream) -> None:
        """Read what the child wrote (a few full reads in a row while there is more), mask, emit."""
        fd = s.src
        for _ in range(16):
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.EIO:  # EIO: a pty with no slave left is at its end
                    raise
                data = b""
            if not data:
                self._emit(s, s.masker.flush())
                sel.unregister(fd)
                self._close_stream(s)
                return
            self._emit(s, s.masker.feed(data))
            if s.broken and s.is_pipe:
                sel.unregister(fd)
                self._close_stream(s)  # the child's next write gets EPIPE, as in a shell pipeline
                return
            if len(data) < _READ_SIZE:
                break
        s.last = time.monotonic()

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        by_fd: dict[int, _Stream] = {}
        for s in self.streams:
            os.set_blocking(s.src, False)
            by_fd[s.src] = s
        pending_in = bytearray()  # typed input not yet taken by the pty
        master = self.stdin_dst if self.stdin_src is not None else None

        def interest(fd: int) -> int:
            ev = 0
            if fd in by_fd and by_fd[fd].open:
                ev |= selectors.EVENT_READ
            if fd == master and pending_in:
                ev |= selectors.EVENT_WRITE
            return ev

        def update(fd: int) -> None:
            ev = interest(fd)
            try:
                key = sel.get_key(fd)
            except KeyError:
                key = None
            if key is None and ev:
                sel.register(fd, ev)
            elif key is not None and not ev:
                sel.unregister(fd)
            elif key is not None and key.events != ev:
                sel.modify(fd, ev)

        for fd in by_fd:
            update(fd)
        stdin_open = self.stdin_src is not None
        if stdin_open:
            assert self.stdin_src is not None
            sel.register(self.stdin_src, selectors.EVENT_READ)
        if self.winch is not None:
            sel.register(self.winch, selectors.EVENT_READ)
            assert self.winch_src is not None and self.stdin_dst is not None
            _copy_winsize(self.winch_src, self.stdin_dst)  # a resize since child_stdio()
        sel.register(self._ctl_r, selectors.EVENT_READ)
        draining = False
        drain_since = 0.0

        while any(s.open for s in self.streams):
            now = time.monotonic()
            timeout: float | None = None
            for s in self.streams:
                if s.open and s.masker.pending:
                    left = s.last + s.idle - now
                    timeout = left if timeout is None else min(timeout, left)
            if draining:
                last = max([drain_since] + [s.last for s in self.streams if s.open])
                left = last + DRAIN_IDLE - now
                timeout = left if timeout is None else min(timeout, left)
            events = sel.select(None if timeout is None else max(timeout, 0.0))
            for key, mask in events:
                fd = key.fd
                if fd == self._ctl_r:
                    os.read(fd, 64)
                    sel.unregister(fd)
                    draining = True
                    drain_since = time.monotonic()
                    if stdin_open and self.stdin_src is not None:
                        sel.unregister(self.stdin_src)  # nobody to type to any more
                        stdin_open = False
                    pending_in.clear()
                    if master is not None and master in by_fd:
                        update(master)
                    continue
                if fd == self.winch:
                    try:
                        while os.read(fd, 512):
                            pass
                    except BlockingIOError:
                        pass
                    if self.stdin_dst is not None and self.winch_src is not None:
                        _copy_winsize(self.winch_src, self.stdin_dst)
                    continue
                if stdin_open and fd == self.stdin_src:
                    try:
                        data = os.read(fd, 4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(fd)
                        stdin_open = False
                        continue
                    if master is not None and by_fd[master].open:
                        pending_in += data
                        update(master)
                    continue
                if mask & selectors.EVENT_WRITE and fd == master and pending_in:
                    try:
                        n = os.write(fd, pending_in)
                        del pending_in[:n]
                    except BlockingIOError:
                        pass
                    except OSError:
                        pending_in.clear()
                    update(fd)
                if mask & selectors.EVENT_READ and fd in by_fd:
                    self._read_stream(sel, by_fd[fd])
            now = time.monotonic()
            for s in self.streams:
                if s.open and s.masker.pending and now - s.last >= s.idle:
                    self._emit(s, s.masker.flush())
            if draining:
                last = max([drain_since] + [s.last for s in self.streams if s.open])
                if now - last >= DRAIN_IDLE:
                    break
        for s in self.streams:
            if s.open:
                self._emit(s, s.masker.flush())
        sel.close()


def check_not_agent(mask: bool, agent: bool) -> None:
    """``--mask`` with ``--agent`` is refused: the child holds no secret to mask."""
    if mask and agent:
        raise RunError("--mask and --agent cannot be combined: in agent mode the bot never holds the secret, "
                       "so its output has nothing to mask", "drop --mask (or --agent)")


__all__ = ["MARKER", "IDLE_FLUSH_TTY", "IDLE_FLUSH_PIPE", "DRAIN_IDLE", "Masker", "mask_all", "MaskedOutput",
           "ChildStdio", "check_not_agent", "secret_values"]
