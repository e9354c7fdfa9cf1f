"""The signing proxy: ``credbroker run --proxy -p P -- python bot.py``.

Binance client libraries take the secret in their constructor and sign
themselves; none of them can ask a signing agent. The proxy lets every one of
them work while the real key stays in the broker: the bot's client points at
the proxy's loopback URL and signs with a per-run proxy secret (of the same
kind as the real key); the proxy checks the request, re-signs it with the real
key and forwards it to the exchange (``server`` says how, step by step).

What the child gets (and nothing more of the key):

- ``CREDBROKER_PROXY_URL``: the base URL for its client (``http://127.0.0.1:PORT``);
- ``CREDBROKER_PROXY_WS_URL``: the WebSocket API endpoint (``ws://127.0.0.1:PORT``, then Binance's
  paths ``/ws-api/v3`` and ``/ws-fapi/v1``; ``broker.proxy.ws``), when ``credbroker[ws]`` is installed;
- the API key, in the variable the profile maps it to (it is not the secret);
- the proxy secret in every variable the profile maps the signing key to, and
  in ``CREDBROKER_PROXY_SECRET``; for an encrypted PEM key, a per-run
  passphrase in the passphrase's variable;
- ``CREDBROKER_KEY_KIND`` (hmac, ed25519 or rsa): the kind of the key the bot
  holds, so it hands it to the right constructor argument (the real key's
  kind, or hmac with ``[proxy] client_key = "hmac"``).

Only the bot's process tree may connect (``peer``). A transit profile's key
signs inside Vault with the broker's own token, which the bot never sees.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .. import childenv
from ..errors import BrokerError, ConfigError
from ..events import Event, Recorder

URL_VAR = childenv.PROXY_URL
SECRET_VAR = childenv.PROXY_SECRET
KIND_VAR = childenv.KEY_KIND
#: The WebSocket API endpoint's base URL (``ws://127.0.0.1:PORT``), with ``credbroker[ws]`` installed.
WS_URL_VAR = childenv.PROXY_WS_URL

if TYPE_CHECKING:  # pragma: no cover
    from ..vault.settings import VaultSettings

__all__ = ["KIND_VAR", "ProxyRun", "SECRET_VAR", "URL_VAR", "WS_URL_VAR", "check_profile", "start_for_run"]


def check_profile(profile: Any) -> None:
    """Validate what ``--proxy`` needs of a profile before any secret is fetched (one-line ConfigError)."""
    from ..signing.settings import SignerSettings
    from ..signing_policy import SigningPolicy
    from .settings import ProxySettings

    SignerSettings.for_profile(profile)
    ProxySettings.for_profile(profile)
    SigningPolicy.for_profile(profile)
    _ws_urls(profile)


class ProxyRun:
    """A started proxy for one run: ``child_env`` and ``child_profile`` for the child, ``stop()`` at the end."""

    def __init__(self, server: Any, child_env: dict[str, str], child_profile: Any,
                 record: Recorder, ws: Any = None, follower: Any = None) -> None:
        self.server = server
        self.ws = ws
        self.child_env = child_env
        self.child_profile = child_profile
        self._record = record
        self._follower = follower

    @property
    def url(self) -> str:
        return str(self.server.url)

    def stop(self) -> None:
        """Stop the proxy, record its totals, forget both keys. Idempotent."""
        server, self.server = self.server, None
        if server is None:
            return
        if self._follower is not None:
            self._follower.stop()
        ws, self.ws = self.ws, None
        if ws is not None:
            ws.stop()
        server.stop()
        self.child_env.clear()
        totals = {"ws_forwarded": ws.forwarded, "ws_refused": ws.refused} if ws is not None else {}
        try:
            self._record(Event.PROXY_STOPPED, {"profile": server.profile, "forwarded": server.forwarded,
                                               "refused": server.refused, **totals})
        except BrokerError:
            pass  # the run's own exit matters more than this total


def start_for_run(profile: Any, creds: Mapping[str, Any], *, record: Recorder,
                  audit_log: Any = None, vault_settings: VaultSettings | None = None, root_pid: int | None = None,
                  allow_root: bool = False) -> ProxyRun:
    """Start the proxy for ``credbroker run --proxy``; what the child gets and how to stop it.

    ``creds`` are the fetched fields; the proxy builds its own signer from them
    (HMAC keys and PEM key objects are copies), so the runner may wipe ``creds``
    after the spawn as usual. Only processes below ``root_pid`` (default: this
    process, whose only child is the bot) may connect. ``vault_settings`` are the
    run's Vault settings (resolved once by the run; from the process environment
    when a caller gives none): a transit profile's signer uses them (the broker's
    own token: it never reaches the child, which gets an Ed25519 stand-in), and
    so does the follower of a rotated key.
    """
    from ..agent.server import RecorderSink
    from ..signing import make_signer
    from ..signing.settings import SignerSettings
    from ..signing_policy import SigningPolicy
    from .clientkey import ClientKey
    from .server import SigningProxy
    from .settings import ProxySettings
    from ..errors import UpstreamError
    from .upstream import make_upstreams

    check_profile(profile)
    settings = SignerSettings.for_profile(profile)
    proxy_settings = ProxySettings.for_profile(profile)
    policy = SigningPolicy.for_profile(profile)
    client: Any = None
    from_vault = getattr(getattr(creds, "origin", None), "source", None) == "vault"
    if vault_settings is None and (settings.type == "transit" or from_vault):
        from ..vault.settings import VaultSettings

        vault_settings = VaultSettings.from_env(os.environ)  # a caller without settings of its own
    if settings.type == "transit":
        from ..sources.vault import client_for

        assert vault_settings is not None
        client = client_for(vault_settings)

    def make(fields: Mapping[str, Any]) -> Any:  # the real key's signer: at start, and after a rotation
        return make_signer(settings, dict(fields.items()), profile=profile.name, where=profile.where("signer"),
                           record_failures=False, vault_client=client, vault_settings=vault_settings)

    signer = make(creds)
    key_field = settings.key_field or next((f for f in ("private_key", "api_secret") if f in creds), None)
    # A transit key is Ed25519 inside Vault: the bot's stand-in is an Ed25519 key (or HMAC, if asked).
    same = "ed25519" if signer.kind == "transit" else signer.kind
    client_kind = same if proxy_settings.client_key == "same" else proxy_settings.client_key
    # An encrypted stand-in only when the bot is given a passphrase variable to open it with.
    encrypted = client_kind != "hmac" and settings.passphrase_field in profile.env.values()
    client_key = ClientKey(client_kind, encrypted=encrypted)
    upstreams = make_upstreams(proxy_settings)
    sink = audit_log if audit_log is not None else RecorderSink(record)
    server = SigningProxy(signer, client_key, proxy_settings, upstreams, policy, sink, profile=profile.name,
                          root_pid=os.getpid() if root_pid is None else root_pid, allow_root=allow_root)
    for name in proxy_settings.plain_http():
        _say(f"WARNING: unsafe_plain_http_loopback: the {name} upstream {proxy_settings.base_url(name)} is plain "
             "HTTP (tests only)")
    offsets: dict[str, int | None] = {}
    for name, upstream in upstreams.items():
        try:
            offsets[name] = upstream.sync_clock()
        except UpstreamError as exc:
            offsets[name] = None
            _say(f"WARNING: {exc.message}; timestamps use this host's clock until the exchange answers -1021")
    url = server.start()
    ws = _ws_endpoint(profile, signer, client_key, policy, server, upstreams, proxy_settings)
    secret = client_key.secret.reveal_str()
    child_env = {URL_VAR: url, SECRET_VAR: secret, KIND_VAR: client_kind}
    if ws is not None:
        child_env[WS_URL_VAR] = ws.url
    replaced = {key_field} if key_field is not None else set()
    for var, field in profile.env.items():
        if key_field is not None and field == key_field:
            child_env[var] = secret
        elif field == settings.passphrase_field and client_key.passphrase is not None:
            child_env[var] = client_key.passphrase.reveal_str()
            replaced.add(field)
    # get_signer() in the child reads the full map; the proxy's values stand in for the key's.
    env_map = dict(profile.env)
    if key_field is None or key_field not in env_map.values():  # e.g. transit: no variable holds a key
        env_map[SECRET_VAR] = "api_secret" if client_kind == "hmac" else "private_key"
    child_env[childenv.ENV_MAP] = childenv.encode_env_map(env_map)
    child_profile = profile._replace(env={v: f for v, f in profile.env.items()
                                          if f not in replaced and f != settings.passphrase_field})
    record(Event.PROXY_STARTED, {"profile": profile.name, "url": url, "kind": signer.kind,
                                 "client_kind": client_kind,
                                 "upstreams": {n: u.base_url for n, u in upstreams.items()},
                                 "clock_offset_ms": offsets, "policy": policy.describe(),
                                 "ws_url": ws.url if ws is not None else None,
                                 "rate_limits": {n: lim.limits() for n, lim in server.limiters.items()}})
    follower = _follow_rotation(server, profile, creds, settings, proxy_settings, vault_settings, make, record)
    return ProxyRun(server, child_env, child_profile, record, ws, follower)


def _ws_endpoint(profile: Any, signer: Any, client_key: Any, policy: Any, server: Any, upstreams: Any,
                 proxy_settings: Any) -> Any:
    """The WebSocket API endpoint (``broker.proxy.ws``), started; None without ``credbroker[ws]``."""
    from . import ws

    urls = _ws_urls(profile)
    if urls is None:
        return None
    # Records go through the REST proxy's queue (one group commit for both); timestamps use its clocks;
    # request weight and order counts go into its limiters (Binance counts both APIs against the same limits).
    endpoint = ws.WsProxy(signer, client_key, policy, urls, profile=profile.name, record=server._record,
                          check_peer=server.check_peer, now_ms={n: u.now_ms for n, u in upstreams.items()},
                          ca_file=proxy_settings.ca_file, limiters=server.limiters)
    # A rotated key (follow.py swaps the REST proxy's signer) signs the WebSocket requests too.
    server.signer_followers.append(lambda new: setattr(endpoint, "signer", new))
    endpoint.start()
    return endpoint


def _ws_urls(profile: Any) -> dict[str, str] | None:
    """The profile's WebSocket API upstreams; None without ``credbroker[ws]`` (a ConfigError if it names them)."""
    from . import ws

    table = profile.sections.get("proxy") if profile.sections else None
    urls = ws.upstream_urls(table, profile.where("proxy"))
    if not ws.available():
        if table and ("ws_spot" in table or "ws_futures" in table):
            raise ConfigError(f"{profile.where('proxy')}: ws_spot/ws_futures are set but the WebSocket library "
                              "is not installed", "pip install 'credbroker[ws]'")
        return None
    return urls


def _follow_rotation(server: Any, profile: Any, creds: Any, settings: Any, proxy_settings: Any,
                     vault_settings: VaultSettings | None, make: Callable[[Any], Any],
                     record: Recorder) -> Any:
    """Start following the Vault profile's versions (``follow``); None where there is nothing to follow."""
    origin = getattr(creds, "origin", None)
    version = getattr(origin, "version", None)
    if (settings.type == "transit" or getattr(origin, "source", None) != "vault" or version is None
            or vault_settings is None):
        return None
    from .follow import KeyFollower

    follower = KeyFollower(server, profile, vault_settings, version,
                           proxy_settings.rotation_interval, make, record)
    follower.start()
    return follower


def _say(message: str) -> None:
    print(f"credbroker: {message}", file=sys.stderr, flush=True)
