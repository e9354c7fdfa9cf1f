"""The requests machinery under every Vault call: trust anchor, redirect rule, total deadline.

Imported only when a Vault client is built (``broker.vault.session``): it pulls in requests and
urllib3. Three things requests does not do on its own:

* **The named CA is the only trust anchor.** The SSL context is built here, once, from
  ``VAULT_CACERT``/``VAULT_CAPATH`` (or, when none is named, the bundle requests would use), and the
  adapter never lets requests add a CA path of its own: ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``
  cannot widen a pin, and hvac's habit of replacing ``verify=<cacert>`` with the session's default
  has nothing left to replace. The client certificate (mutual TLS) and the TLS server name (SNI and
  the name the certificate must carry) are part of the same context and pool key.
* **Redirects stay inside the configured cluster.** A redirect to any origin other than the
  configured address (or one listed in ``[vault] addrs``) is refused before anything is sent
  there, so neither a header (token, namespace) nor a body (an AppRole secret_id) follows it.
* **Every request has a total deadline.** requests' timeout bounds each socket read, so a server
  that drips a byte at a time never times out. A timer shuts the request's socket down when the
  deadline passes, whatever phase it is in (connect, TLS handshake, headers, body).
* **A cluster's other nodes are tried, within that deadline.** With ``[vault] addrs``, a request
  whose node does not answer (connection refused or reset), or answers that it cannot serve yet
  (503, 429, a standby still catching up, a redirect to an active node that is gone), goes to the
  next configured node, and around again after a short pause while any node answered at all, until
  the deadline. The node that served last is tried first next time. Only configured addresses are
  ever tried, so the redirect rule above still holds.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import requests
import requests.adapters
import requests.utils
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.ssl_ import create_urllib3_context

from ..errors import ConfigError
from .settings import origin_of


class RedirectRefused(requests.exceptions.RequestException):
    """Vault answered with a redirect to an origin the user did not configure."""

    def __init__(self, target_origin: str) -> None:
        super().__init__(f"redirect to {target_origin} refused")
        self.target_origin = target_origin


class DeadlineExceeded(requests.exceptions.Timeout):
    """The whole request (connect, TLS, headers, body, redirects) took longer than its deadline."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no complete answer within {seconds:g} s")
        self.seconds = seconds


class TlsPolicy(NamedTuple):
    """How to check the server and present ourselves; ``where`` names each setting's origin for errors."""

    cacert: str | None
    capath: str | None
    client_cert: str | None
    client_key: str | None
    server_name: str | None
    skip_verify: bool
    where: Mapping[str, str]


# -- trust ---------------------------------------------------------------------------------
def _default_bundle() -> str:
    """What requests trusts when no CA is named for Vault (its own environment variables, else certifi)."""
    return (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            or requests.utils.DEFAULT_CA_BUNDLE_PATH)


def _load(ctx: ssl.SSLContext, path: Path, setting: str, where: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(path))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or "not a PEM certificate"
        raise ConfigError(f"{where}: cannot load CA certificate {path}: {reason}",
                          f"point {setting} at the PEM file of the CA that signed Vault's certificate") from None


def build_context(tls: TlsPolicy) -> ssl.SSLContext:
    """The SSL context of every connection to Vault: the only place trust is decided."""
    ctx = create_urllib3_context()
    if tls.skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif tls.cacert:  # VAULT_CACERT wins over VAULT_CAPATH, as in the Vault CLI
        _load(ctx, Path(tls.cacert).expanduser(), "VAULT_CACERT", tls.where.get("cacert", "VAULT_CACERT"))
    elif tls.capath:
        where = tls.where.get("capath", "VAULT_CAPATH")
        folder = Path(tls.capath).expanduser()
        try:  # every file of the folder, as the Vault CLI reads it (no c_rehash'ed names needed)
            files = sorted(p for p in folder.iterdir() if p.is_file())
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read the folder {folder}: {exc.strerror}",
                              "point VAULT_CAPATH at a folder of PEM CA certificates") from None
        if not files:
            raise ConfigError(f"{where}: {folder} holds no CA certificate",
                              "put the PEM file of Vault's CA in it, or use VAULT_CACERT")
        for path in files:
            _load(ctx, path, "VAULT_CAPATH", where)
    else:
        _load(ctx, Path(_default_bundle()), "REQUESTS_CA_BUNDLE", "the default CA bundle")
    if tls.client_cert and tls.client_key:
        where = tls.where.get("client_cert", "VAULT_CLIENT_CERT")
        try:
            ctx.load_cert_chain(str(Path(tls.client_cert).expanduser()), str(Path(tls.client_key).expanduser()))
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or "unreadable"
            raise ConfigError(f"{where}: cannot load the client certificate and key: {reason}",
                              "set VAULT_CLIENT_CERT and VAULT_CLIENT_KEY to the PEM certificate and its key") from None
    return ctx


# -- total deadline ------------------------------------------------------------------------
class _Deadline:
    """Shuts down every socket of one request when ``seconds`` have passed (the watchdog calls ``fire``)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._done = False
        _WATCHDOG.add(time.monotonic() + seconds, self)

    def watch(self, sock: socket.socket) -> None:
        # A duplicate of the descriptor: shutting it down ends the connection whatever object (plain
        # or TLS, or none after http.client hands the socket to the response) holds it meanwhile.
        try:
            dup = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return
        with self._lock:
            if self._done:
                dup.close()
                return
            self._socks.append(dup)
            if self.expired:
                _shutdown(dup)

    def fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            for sock in self._socks:
                _shutdown(sock)

    def close(self) -> None:
        with self._lock:
            self._done = True
            for sock in self._socks:
                sock.close()
            self._socks.clear()
        _WATCHDOG.drop(self)


class _Watchdog:
    """One thread for every deadline of the process (a thread per request would cost more than a signature)."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked child has no thread and maybe a held lock

    def _reset(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._live: set[int] = set()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, at: float, deadline: _Deadline) -> None:
        with self._cv:
            heapq.heappush(self._heap, (at, next(self._seq), deadline))
            self._live.add(id(deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="credbroker-vault-deadline", daemon=True)
                self._thread.start()
            self._cv.notify()

    def drop(self, deadline: _Deadline) -> None:
        with self._cv:
            self._live.discard(id(deadline))
            # Finished deadlines are dropped from the front at once, so the heap holds only pending ones
            # (and finished ones behind a pending one, until it passes).
            while self._heap and id(self._heap[0][2]) not in self._live:
                heapq.heappop(self._heap)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap:
                    self._cv.wait()
                at, _seq, deadline = self._heap[0]
                wait = at - time.monotonic()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
                heapq.heappop(self._heap)
                due = id(deadline) in self._live
            if due:
                deadline.fire()


_WATCHDOG = _Watchdog()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by its owner


_current = threading.local()


def _watch(sock: socket.socket | None) -> None:
    deadline: _Deadline | None = getattr(_current, "deadline", None)
    if deadline is not None and sock is not None:
        deadline.watch(sock)


class _WatchedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch(self.sock)  # a connection reused from the pool: its socket was made for another request
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch(self.sock)
        super().request(*args, **kwargs)


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


# -- the adapter and the session -----------------------------------------------------------
class PinnedAdapter(requests.adapters.HTTPAdapter):
    """Every connection uses one SSL context and TLS server name; requests' CA choices are ignored."""

    def __init__(self, tls: TlsPolicy) -> None:
        self._tls = tls
        self._ctx: ssl.SSLContext | None = None  # built at the first https request: http pays nothing
        self._cert_reqs = "CERT_NONE" if tls.skip_verify else "CERT_REQUIRED"
        self._server_name = tls.server_name
        self._skip = tls.skip_verify
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> Any:  # (host params, pool kwargs); the stubs' TypedDicts do not list the keys set here
        host_params: dict[str, Any]
        host_params, _ignored = super().build_connection_pool_key_attributes(request, True, None)  # type: ignore[assignment]
        if host_params.get("scheme") != "https":
            return host_params, {}
        if self._ctx is None:
            self._ctx = build_context(self._tls)
        pool_kwargs: dict[str, Any] = {"ssl_context": self._ctx, "cert_reqs": self._cert_reqs}
        if self._skip:
            pool_kwargs["assert_hostname"] = False
        elif self._server_name:
            pool_kwargs["server_hostname"] = self._server_name  # SNI
            pool_kwargs["assert_hostname"] = self._server_name  # and the name the certificate must carry
        return host_params, pool_kwargs

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # requests would put REQUESTS_CA_BUNDLE or certifi (and a cert path) on the pool, and urllib3
        # would load them into our context: the context already holds all the trust there is.
        conn.cert_reqs = self._cert_reqs
        conn.ca_certs = None
        conn.ca_cert_dir = None
        conn.cert_file = None
        conn.key_file = None


class VaultHTTPSession(requests.Session):
    """A requests Session with the pin, the redirect rule and the deadline (see the module docstring)."""

    def __init__(self, tls: TlsPolicy, allowed_origins: frozenset[str], deadline: float,
                 failover: tuple[str, ...] = ()) -> None:
        super().__init__()
        #: The cluster's nodes (origins) in the configured order; empty: one server, no failover.
        self.failover = failover if len(failover) > 1 else ()
        self._serving = failover[0] if failover else ""
        # No REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE and no ~/.netrc Authorization: only proxies are taken
        # from the environment (below), as the Vault CLI honours HTTPS_PROXY/NO_PROXY.
        self.trust_env = False
        self.allowed_origins = allowed_origins
        self.deadline = deadline
        adapter = PinnedAdapter(tls)
        self.mount("https://", adapter)
        self.mount("http://", adapter)

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> Any:
        merged: dict[str, Any] = dict(super().merge_environment_settings(url, proxies, stream, verify, cert))
        env_proxies = requests.utils.get_environ_proxies(str(url), no_proxy=None)
        merged["proxies"] = {**env_proxies, **(merged.get("proxies") or {})}
        return merged

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        target = super().get_redirect_target(resp)
        if target is None:
            return None
        where = origin_of(requests.compat.urljoin(resp.url, target))
        if where not in self.allowed_origins:
            resp.close()
            raise RedirectRefused(where)
        return target

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        """One request, sent to the cluster's configured nodes in turn until one serves it (see the
        module docstring), all within one total deadline."""
        text = url.decode() if isinstance(url, bytes) else str(url)
        own = origin_of(text)
        if not self.failover or own not in self.failover:
            return self._request_once(method, text, *args, **kwargs)
        started = time.monotonic()
        path = text[len(own):]
        order = sorted(self.failover, key=lambda o: o != self._serving)
        while True:
            answered = False
            for i, origin in enumerate(order):
                last = i == len(order) - 1
                budget = self.deadline - (time.monotonic() - started)
                try:
                    response = self._request_once(method, origin + path, *args, budget=budget, **kwargs)
                except requests.exceptions.ConnectionError as exc:
                    if time.monotonic() - started > self.deadline or budget <= 0:
                        raise
                    failed_at = getattr(exc.request, "url", None)
                    if failed_at and origin_of(str(failed_at)) != origin:
                        answered = True  # it redirected us to an active node that is gone: an election
                    if last and not answered:
                        raise  # no node answers at all: fail now, not at the deadline
                    continue
                if _not_serving_yet(response) and time.monotonic() - started < self.deadline:
                    answered = True
                    response.close()
                    continue
                self._serving = origin
                return response
            time.sleep(0.2)  # an election is under way: give it a moment, then ask again

    def _request_once(self, method: str | bytes, url: str | bytes, *args: Any, budget: float | None = None,
                      **kwargs: Any) -> requests.Response:
        limit = self.deadline if budget is None else max(0.001, budget)
        deadline = _Deadline(limit)
        outer = getattr(_current, "deadline", None)
        _current.deadline = deadline
        started = time.monotonic()
        try:
            response = super().request(method, url, *args, **kwargs)
        except (requests.exceptions.RequestException, OSError) as exc:
            if deadline.expired and not isinstance(exc, RedirectRefused):
                raise DeadlineExceeded(self.deadline) from exc
            raise
        finally:
            deadline.close()
            _current.deadline = outer
        if deadline.expired or time.monotonic() - started > limit:
            response.close()  # what arrived may be cut short: never use it
            raise DeadlineExceeded(self.deadline)
        return response


def _not_serving_yet(response: requests.Response) -> bool:
    """A node that answered but cannot serve this request now: another node may (Vault's standby and
    performance-standby states, a rate limit, a standby still catching up after joining)."""
    if response.status_code in (429, 503):
        return True
    if response.status_code in (400, 500):
        head = (response.content or b"")[:4096]
        # A standby still replaying after it joined; a standby during an election (no active node yet).
        return b"Waiting for the primary" in head or b"active cluster node not found" in head
    return False
