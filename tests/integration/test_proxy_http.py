"""The proxy's own HTTP/1.1 on both sides: the lean keep-alive server and the upstream client.

Raw sockets on loopback, so each rule of the wire is seen as bytes.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from broker.proxy.upstream import Upstream, UpstreamError
from tests.helpers.fake_binance import FakeBinance
from tests.helpers.proxy import Harness, fake  # noqa: F401 - fake is a fixture


@pytest.fixture
def harness() -> Iterator[Harness]:
    fake = FakeBinance().start()
    h = Harness(fake)
    try:
        yield h
    finally:
        h.close()
        fake.stop()


def _connect(h: Harness) -> socket.socket:
    port = int(h.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    _PENDING.pop(sock.fileno(), None)  # what an earlier socket with this fd number left unread is not ours
    return sock


def _answer(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """(status line, headers lower-cased, body) of the next answer (bytes past it stay for the next call)."""
    buf = _PENDING.pop(sock.fileno(), b"")
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"closed before an answer: {buf!r}"
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        rest += sock.recv(65536)
    _PENDING[sock.fileno()] = rest[length:]
    return lines[0], headers, rest[:length]


_PENDING: dict[int, bytes] = {}


def test_one_kept_alive_connection_serves_many_requests_and_close_is_honoured(harness: Harness) -> None:
    with _connect(harness) as sock:
        for _ in range(3):
            sock.sendall(b"GET /fapi/v1/time HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = _answer(sock)
            assert status == "HTTP/1.1 200 OK" and b"serverTime" in body and "connection" not in headers
        # Two requests in one write (pipelined): two answers, in order.
        sock.sendall(b"GET /fapi/v1/time HTTP/1.1\r\n\r\nGET /api/v3/time HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert _answer(sock)[0] == "HTTP/1.1 200 OK"
        status, headers, _ = _answer(sock)
        assert status == "HTTP/1.1 200 OK" and headers["connection"] == "close"
        assert sock.recv(1) == b""  # closed by the proxy


def test_http_1_0_closes_after_one_answer(harness: Harness) -> None:
    with _connect(harness) as sock:
        sock.sendall(b"GET /fapi/v1/time HTTP/1.0\r\n\r\n")
        status, headers, _ = _answer(sock)
        assert status == "HTTP/1.1 200 OK" and headers["connection"] == "close"
        assert sock.recv(1) == b""


@pytest.mark.parametrize("raw, status", [
    (b"GET /fapi/v1/time HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "411"),
    (b"GET /fapi/v1/time\r\n\r\n", "400"),
    (b"GET /fapi/v1/time HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", "400"),
    (b"GET /fapi/v1/time HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "400"),
    (b"GET /fapi/v1/time HTTP/1.1\r\n bad: folded\r\n\r\n", "400"),
    (b"GET /fapi/v1/time HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", "431"),
    # Content-Length in digits that are not ASCII ('\xb2' is a digit to str.isdigit, not to int), or
    # more digits than int() reads: a 400, not a connection dropped without a word.
    (b"POST /fapi/v1/order HTTP/1.1\r\nContent-Length: \xb2\r\n\r\nab", "400"),
    (b"POST /fapi/v1/order HTTP/1.1\r\nContent-Length: " + b"0" * 5000 + b"1\r\n\r\nx", "400"),
    # A bare LF, a bare CR or a control character anywhere in the head: servers disagree on where such
    # a line ends, so it could reach the exchange as another request than the one checked here.
    (b"GET /fapi/v1/time HTTP/1.1\r\nUser-Agent: a\nX-Injected: b\r\n\r\n", "400"),
    (b"GET /fapi/v1/time HTTP/1.1\r\nUser-Agent: a\rb\r\n\r\n", "400"),
    (b"GET /fapi/v1/time HTTP/1.1\r\nUser-Agent: a\x00b\r\n\r\n", "400"),
    (b"GET /fapi/v1/time?a=1\nGET /sapi/v1/capital/withdraw/apply HTTP/1.1\r\n\r\n", "400"),
    (b"GET /fapi/v1/time?a=\xe9 HTTP/1.1\r\n\r\n", "400"),
    (b"GET /fapi/v1/time?a=\t HTTP/1.1\r\n\r\n", "400"),
])
def test_malformed_requests_get_an_error_and_the_connection_closes(harness: Harness, raw: bytes,
                                                                    status: str) -> None:
    with _connect(harness) as sock:
        sock.sendall(raw)
        line, headers, body = _answer(sock)
        assert line.split(" ")[1] == status and headers["connection"] == "close"
        assert b"credbroker proxy" in body
    assert harness.proxy.forwarded == 0


def test_expect_100_continue_gets_an_interim_answer(harness: Harness) -> None:
    client = harness.client()
    body = client.sign_params({"symbol": "BTCUSDT", "side": "BUY", "type": "MARKET", "quantity": "1"}).encode()
    with _connect(harness) as sock:
        sock.sendall(b"POST /fapi/v1/order HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"X-MBX-APIKEY: " + client.api_key.encode() + b"\r\nExpect: 100-continue\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        assert sock.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        status, _, answer = _answer(sock)
        assert status == "HTTP/1.1 200 OK", answer


class _RawExchange:
    """A loopback server that answers each request with the next canned bytes, then maybe closes."""

    def __init__(self, answers: list[bytes], close_after: bool = False) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.answers = answers
        self.close_after = close_after
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while self.answers:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                while self.answers:
                    buf = b""
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(65536)
                        if not data:
                            break
                        buf += data
                    if not buf:
                        break
                    conn.sendall(self.answers.pop(0))
                    if self.close_after:
                        break

    def close(self) -> None:
        self.sock.close()


def test_the_upstream_client_reads_chunked_answers_and_keeps_the_connection() -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-MBX-USED-WEIGHT-1M: 7\r\n\r\n"
               b"4\r\n{\"a\"\r\n3;ext=1\r\n:1}\r\n0\r\nTrailer: x\r\n\r\n")
    plain = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}"
    ex = _RawExchange([b"HTTP/1.1 100 Continue\r\n\r\n" + chunked, plain])
    up = Upstream("futures", ex.url, "/fapi/v1/time")
    try:
        a = up.request("GET", "/fapi/v2/balance", None, {})
        assert a.status == 200 and a.body == b'{"a":1}'
        assert ("X-MBX-USED-WEIGHT-1M", "7") in a.headers and not any(k.lower() == "transfer-encoding"
                                                                      for k, _ in a.headers)
        b = up.request("GET", "/x", None, {})
        assert b.status == 404 and b.body == b"{}"
        assert ex.connections == 1
    finally:
        up.close()
        ex.close()


def test_a_connection_the_exchange_closed_is_not_reused_and_nothing_is_sent_twice() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    ex = _RawExchange([ok, ok], close_after=True)
    up = Upstream("futures", ex.url, "/fapi/v1/time")
    try:
        assert up.request("POST", "/fapi/v1/order", b"a=1", {}).status == 200
        import time

        time.sleep(0.2)  # let the exchange's close arrive (no timing is asserted)
        assert up.request("POST", "/fapi/v1/order", b"a=1", {}).status == 200
        assert ex.connections == 2  # a fresh connection, not a retry on the dead one
    finally:
        up.close()
        ex.close()
    ex = _RawExchange([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"], close_after=True)
    up = Upstream("futures", ex.url, "/fapi/v1/time")
    try:
        with pytest.raises(UpstreamError, match="cannot reach the exchange"):
            up.request("GET", "/fapi/v2/balance", None, {})  # cut short: an error, no second attempt
        assert ex.connections == 1
    finally:
        up.close()
        ex.close()


@pytest.mark.parametrize("sent", [b"", b"GET /fapi/v1/time HTTP/1.1\r\nHost: x\r\n"])
def test_an_idle_connection_is_closed_after_the_idle_timeout(harness: Harness, monkeypatch: pytest.MonkeyPatch,
                                                             sent: bytes) -> None:
    """A bot that goes quiet, before a request or in the middle of its headers, has its connection closed
    by the event loop's deadline, and the proxy goes on."""
    import time

    from broker.proxy import loop

    monkeypatch.setattr(loop, "IDLE_TIMEOUT", 1.0)
    with _connect(harness) as sock:
        sock.sendall(sent)
        start = time.monotonic()
        assert sock.recv(1) == b""  # closed by the proxy, nothing answered
        assert 0.5 < time.monotonic() - start < 8
    with _connect(harness) as sock:  # the proxy still serves
        sock.sendall(b"GET /fapi/v1/time HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _answer(sock)[0] == "HTTP/1.1 200 OK"


# -- the event loop: every connection in one thread, none waiting for another ----------------------

def _echo_exchange(fake: FakeBinance, slow: threading.Event | None = None) -> None:
    """``/fapi/v1/echo?...`` answers its own query (``slow`` set: ``/fapi/v1/slow`` waits for it), saying
    each used a weight of 1 (so that the proxy's limiter, which believes the exchange, never refuses)."""
    answer = fake.answer

    def echo(method: str, target: str, headers: object, body: str) -> tuple[int, object, dict[str, str]]:
        path, _, query = target.partition("?")
        if path == "/fapi/v1/echo":
            return 200, {"query": query}, {"X-MBX-USED-WEIGHT-1M": "1"}
        if path == "/fapi/v1/slow" and slow is not None:
            assert slow.wait(20), "the test never let the slow answer go"
            return 200, {"slow": True}, {}
        return answer(method, target, headers, body)

    fake.answer = echo  # type: ignore[method-assign]


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def test_a_slow_answer_on_one_connection_does_not_hold_up_the_others(harness: Harness) -> None:
    """While the exchange sits on one bot connection's request, the others are answered: the loop waits for
    no single socket (a worker-less, one-request-at-a-time loop would hang here until the socket timeout)."""
    import json

    slow = threading.Event()
    _echo_exchange(harness.fake, slow)
    with _connect(harness) as waiting, _connect(harness) as other:
        waiting.sendall(_get("/fapi/v1/slow"))
        for n in range(5):
            other.sendall(_get(f"/fapi/v1/echo?n={n}"))
            status, _, body = _answer(other)
            assert status == "HTTP/1.1 200 OK" and json.loads(body) == {"query": f"n={n}"}
        assert not slow.is_set()  # all five came back while the slow one was still at the exchange
        slow.set()
        status, _, body = _answer(waiting)
        assert status == "HTTP/1.1 200 OK" and json.loads(body) == {"slow": True}


def test_many_connections_at_once_each_get_their_own_answers_in_order(fake: FakeBinance) -> None:
    """24 connections, 15 requests each, all at once, under the default weight limit (2,400 a minute;
    the exchange says 1 used): answers that come back out of order must not make the limiter count the
    360 requests of weight 10 as used and refuse the last ones (weight.py)."""
    import json

    harness = Harness(fake)
    _echo_exchange(harness.fake)
    errors: list[str] = []

    def bot(i: int) -> None:
        try:
            with _connect(harness) as sock:
                for n in range(15):
                    sock.sendall(_get(f"/fapi/v1/echo?bot={i}&n={n}"))
                    status, _, body = _answer(sock)
                    if status != "HTTP/1.1 200 OK" or json.loads(body) != {"query": f"bot={i}&n={n}"}:
                        errors.append(f"bot {i} request {n}: {status} {body!r}")
        except (OSError, AssertionError) as exc:
            errors.append(f"bot {i}: {exc!r}")

    threads = [threading.Thread(target=bot, args=(i,)) for i in range(24)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        harness.close()
    assert not errors, errors[:5]
    assert len([r for r in harness.fake.requests if r.path == "/fapi/v1/echo"]) == 24 * 15


def test_pipelined_requests_are_answered_in_the_order_sent(harness: Harness) -> None:
    import json

    _echo_exchange(harness.fake)
    with _connect(harness) as sock:
        sock.sendall(b"".join(_get(f"/fapi/v1/echo?n={n}") for n in range(4)) + _get("/nowhere"))
        for n in range(4):
            status, _, body = _answer(sock)
            assert status == "HTTP/1.1 200 OK" and json.loads(body) == {"query": f"n={n}"}
        assert _answer(sock)[0] == "HTTP/1.1 404 Not Found"  # refused by the proxy, still in its turn


def test_a_bot_that_leaves_mid_request_costs_the_others_nothing(harness: Harness) -> None:
    slow = threading.Event()
    _echo_exchange(harness.fake, slow)
    gone = _connect(harness)
    gone.sendall(_get("/fapi/v1/slow"))
    half = _connect(harness)
    half.sendall(b"GET /fapi/v1/echo?n=1 HTTP/1.1\r\nHo")
    gone.close()
    half.close()
    slow.set()  # the exchange's answer now goes to a connection that is gone
    with _connect(harness) as sock:
        sock.sendall(_get("/fapi/v1/echo?n=2"))
        assert _answer(sock)[0] == "HTTP/1.1 200 OK"


def _raw_harness(fake: FakeBinance, raw: _RawExchange) -> Harness:
    """A proxy whose futures exchange is ``raw`` (spot stays ``fake``, which signs nothing here)."""
    return Harness(fake, sync=False, table={"futures": raw.url})


def test_the_loop_reads_chunked_answers_and_does_not_reuse_a_connection_the_exchange_closed() -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4\r\n{\"a\"\r\n3;ext=1\r\n:1}\r\n0\r\n\r\n")
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    fake = FakeBinance().start()
    raw = _RawExchange([b"HTTP/1.1 100 Continue\r\n\r\n" + chunked, ok], close_after=True)
    h = _raw_harness(fake, raw)
    try:
        with _connect(h) as sock:
            sock.sendall(_get("/fapi/v1/time"))
            status, headers, body = _answer(sock)
            assert status == "HTTP/1.1 200 OK" and body == b'{"a":1}' and "transfer-encoding" not in headers
            import time

            time.sleep(0.2)  # let the exchange's close arrive (no timing is asserted)
            sock.sendall(_get("/fapi/v1/time"))
            status, _, body = _answer(sock)
            assert status == "HTTP/1.1 200 OK" and body == b"{}"
        assert raw.connections == 2  # a fresh connection for the second request, not the closed one
    finally:
        h.close()
        raw.close()
        fake.stop()


@pytest.mark.parametrize("answer", [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", b"garbage\r\n\r\n", b""])
def test_an_answer_cut_short_or_malformed_is_a_502_and_nothing_is_sent_twice(answer: bytes) -> None:
    fake = FakeBinance().start()
    raw = _RawExchange([answer], close_after=True)
    h = _raw_harness(fake, raw)
    try:
        with _connect(h) as sock:
            sock.sendall(_get("/fapi/v1/time"))
            status, _, body = _answer(sock)
            assert status == "HTTP/1.1 502 Bad Gateway" and b"cannot reach the exchange" in body
        assert raw.connections == 1
        assert h.events("proxy_answer")[-1]["status"] == 502
    finally:
        h.close()
        raw.close()
        fake.stop()


def test_an_exchange_that_never_answers_fails_that_request_at_the_read_timeout() -> None:
    fake = FakeBinance().start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts (the kernel does), never answers
    h = Harness(fake, sync=False, table={"futures": f"http://127.0.0.1:{silent.getsockname()[1]}"})
    try:
        h.proxy.upstreams["futures"]._read_timeout = 0.5
        with _connect(h) as sock:
            sock.sendall(_get("/fapi/v1/time"))
            status, _, body = _answer(sock)
            assert status == "HTTP/1.1 502 Bad Gateway" and b"TimeoutError" in body
            sock.sendall(_get("/api/v3/time"))  # spot, the fake: the loop goes on
            assert _answer(sock)[0] == "HTTP/1.1 200 OK"
    finally:
        h.close()
        silent.close()
        fake.stop()


def test_new_connections_past_the_peer_check_bound_wait_in_the_backlog(harness: Harness,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of new connections is checked at most MAX_CHECKING at a time (the rest wait in the kernel's
    listen backlog, not in the proxy's memory), and every one is served in the end."""
    import time

    from broker.proxy import loop

    monkeypatch.setattr(loop, "MAX_CHECKING", 2)
    check = harness.proxy.check_peer
    lock = threading.Lock()
    running = [0, 0]  # now, most at once

    def slow_check(client: tuple[str, int], server: tuple[str, int]) -> tuple[int | None, str | None]:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        time.sleep(0.1)
        try:
            return check(client, server)
        finally:
            with lock:
                running[0] -= 1

    harness.proxy._httpd._accept_fn = slow_check  # type: ignore[union-attr]
    socks = [_connect(harness) for _ in range(8)]
    try:
        for sock in socks:
            sock.sendall(_get("/fapi/v1/time"))
        for sock in socks:
            assert _answer(sock)[0] == "HTTP/1.1 200 OK"
    finally:
        for sock in socks:
            sock.close()
    assert running[1] == 2


def test_a_bot_that_sends_without_reading_is_pushed_back_not_buffered(harness: Harness) -> None:
    """Requests read ahead are bounded (about a megabyte) and no answer is made while earlier ones wait to be
    sent: a client that writes and never reads fills the kernel's buffers and blocks, as on any server,
    instead of growing the proxy's memory."""
    _echo_exchange(harness.fake)
    request = _get("/fapi/v1/echo?n=1")
    with _connect(harness) as sock:
        sock.settimeout(2)
        sent = 0
        with pytest.raises(TimeoutError):
            for _ in range(2_000_000):  # 80 MB, far past what the kernel buffers on loopback
                sock.sendall(request)
                sent += 1
        forwarded = len([r for r in harness.fake.requests if r.path == "/fapi/v1/echo"])
        assert forwarded < sent
        sock.settimeout(10)
        assert _answer(sock)[0] == "HTTP/1.1 200 OK"  # and the connection still works


def test_a_refused_connection_is_kept_only_for_its_403(fake: FakeBinance, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process outside the bot's tree gets its one answer (403) and is closed; one that sends nothing is
    closed after REFUSED_TIMEOUT, not kept for the bot's idle timeout (a flood of silent outsiders would
    hold file descriptors for ten minutes)."""
    import time

    from broker.proxy import loop

    monkeypatch.setattr(loop, "REFUSED_TIMEOUT", 0.5)
    h = Harness(fake, allow_root=False)  # this test process is the broker's place: refused
    try:
        with _connect(h) as sock:
            sock.sendall(_get("/fapi/v1/time"))
            status, headers, _ = _answer(sock)
            assert status == "HTTP/1.1 403 Forbidden" and headers.get("connection") == "close"
            assert sock.recv(1) == b""
        with _connect(h) as silent:
            start = time.monotonic()
            assert silent.recv(1) == b""  # closed by the proxy, nothing answered
            assert time.monotonic() - start < 8
    finally:
        h.close()


def test_accept_failing_for_want_of_file_descriptors_pauses_instead_of_spinning(harness: Harness) -> None:
    import errno
    import time

    httpd = harness.proxy._httpd
    assert httpd is not None

    class Flaky:
        """The listener, whose accept() fails with EMFILE for 0.3 s from its first call."""

        def __init__(self, real: socket.socket) -> None:
            self.real, self.until, self.calls, self.failures = real, 0.0, 0, 0

        def accept(self) -> tuple[socket.socket, object]:
            self.calls += 1
            now = time.monotonic()
            if not self.until:
                self.until = now + 0.3
            if now < self.until:
                self.failures += 1
                raise OSError(errno.EMFILE, "Too many open files")
            return self.real.accept()

        def fileno(self) -> int:
            return self.real.fileno()

        def close(self) -> None:
            self.real.close()

    flaky = Flaky(httpd._listener)  # type: ignore[arg-type]
    httpd._listener = flaky  # type: ignore[assignment]
    with _connect(harness) as sock:
        sock.sendall(_get("/fapi/v1/time"))
        assert _answer(sock)[0] == "HTTP/1.1 200 OK"  # accepted once the failures passed
    assert 1 <= flaky.failures < 20  # a try every 0.1 s while it failed, not a busy loop


def test_a_flood_of_refused_connections_writes_one_record_per_reason_per_window(fake: FakeBinance) -> None:
    """Refused connections are counted, as the agent counts them: 30 of them are one proxy_refused record with
    count 30 (a record each would let any local process fill the audit log)."""
    h = Harness(fake, allow_root=False)  # this test process is the broker's place: refused
    try:
        for _ in range(30):
            with _connect(h) as sock:
                sock.sendall(_get("/fapi/v1/time"))
                assert _answer(sock)[0] == "HTTP/1.1 403 Forbidden"
        refused = [r for r in h.events("proxy_refused") if r["rule"] == "peer"]
        assert len(refused) == 1 and refused[0]["count"] == 30, refused
        assert refused[0]["reason"].startswith("no process of the bot's tree") and refused[0]["pid"] is None
        assert h.proxy.refused == 30
    finally:
        h.close()
