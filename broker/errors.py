"""One exception tree for credbroker.

Every error carries a one-line ``message`` (what failed) and a ``remedy``
(how to fix it). The CLI prints ``credbroker: <message> (<remedy>)`` and exits
with ``exit_code``; a traceback only appears with ``--debug``. Messages never
contain secret values: they name profiles, paths, fields and variables.

Every error class credbroker raises lives here, so that one pair of functions
serialises an error (``BrokerError.to_dict``, for ``--json``, audit records, the
daemon's and the signing agent's sockets) and rebuilds it on the other side
(``from_dict``), of the same class with the same fields.
"""

from __future__ import annotations

from typing import Any


class BrokerError(Exception):
    """Base class of every error credbroker raises on purpose."""

    #: Exit status like ``env``/``timeout``: 125 = credbroker failed before the child ran.
    exit_code: int = 125

    def __init__(self, message: str, remedy: str | None = None) -> None:
        # Keep it one line whatever a lower layer handed us.
        self.message = " ".join(str(message).split())
        self.remedy = " ".join(remedy.split()) if remedy else None
        super().__init__(self.message)

    def __str__(self) -> str:
        if self.remedy:
            return f"{self.message}; fix: {self.remedy}"
        return self.message

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly form for ``--json`` output, audit records and the wire (``from_dict``)."""
        out: dict[str, object] = {
            "error": type(self).__name__,
            "message": self.message,
            "remedy": self.remedy,
            "exit_code": self.exit_code,
        }
        for attr in _EXTRA_FIELDS:
            if getattr(self, attr, None):
                out[attr] = getattr(self, attr)
        return out

    def to_wire(self) -> dict[str, object]:
        """``to_dict`` for a socket: also under ``type``, the key the signing agent's protocol 1 reads."""
        return {**self.to_dict(), "type": type(self).__name__}

    @classmethod
    def _rebuild(cls, message: str, remedy: str | None, data: dict[str, Any]) -> BrokerError:
        return cls(message, remedy)


#: Optional fields an error carries across a process boundary (``to_dict`` / ``from_dict``).
_EXTRA_FIELDS = ("request_id", "secret_path", "rule")


def error_class(name: object) -> type[BrokerError] | None:
    """The error class of this module named ``name``, or None."""
    cls = globals().get(name) if isinstance(name, str) else None
    return cls if isinstance(cls, type) and issubclass(cls, BrokerError) else None


def from_dict(data: object, default: type[BrokerError] | None = None) -> BrokerError:
    """The error ``BrokerError.to_dict`` (or ``to_wire``) described, of the same class with the same fields.

    An unknown class name gives ``default`` (``BrokerError`` unless said); ``data`` that is not such a
    description gives a ``BrokerError`` saying so."""
    if not isinstance(data, dict) or not isinstance(data.get("message"), str):
        return BrokerError("a credbroker helper process answered with an invalid error", "restart it")
    cls = error_class(data.get("error")) or error_class(data.get("type")) or default or BrokerError
    remedy = data.get("remedy")
    err = cls._rebuild(data["message"], remedy if isinstance(remedy, str) else None, data)
    if isinstance(err, VaultError):
        rid, path = data.get("request_id"), data.get("secret_path")
        err.request_id = rid if isinstance(rid, str) else None
        err.secret_path = path if isinstance(path, str) else None
    return err


class ConfigError(BrokerError):
    """The configuration file or the command-line options are invalid."""


class SourceError(BrokerError):
    """A secret source could not deliver what a profile names."""


class VaultError(SourceError):
    """Vault/OpenBao failed; subclasses say how."""

    #: Set when Vault had answered the read before credbroker refused what it got (a field missing,
    #: a value it cannot use): the read is in Vault's audit log under this id, at this path.
    request_id: str | None = None
    secret_path: str | None = None


class VaultUnreachable(VaultError):
    """No answer from the server (down, wrong address, TLS, timeout)."""


class VaultSealed(VaultError):
    """The server is sealed (HTTP 503)."""


class VaultAuthError(VaultError):
    """No usable token, or login failed (HTTP 401/403 on login)."""


class VaultPermissionDenied(VaultError):
    """The token's policies deny the request (HTTP 403)."""


class VaultNotFound(VaultError):
    """The path, version or field does not exist (HTTP 404 or missing key)."""


class VaultBadResponse(VaultError):
    """The server answered something we cannot use (bad JSON, wrong shape, redirect)."""


class KeyringError(SourceError):
    """The OS keyring failed; subclasses say how."""


class KeyringUnavailable(KeyringError):
    """No usable keyring backend (no Secret Service, no D-Bus session)."""


class KeyringLocked(KeyringError):
    """The keyring is locked and could not be unlocked."""


class KeyringNotFound(KeyringError):
    """The keyring holds no entry for a field the profile names."""


class RunError(BrokerError):
    """``credbroker run`` could not start or supervise the child."""


class NestedRunError(RunError):
    """``credbroker run`` was started inside a child of ``credbroker run``."""


class CommandNotFound(RunError):
    """The child's command does not exist on PATH (exit 127, as ``env``)."""

    exit_code = 127


class CommandNotExecutable(RunError):
    """The child's command exists but cannot be executed (exit 126, as ``env``)."""

    exit_code = 126


class AuditError(BrokerError):
    """The audit log cannot be written or read."""


class SigningError(BrokerError):
    """A request could not be signed."""


class PolicyRefused(SigningError):
    """The signing policy refused a request; ``rule`` names the rule (``symbols``, ``rate_limit``...)."""

    def __init__(self, rule: str, message: str, remedy: str | None = None) -> None:
        super().__init__(f"signing policy refused the request ({rule}): {message}",
                         remedy or f"change the bot, or the profile's [policy] {rule.split(':')[0]} "
                         "if this request is intended")
        self.rule = rule

    @classmethod
    def from_wire(cls, rule: str, message: str, remedy: str | None) -> PolicyRefused:
        """Rebuild the broker's refusal in the bot (the message already says it is the policy)."""
        exc = cls(rule, message, remedy)
        exc.message = " ".join(message.split())
        exc.args = (exc.message,)
        return exc

    @classmethod
    def _rebuild(cls, message: str, remedy: str | None, data: dict[str, Any]) -> BrokerError:
        rule = data.get("rule")
        return cls.from_wire(rule if isinstance(rule, str) and rule else "policy", message, remedy)


class ListenKeyError(BrokerError):
    """The listenKey could not be created or kept alive."""


class AgentRefused(BrokerError):
    """The signing agent refused a connection (not the bot's process tree)."""


class PreflightError(BrokerError):
    """The key preflight refused to start the bot, or could not complete."""


class ExchangeUnreachable(PreflightError):
    """The exchange could not be reached at all (DNS, connect): ``auto`` mode skips the check."""


class UpstreamError(BrokerError):
    """The exchange could not be reached (or answered something that is not HTTP)."""


class PlaintextFormatError(ConfigError):
    """The plaintext key file is not in the flat format credbroker reads."""


class ImportVerifyError(SourceError):
    """The copy read back from the store differs from the plaintext file."""


class ShredError(ConfigError):
    """The plaintext file could not be overwritten or removed."""
