"""The proxy's event loop: every bot connection and every exchange connection in one thread.

The first servers gave each bot connection a thread. With several connections
busy at once, each of their system calls (a receive, a send, a poll) let
another thread take the GIL: hand-offs that cost the proxy more CPU per request
than the request itself (``scripts/bench_proxy.py --capacity``: 172 us with one
connection, 278 us with eight). Here one thread waits on every socket at once
(``select.epoll``: the proxy is Linux-only, as its peer check reads ``/proc``),
so a request costs the same whatever the number of connections, and a bot with
many connections costs no thread each.

A request's path through the loop:

1. read from the bot's connection until a whole request is there
   (``http11.parse_request``; ``100 Continue`` when the client waits for it);
2. ``step`` (the proxy's checks, re-signing and audit record, all in memory)
   answers it at once (a refusal), or says where to forward it (``Forward``),
   or says it must run on a worker thread (``None``: a signer that calls Vault,
   listenKey upkeep), where ``serve`` handles it the blocking way;
3. a forwarded request goes out on a kept-alive, non-blocking connection to
   the exchange (a new one is connected on a worker thread: DNS and the TLS
   handshake block), and its answer is read as it arrives (``AnswerReader``);
4. ``Forward.done`` (audit, weight headers) turns the answer into the bot's,
   in the loop, or on a worker thread when ``Forward.quick`` says it may block
   (an error answer may make the proxy ask the exchange for its clock).

Nothing is retried: an answer that does not come (read timeout, a closed
connection) is the bot's 502, as with the blocking pool. A bot connection that
is idle for ``IDLE_TIMEOUT`` seconds, or does not take its answer for as long,
is closed; an exchange that does not answer within the upstream's read timeout
fails that request.
"""

from __future__ import annotations

import os
import queue
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

from ..errors import UpstreamError
from ..unixsock import send_some
from .http11 import MAX_BODY, MAX_HEAD, Incomplete, Request, BadRequest, encode_answer, error_answer, parse_request
from .upstream import Answer, AnswerReader, Upstream

IDLE_TIMEOUT = 600.0  # seconds a kept-alive bot connection may wait for its next request (or take an answer)
WORKERS = 16  # threads for what blocks: peer checks, new exchange connections, Vault signing
POOL_SIZE = 16  # idle kept-alive connections per exchange
_ACCEPT_BATCH = 64
#: Bytes of a bot's requests read ahead while one of its requests is answered (or its answers wait to be
#: sent): past this the connection is not read until the bot catches up (the kernel's buffers push back).
_READ_AHEAD = MAX_HEAD + MAX_BODY
#: New connections whose peer check has not come back: past this many, the rest wait in the listen
#: backlog (a flood of connections from outside the bot's tree queues in the kernel, not in memory).
MAX_CHECKING = 64
REFUSED_TIMEOUT = 5.0  # seconds a connection from outside the bot's tree is kept for its one answer (the 403)
_ACCEPT_RETRY = 0.1  # seconds without accepting after accept() failed (out of file descriptors)
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_READABLE = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_LISTENER, _WAKE = object(), object()
_EXCEPTIONS = (OSError, ValueError, ssl.SSLError)


class Forward(NamedTuple):
    """Where a checked and re-signed request goes, and what makes the bot's answer of the exchange's."""

    upstream: Upstream
    method: str
    data: bytes  # the request as written on the wire
    done: Callable[[Answer | UpstreamError], Answer]
    quick: Callable[[Answer], bool]  # may ``done`` run in the loop (it never blocks for this answer)?


#: (the accept state, the request) -> an answer and whether to close after it, a Forward, or None (use ``serve``).
Step = Callable[[Any, Request], "tuple[Answer, bool] | Forward | None"]
#: (client address, server address) -> the connection's state, given to ``step`` and ``serve`` (may block).
Accept = Callable[[tuple[str, int], tuple[str, int]], Any]
#: (the accept state, the request) -> the answer and whether to close after it (may block: a worker runs it).
Serve = Callable[[Any, Request], "tuple[Answer, bool]"]


class _Bot:
    __slots__ = ("sock", "state", "inbuf", "outbuf", "busy", "keep", "closing", "continued", "deadline",
                 "writing", "closed", "reading", "events")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.state: Any = None
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.busy = False  # a request of this connection is being answered
        self.keep = True
        self.closing = False  # close once the answers are sent
        self.continued = False  # "100 Continue" sent for the request being read
        self.deadline = 0.0
        self.writing = False  # answers wait to be sent (the client does not read them yet)
        self.events = 0  # what epoll watches for it
        self.closed = False
        self.reading = False  # _process is running for it (an answer given inside it does not call it again)


class _Up:
    __slots__ = ("sock", "upstream", "tls", "reader", "out", "bot", "fwd", "deadline", "events", "closed")

    def __init__(self, sock: socket.socket, upstream: Upstream) -> None:
        self.sock = sock
        self.upstream = upstream
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.reader: AnswerReader | None = None
        self.out = b""
        self.bot: _Bot | None = None  # None while idle in the pool
        self.fwd: Forward | None = None
        self.deadline = 0.0
        self.events = 0
        self.closed = False


class _Workers:
    """Up to ``n`` daemon threads, started as work comes. (Not ``concurrent.futures``: its threads are
    joined at interpreter exit, so a connect or a Vault call still in flight would hold up the broker's
    exit; these die with the process.)"""

    def __init__(self, n: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._max = n
        self._name = name
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._closed = False

    def submit(self, job: Callable[[], None]) -> None:
        if self._closed:
            return
        with self._lock:
            if self._idle == 0 and self._threads < self._max:
                self._threads += 1
                threading.Thread(target=self._run, name=f"{self._name}-{self._threads}", daemon=True).start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
            if job is None:
                return
            job()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            threads = self._threads
        for _ in range(threads):
            self._jobs.put(None)


class LoopServer:
    """Listen on 127.0.0.1 (a free port); ``start()`` returns the port, ``stop()`` closes everything."""

    def __init__(self, accept: Accept, step: Step, serve: Serve, *, refused: Callable[[Any], bool] | None = None,
                 name: str = "credbroker-proxy") -> None:
        """``refused(state)``: the peer check refused this connection; it is kept only ``REFUSED_TIMEOUT``
        seconds, time for its request and the 403, not ``IDLE_TIMEOUT``."""
        self._accept_fn = accept
        self._refused = refused
        self._step = step
        self._serve = serve
        self._name = name
        self._listener: socket.socket | None = None
        self._sel: select.epoll | None = None
        self._objs: dict[int, object] = {}  # fd -> its _Bot, _Up, _LISTENER or _WAKE
        self._wake_r = self._wake_w = -1
        self._wake_lock = threading.Lock()
        self._posted: deque[Callable[[], None]] = deque()
        self._bots: set[_Bot] = set()
        self._busy_ups: set[_Up] = set()
        self._idle: dict[str, list[_Up]] = {}
        self._workers: _Workers | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._next_sweep = float("inf")
        self._checking = 0  # connections waiting for their peer check
        self._accepting = True
        self._accept_again = 0.0  # accept() failed: not before this time
        self.port = 0

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(256)
        listener.setblocking(False)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel = select.epoll()
        self._sel.register(listener.fileno(), _IN)
        self._objs[listener.fileno()] = _LISTENER
        self._sel.register(self._wake_r, _IN)
        self._objs[self._wake_r] = _WAKE
        self._workers = _Workers(WORKERS, f"{self._name}-work")
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        """Stop accepting, close every connection (idempotent)."""
        self._stopping = True
        self._wake()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5.0)
        workers, self._workers = self._workers, None
        if workers is not None:
            workers.close()
        with self._wake_lock:  # a worker finishing late must not write to a closed (reused) fd number
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
            for fd in fds:
                if fd >= 0:
                    os.close(fd)

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # a wake-up already waiting (the pipe is full)

    def _post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the loop's thread (from a worker)."""
        self._posted.append(fn)
        self._wake()

    def _work(self, bot: _Bot, job: Callable[[], Any], then: Callable[[Any, BaseException | None], None]) -> None:
        """Run ``job`` on a worker thread, then ``then(result, error)`` in the loop (for ``bot``, whose
        connection is closed if ``then`` fails)."""
        def run() -> None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = job()
            except BaseException as exc:  # handed to the loop, which answers the bot
                error = exc
            self._post(lambda: self._then(bot, then, result, error))

        workers = self._workers
        if workers is not None and not self._stopping:
            workers.submit(run)

    def _then(self, bot: _Bot, then: Callable[[Any, BaseException | None], None], result: Any,
              error: BaseException | None) -> None:
        try:
            then(result, error)
        except Exception:  # a bug must not stop the loop: this connection goes, the others stay
            self._close_bot(bot)

    # -- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        sel = self._sel
        assert sel is not None
        objs = self._objs
        try:
            while not self._stopping:
                timeout = -1.0
                if self._next_sweep != float("inf"):
                    timeout = max(0.0, self._next_sweep - time.monotonic())
                for fd, mask in sel.poll(timeout):
                    data = objs.get(fd)
                    try:
                        if type(data) is _Bot:
                            self._bot_event(data, mask)
                        elif type(data) is _Up:
                            self._up_event(data)
                        elif data is _LISTENER:
                            self._accept()
                        elif data is _WAKE:
                            os.read(self._wake_r, 4096)
                    except Exception:  # a bug must not stop the loop: that connection goes, the others stay
                        self._drop(data)
                posted = self._posted
                while posted:
                    posted.popleft()()  # _then: never raises
                if time.monotonic() >= self._next_sweep:
                    self._sweep()
        finally:
            self._close_all()

    def _forget(self, sock: socket.socket) -> None:
        """Stop watching ``sock`` (before it is closed: its fd number may be reused at once)."""
        assert self._sel is not None
        fd = sock.fileno()
        self._objs.pop(fd, None)
        try:
            self._sel.unregister(fd)
        except (OSError, ValueError):
            pass

    def _drop(self, data: object) -> None:
        if type(data) is _Bot:
            self._close_bot(data)
        elif type(data) is _Up:
            self._close_up(data)

    def _close_all(self) -> None:
        for bot in list(self._bots):
            self._close_bot(bot)
        for up in list(self._busy_ups):
            self._close_up(up)
        for ups in self._idle.values():
            for up in ups:
                self._close_up(up)
        self._idle.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._sel is not None:
            self._sel.close()

    def _sweep(self) -> None:
        """Close what waited too long; find the next deadline."""
        now = time.monotonic()
        nearest = float("inf")
        for up in list(self._busy_ups):
            if up.deadline <= now:
                bot, fwd = up.bot, up.fwd
                self._close_up(up)
                if bot is not None and fwd is not None:
                    self._finish(bot, fwd, fwd.upstream.failure(TimeoutError()))
            else:
                nearest = min(nearest, up.deadline)
        for bot in list(self._bots):
            if bot.busy and not bot.writing:
                continue  # its answer is on the way: the exchange's read timeout bounds it
            if bot.deadline <= now:
                self._close_bot(bot)
            else:
                nearest = min(nearest, bot.deadline)
        if self._accept_again and self._accept_again <= now:
            self._accept_again = 0.0
            if self._checking < MAX_CHECKING:
                self._listen(True)
        elif self._accept_again:
            nearest = min(nearest, self._accept_again)
        self._next_sweep = nearest

    def _deadline(self, seconds: float) -> float:
        when = time.monotonic() + seconds
        if when < self._next_sweep:
            self._next_sweep = when
        return when

    # -- the bot's side ---------------------------------------------------------------------
    def _accept(self) -> None:
        listener = self._listener
        if listener is None:
            return
        for _ in range(_ACCEPT_BATCH):
            if self._checking >= MAX_CHECKING:
                self._listen(False)
                return
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # Out of file descriptors (or another passing trouble): the listener stays readable, so
                # stop watching it for a moment instead of spinning on it.
                self._listen(False)
                self._accept_again = self._deadline(_ACCEPT_RETRY)
                return
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            bot = _Bot(sock)
            bot.deadline = self._deadline(IDLE_TIMEOUT)
            self._bots.add(bot)
            client = (str(addr[0]), int(addr[1]))
            # The peer check reads /proc (it may take milliseconds): a worker does it; the connection
            # is read once it is known.
            self._checking += 1
            self._work(bot, partial(self._accept_fn, client, ("127.0.0.1", self.port)), partial(self._admit, bot))

    def _listen(self, on: bool) -> None:
        """Watch the listener (or leave new connections in the backlog)."""
        if on != self._accepting and self._sel is not None and self._listener is not None:
            self._sel.modify(self._listener.fileno(), _IN if on else 0)
            self._accepting = on

    def _admit(self, bot: _Bot, state: Any, error: BaseException | None) -> None:
        self._checking -= 1
        if not self._accepting and not self._accept_again and self._checking < MAX_CHECKING // 2:
            self._listen(True)
        if bot.closed:
            return
        if error is not None:
            self._close_bot(bot)
            return
        bot.state = state
        if self._refused is not None and self._refused(state):
            bot.deadline = self._deadline(REFUSED_TIMEOUT)
        assert self._sel is not None
        fd = bot.sock.fileno()
        self._sel.register(fd, _IN)
        bot.events = _IN
        self._objs[fd] = bot

    def _bot_event(self, bot: _Bot, mask: int) -> None:
        if mask & _OUT:
            self._flush_bot(bot)
            if bot.closed:
                return
        if not mask & _READABLE:
            return
        try:
            data = bot.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_bot(bot)
            return
        if not data:
            self._bot_ended(bot)
            return
        bot.inbuf += data
        self._process(bot)
        if not bot.closed and len(bot.inbuf) >= _READ_AHEAD:
            self._watch(bot)  # enough read ahead: not read again until the bot's requests are answered

    def _watch(self, bot: _Bot) -> None:
        """Tell epoll what to wait for on ``bot``: its answers' sending, and more requests unless enough
        are read ahead."""
        events = (_IN if len(bot.inbuf) < _READ_AHEAD else 0) | (_OUT if bot.writing else 0)
        if events != bot.events and self._sel is not None and bot.state is not None:
            self._sel.modify(bot.sock.fileno(), events)
            bot.events = events

    def _bot_ended(self, bot: _Bot) -> None:
        """The client closed its side: an unfinished request gets a 400 (as far as it can be sent)."""
        if not bot.busy and bot.inbuf.strip() and not bot.closing:
            what = "body" if b"\r\n\r\n" in bot.inbuf else "headers"
            bot.outbuf += encode_answer(error_answer(400, f"the request ended before its {what} did"), True)
            bot.closing = True
            self._flush_bot(bot)
        if not bot.closed:
            self._close_bot(bot)

    def _process(self, bot: _Bot) -> None:
        """Handle the requests waiting in ``bot.inbuf``, one at a time (answers keep their order)."""
        if bot.reading:
            return  # the loop below takes the next request
        bot.reading = True
        try:
            self._next_requests(bot)
        finally:
            bot.reading = False

    def _next_requests(self, bot: _Bot) -> None:
        # Not while answers wait to be sent: a bot that sends and never reads gets no more answers made.
        while not bot.busy and not bot.writing and not bot.closing and not bot.closed and bot.inbuf:
            try:
                parsed = parse_request(bot.inbuf)
            except BadRequest as exc:
                self._answer(bot, error_answer(exc.status, exc.message), True)
                return
            if type(parsed) is Incomplete:
                if parsed.expects_continue and not bot.continued:
                    bot.continued = True
                    bot.outbuf += b"HTTP/1.1 100 Continue\r\n\r\n"
                    self._flush_bot(bot)
                return
            request, keep = parsed  # type: ignore[misc]
            bot.continued = False
            bot.busy, bot.keep = True, keep
            try:
                step = self._step(bot.state, request)
            except Exception:  # a bug must not stop the loop: this request fails, the others go on
                self._internal_error(bot)
                return
            if step is None:
                self._work(bot, partial(self._serve, bot.state, request), partial(self._served, bot))
            elif type(step) is Forward:
                self._forward(bot, step)
            else:
                answer, close = step  # type: ignore[misc]
                self._answer(bot, answer, close)

    def _served(self, bot: _Bot, result: tuple[Answer, bool] | None, error: BaseException | None) -> None:
        """A worker's (answer, close) for ``bot``, or the 500 of a job that raised."""
        if error is not None or result is None:
            self._internal_error(bot)
        else:
            self._answer(bot, result[0], result[1])

    def _internal_error(self, bot: _Bot) -> None:
        self._answer(bot, error_answer(500, "internal error"), True)

    def _answer(self, bot: _Bot, answer: Answer, close: bool) -> None:
        bot.busy = False
        if bot.closed:
            return
        close = close or not bot.keep
        bot.outbuf += encode_answer(answer, close)
        if close:
            bot.closing = True
        self._flush_bot(bot)
        if not bot.closed:
            bot.deadline = self._deadline(IDLE_TIMEOUT)
            self._process(bot)
            if not bot.closed:
                self._watch(bot)

    def _flush_bot(self, bot: _Bot) -> None:
        out = bot.outbuf
        if out and not send_some(bot.sock, out):
            self._close_bot(bot)
            return
        if not out and bot.closing:
            self._close_bot(bot)
            return
        want = bool(out)
        if want != bot.writing:
            bot.writing = want
            if want:
                bot.deadline = self._deadline(IDLE_TIMEOUT)
            self._watch(bot)
            if not want:
                self._process(bot)  # the requests read meanwhile
                if not bot.closed:
                    self._watch(bot)

    def _close_bot(self, bot: _Bot) -> None:
        if bot.closed:
            return
        bot.closed = True
        self._bots.discard(bot)
        if self._sel is not None and bot.state is not None:
            self._forget(bot.sock)
        try:
            bot.sock.close()
        except OSError:
            pass

    # -- the exchange's side ----------------------------------------------------------------
    def _forward(self, bot: _Bot, fwd: Forward) -> None:
        idle = self._idle.get(fwd.upstream.name)
        if idle:
            self._send_up(idle.pop(), bot, fwd)
            return
        self._work(bot, fwd.upstream.connect, lambda sock, error: self._connected(bot, fwd, sock, error))

    def _connected(self, bot: _Bot, fwd: Forward, sock: socket.socket | None, error: BaseException | None) -> None:
        if error is not None or sock is None:
            self._finish(bot, fwd, fwd.upstream.failure(error or ConnectionError()))
            return
        if self._sel is None or self._stopping:
            sock.close()
            return
        sock.setblocking(False)
        up = _Up(sock, fwd.upstream)
        self._send_up(up, bot, fwd)

    def _send_up(self, up: _Up, bot: _Bot, fwd: Forward) -> None:
        up.bot, up.fwd = bot, fwd
        up.reader = AnswerReader(fwd.method)
        up.out = fwd.data
        up.deadline = self._deadline(fwd.upstream.read_timeout)
        self._busy_ups.add(up)
        self._write_up(up)
        if not up.closed:
            self._interest(up, _IN | (_OUT if up.out else 0))

    def _interest(self, up: _Up, events: int) -> None:
        if events == up.events or self._sel is None:
            return
        fd = up.sock.fileno()
        if up.events:
            self._sel.modify(fd, events)
        else:
            self._sel.register(fd, events)
            self._objs[fd] = up
        up.events = events

    def _write_up(self, up: _Up) -> None:
        while up.out:
            try:
                n = up.sock.send(up.out)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return
            except _EXCEPTIONS as exc:
                self._up_failed(up, exc)
                return
            up.out = up.out[n:]

    def _up_event(self, up: _Up) -> None:
        if up.bot is None:
            self._idle_event(up)
            return
        if up.out:
            self._write_up(up)
            if up.closed:
                return
            if not up.out:
                self._interest(up, _IN)
        reader = up.reader
        assert reader is not None
        while True:
            try:
                data = up.sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return
            except ssl.SSLWantWriteError:
                self._interest(up, _IN | _OUT)
                return
            except _EXCEPTIONS as exc:
                self._up_failed(up, exc)
                return
            try:
                done = reader.feed(data)
            except _EXCEPTIONS as exc:
                self._up_failed(up, exc)
                return
            if done is not None:
                answer, reuse = done
                bot, fwd = up.bot, up.fwd
                self._release_up(up, reuse)
                assert bot is not None and fwd is not None
                self._finish(bot, fwd, answer)
                return
            if not up.tls:
                return  # level-triggered: the rest comes with the next event

    def _idle_event(self, up: _Up) -> None:
        """An idle pooled connection became readable: closed by the exchange, or bytes nobody asked for
        (a TLS session ticket is neither: nothing to read comes of it)."""
        try:
            up.sock.recv(65536)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except _EXCEPTIONS:
            pass  # closed with an error: closed all the same
        ups = self._idle.get(up.upstream.name, [])
        if up in ups:
            ups.remove(up)
        self._close_up(up)

    def _release_up(self, up: _Up, reuse: bool) -> None:
        self._busy_ups.discard(up)
        up.bot = up.fwd = up.reader = None
        idle = self._idle.setdefault(up.upstream.name, [])
        if reuse and len(idle) < POOL_SIZE and not self._stopping:
            self._interest(up, _IN)
            idle.append(up)
        else:
            self._close_up(up)

    def _up_failed(self, up: _Up, exc: BaseException) -> None:
        bot, fwd = up.bot, up.fwd
        self._close_up(up)
        if bot is not None and fwd is not None:
            self._finish(bot, fwd, fwd.upstream.failure(exc))

    def _close_up(self, up: _Up) -> None:
        if up.closed:
            return
        up.closed = True
        self._busy_ups.discard(up)
        up.bot = up.fwd = None
        if up.events and self._sel is not None:
            self._forget(up.sock)
            up.events = 0
        try:
            up.sock.close()
        except OSError:
            pass

    def _finish(self, bot: _Bot, fwd: Forward, result: Answer | UpstreamError) -> None:
        """The exchange's answer (or why there is none) -> the bot's answer."""
        if isinstance(result, UpstreamError) or fwd.quick(result):
            try:
                answer = fwd.done(result)
            except Exception:
                self._internal_error(bot)
                return
            self._answer(bot, answer, False)
            return
        self._work(bot, lambda: (fwd.done(result), False), partial(self._served, bot))
