"""The hvac client every Vault call in credbroker goes through, and the mapping of its failures.

- ``new_client(settings, token)``: an hvac client on a ``transport.VaultHTTPSession`` (the named CA
  as the only trust anchor, mutual TLS, the TLS server name, redirects only inside the configured
  cluster, a total deadline per request). Nothing else in credbroker builds an hvac client or a
  requests session for Vault. Logging it in (the token, an AppRole login) is ``broker.vault.token``'s.
- ``mapped(...)``: turns hvac's and requests' exceptions, by their real types, into credbroker's
  ``VaultError``s with a remedy that names where the setting came from.
- ``server_text(...)``: the one function that makes text from the server printable: bounded, one
  line, and scrubbed of the token, the AppRole ids and any secret value in hand. ``mapped`` applies
  it to every message it builds and to the hvac exception it chains (shown by ``--debug``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..errors import (
    VaultAuthError,
    VaultBadResponse,
    VaultError,
    VaultNotFound,
    VaultPermissionDenied,
    VaultSealed,
    VaultUnreachable,
)
from ..secret import Secret
from .settings import VaultSettings

if TYPE_CHECKING:  # pragma: no cover
    import hvac

MAX_SERVER_TEXT = 200
_MASK = "[redacted]"
_GRAM = 8  # a secret's fragments this long or longer are scrubbed too (a server may echo part of it)
_SCAN = 65536  # server text beyond this is never looked at

Secretish = Secret | str | bytes | bytearray | None


# -- server text -------------------------------------------------------------------------------
def _texts(secrets: Iterable[Secretish]) -> list[str]:
    out: list[str] = []
    for item in secrets:
        if item is None:
            continue
        if isinstance(item, Secret):
            if item.wiped:
                continue
            raw: bytes | bytearray | str = item.reveal()
        else:
            raw = item
        text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else raw
        text = text.strip()
        if text:
            out.append(text)
    return out


def server_text(text: object, secrets: Iterable[Secretish] = (), *, limit: int = MAX_SERVER_TEXT) -> str:
    """``text`` from the server as one bounded line without any of ``secrets`` (or a long piece of one)."""
    raw = str(text)
    wanted = _texts(secrets)
    if len(raw) > _SCAN:  # a huge body costs no more than this; a secret cut at the edge goes with the edge
        raw = raw[:_SCAN - max((len(w) for w in wanted), default=0)] + " ..."
    line = " ".join("".join(ch if ch.isprintable() else " " for ch in raw).split())
    if wanted:
        hit = [False] * len(line)
        for secret in wanted:
            size = min(len(secret), _GRAM)
            grams = {secret[i:i + size] for i in range(len(secret) - size + 1)}
            for i in range(len(line) - size + 1):
                if line[i:i + size] in grams:
                    hit[i:i + size] = [True] * size
        if any(hit):
            parts: list[str] = []
            i = 0
            while i < len(line):
                if hit[i]:
                    while i < len(line) and hit[i]:
                        i += 1
                    parts.append(_MASK)
                else:
                    parts.append(line[i])
                    i += 1
            line = "".join(parts)
    return line if len(line) <= limit else line[:limit] + "..."


def in_hand(settings: VaultSettings | None, client: Any = None, extra: Iterable[Secretish] = ()) -> list[Secretish]:
    """Every credential and secret the caller holds while talking to Vault: what server text must not echo."""
    held: list[Secretish] = list(extra)
    if settings is not None:
        held += [settings.token, settings.role_id, settings.secret_id]
    token = getattr(client, "token", None) if client is not None else None
    if isinstance(token, str):
        held.append(token)
    return held


def _describe(exc: BaseException, secrets: list[Secretish]) -> str:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, (list, tuple)) and errors:
        return server_text("; ".join(str(e) for e in errors), secrets)
    return type(exc).__name__


def _scrub_chained(exc: BaseException, secrets: list[Secretish]) -> None:
    """Scrub the hvac exception we chain, so a ``--debug`` traceback cannot show an echoed credential."""
    import hvac.exceptions as hx

    if isinstance(exc, hx.VaultError):
        errors = exc.errors if isinstance(exc.errors, (list, tuple)) else None
        exc.errors = [server_text(e, secrets) for e in errors] if errors else None
        exc.args = (server_text(exc.args[0] if exc.args else "", secrets),)
        exc.text = None
        exc.json = None
        exc.url = server_text(exc.url or "", secrets, limit=400)


# -- clients -------------------------------------------------------------------------------------
def warn_insecure(where: str, addr: str) -> None:
    """The warning every use of VAULT_SKIP_VERIFY prints (here, and for a fetch a daemon made)."""
    print(f"credbroker: WARNING: {where} is set: Vault's TLS certificate is NOT "
          f"checked, so anyone on the way to {addr} can pose as Vault and take the token and "
          "the secrets (unset it and set VAULT_CACERT to the server's CA)", file=sys.stderr, flush=True)


def new_client(settings: VaultSettings, token: str | None = None) -> hvac.Client:
    """An hvac client for ``settings`` (not logged in unless ``token`` is given). No request is made."""
    import hvac

    from .transport import TlsPolicy, VaultHTTPSession

    if settings.skip_verify and settings.addr.startswith("https://"):
        warn_insecure(settings.origin("skip_verify"), settings.addr)
    tls = TlsPolicy(cacert=settings.cacert, capath=settings.capath, client_cert=settings.client_cert,
                    client_key=settings.client_key, server_name=settings.tls_server_name,
                    skip_verify=settings.skip_verify,
                    where={k: settings.origin(k) for k in ("cacert", "capath", "client_cert")})
    session = VaultHTTPSession(tls, settings.allowed_origins(), settings.timeout, failover=settings.cluster())
    # verify/cert are the session's business (the adapter ignores them); explicit values also keep
    # hvac from reading VAULT_CACERT/VAULT_CLIENT_CERT from the process environment on its own.
    return hvac.Client(url=settings.addr, token=token, verify=True, cert=None, timeout=settings.timeout,
                       namespace=settings.namespace, session=session)


def close(client: Any) -> None:
    """Close the client's connections (safe on None)."""
    adapter = getattr(client, "adapter", None)
    if adapter is not None:
        adapter.close()


# -- the mapping ---------------------------------------------------------------------------------
def _timeout_hint(settings: VaultSettings) -> str:
    origin = settings.origin("timeout")
    if origin == "CREDBROKER_VAULT_TIMEOUT" and "timeout" not in settings.origins:
        return "CREDBROKER_VAULT_TIMEOUT or [vault] timeout"
    return origin


@contextmanager
def mapped(settings: VaultSettings, action: str, path: str, client: Any = None, *,
           token_valid: Callable[[], bool] | None = None, secrets: Iterable[Secretish] = ()) -> Iterator[None]:
    """Turn hvac/requests failures during ``action`` on ``path`` into VaultErrors with a remedy.

    ``client`` (when given) has its token scrubbed from server text; on a 403, ``token_valid`` (when
    given: ``broker.vault.token.token_check(client)``) tells a dead token from a policy that denies;
    ``secrets`` are further values the caller holds.
    """
    import hvac.exceptions as hx
    import requests.exceptions as rx

    from .transport import DeadlineExceeded, RedirectRefused

    addr = settings.addr
    where = settings.origin("addr")
    held = in_hand(settings, client, secrets)
    try:
        yield
    except VaultError:
        raise
    except RedirectRefused as exc:
        raise VaultBadResponse(
            f"Vault at {addr} redirected the request to {action} {path} to {exc.target_origin}, "
            "which is not a configured address; nothing was sent there",
            f"set {where} to the active node, or list that address in [vault] addrs (CREDBROKER_VAULT_ADDRS) "
            "if it belongs to your cluster",
        ) from exc
    except DeadlineExceeded as exc:
        raise VaultUnreachable(
            f"Vault at {addr} did not answer within {exc.seconds:g} s (the total deadline of one request) "
            f"while trying to {action} {path}",
            f"check that the server is up and not overloaded, or raise the deadline ({_timeout_hint(settings)})",
        ) from exc
    except rx.SSLError as exc:
        if settings.cacert or settings.capath:
            anchor = settings.origin("cacert" if settings.cacert else "capath")
            remedy = f"check that {anchor} is the CA that signed Vault's certificate, and {where}"
        else:
            remedy = f"set VAULT_CACERT to the server's CA certificate, or check {where}"
        if settings.tls_server_name:
            remedy += f"; the certificate must name {settings.tls_server_name} ({settings.origin('tls_server_name')})"
        raise VaultUnreachable(f"TLS error talking to Vault at {addr} (from {where})", remedy) from exc
    except (rx.ConnectTimeout, rx.ReadTimeout, rx.Timeout) as exc:
        raise VaultUnreachable(
            f"Vault at {addr} did not answer within {settings.timeout:g} s while trying to {action} {path}",
            f"check that the server is up and reachable, or raise {_timeout_hint(settings)}",
        ) from exc
    except rx.ConnectionError as exc:
        raise VaultUnreachable(
            f"cannot reach Vault at {addr} (connection failed) to {action} {path}",
            f"start the server or fix {where}",
        ) from exc
    except rx.RequestException as exc:
        raise VaultUnreachable(f"request to Vault at {addr} failed: {type(exc).__name__}", f"check {where}") from exc
    except hx.VaultDown as exc:
        raise VaultSealed(
            f"Vault at {addr} is sealed (or in standby and unavailable) while trying to {action} {path}",
            "unseal it: `vault operator unseal` (or `bao operator unseal`)",
        ) from exc
    except hx.VaultNotInitialized as exc:
        raise VaultSealed(f"Vault at {addr} is not initialized", "run `vault operator init`") from exc
    except hx.Unauthorized as exc:
        _scrub_chained(exc, held)
        raise VaultAuthError(
            f"Vault rejected the credentials while trying to {action} {path}: {_describe(exc, held)}",
            "run `vault login` or set VAULT_TOKEN",
        ) from exc
    except hx.Forbidden as exc:
        _scrub_chained(exc, held)
        # Vault answers 403 both for a bad token and for a policy that denies
        # this path; ask about the token itself to tell the two apart.
        if token_valid is not None and not token_valid():
            source = settings.token_source or "the token"
            raise VaultAuthError(
                f"Vault at {addr} rejected the token from {source} (invalid, expired or revoked)",
                "run `vault login`, or set VAULT_TOKEN to a valid token",
            ) from exc
        raise VaultPermissionDenied(
            f"permission denied: the token may not {action} {path}",
            f"grant it in the bot's policy; check with `vault token capabilities {path}`",
        ) from exc
    except hx.InvalidPath as exc:
        _scrub_chained(exc, held)
        raise VaultNotFound(
            f"nothing found at {path} on {addr} while trying to {action} it",
            "check the path with `vault kv get` (and that secret engine is mounted as KV v2)",
        ) from exc
    except hx.RateLimitExceeded as exc:
        _scrub_chained(exc, held)
        raise VaultUnreachable(f"Vault at {addr} is rate limiting requests", "retry later") from exc
    except hx.InvalidRequest as exc:
        _scrub_chained(exc, held)
        raise VaultBadResponse(
            f"Vault refused the request to {action} {path}: {_describe(exc, held)}", "check the path and settings"
        ) from exc
    except hx.VaultError as exc:
        _scrub_chained(exc, held)
        raise VaultBadResponse(
            f"Vault at {addr} failed to {action} {path}: {_describe(exc, held)}", "check the server's logs"
        ) from exc
    except ValueError as exc:  # bad JSON from something that is not Vault
        raise VaultBadResponse(
            f"the server at {addr} did not answer like Vault while trying to {action} {path}",
            f"check {where} points at Vault/OpenBao",
        ) from exc
