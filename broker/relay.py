"""The audit relay: the child reports signature failures through the broker.

A keyed audit log can only be extended by whoever holds the chain key, and
that is the broker, never the bot. So ``credbroker run`` hands its child one
end of a pipe (``CREDBROKER_AUDIT_FD``); ``broker.signing`` inside the child
writes one JSON line per event to it, and a thread here records each one in
the broker's log with the broker's key.

What the child may send is narrow: only the events in ``RELAYED_EVENTS``,
as a flat JSON object of short scalar values (or short lists of them), at
most one 4 KiB line each (a pipe write of that size is atomic, so lines from
several threads never interleave). Anything else is dropped and counted,
never recorded. Every relayed record is stamped by the broker with what it
knows first-hand: ``profile`` (the profile it runs), ``host``, ``user`` and
``relayed_from`` (the pid it started), so a reviewer knows which bot said it
even when the bot's own report names no profile (``report_response`` as the
README shows it), and a bot cannot file its failure under another profile.
When the bot claimed a different profile, its claim is kept as
``claimed_profile``.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from . import childenv
from .events import Event, Recorder

RELAY_FD_VAR = childenv.AUDIT_FD
#: Signature failures, and the listenKey keeper's records (``broker.signing.listenkey``).
RELAYED_EVENTS = frozenset({Event.SIGNATURE_FAILURE, Event.LISTEN_KEY_CREATED, Event.LISTEN_KEY_KEPT_ALIVE,
                            Event.LISTEN_KEY_RECREATED, Event.LISTEN_KEY_FAILED})
MAX_LINE = 4096
_MAX_VALUE = 512
_MAX_FIELDS = 32


def _clean(fields: Any) -> dict[str, Any] | None:
    """The fields if they are a small flat JSON object of scalars; None otherwise."""
    if not isinstance(fields, dict) or len(fields) > _MAX_FIELDS:
        return None
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if not isinstance(key, str) or len(key) > 64:
            return None
        if isinstance(value, list):
            if len(value) > _MAX_FIELDS or not all(_scalar(v) for v in value):
                return None
        elif not _scalar(value):
            return None
        out[key] = value
    return out


def _scalar(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= _MAX_VALUE
    return value is None or isinstance(value, (bool, int, float))


class AuditRelay:
    """One pipe for the whole run (restarts included) and a thread that records what arrives."""

    def __init__(self, record: Recorder, *, profile: str | None = None,
                 host: str | None = None, user: str | None = None, profiles: tuple[str, ...] = ()) -> None:
        self._record = record
        self.profile = profile
        #: A run of several profiles: a report naming one of them keeps it (each signer names its own).
        self.profiles = profiles
        self.host = host
        self.user = user
        self._read_fd, self._write_fd = os.pipe()
        self.child_pid: int | None = None
        self.dropped = 0
        self._thread = threading.Thread(target=self._pump, name="credbroker-audit-relay", daemon=True)
        self._thread.start()

    @property
    def child_fd(self) -> int:
        """The descriptor the child inherits."""
        return self._write_fd

    @property
    def child_fds(self) -> tuple[int, ...]:
        """For ``spawn(pass_fds=...)``: empty once closed."""
        return (self._write_fd,) if self._write_fd >= 0 else ()

    def child_env(self) -> dict[str, str]:
        """What to add to the child's environment."""
        return {RELAY_FD_VAR: str(self._write_fd)}

    def _pump(self) -> None:
        buf = b""
        with os.fdopen(self._read_fd, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    self._handle(line)
                if len(buf) > MAX_LINE:  # a line too long to be ours: drop it whole
                    self.dropped += 1
                    buf = b""

    def _handle(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            message = json.loads(line) if len(line) <= MAX_LINE else None
        except ValueError:
            message = None
        event = message.get("event") if isinstance(message, dict) else None
        fields = _clean(message.get("fields")) if isinstance(message, dict) else None
        if event not in RELAYED_EVENTS or fields is None:
            self.dropped += 1
            return
        self._stamp(fields)
        try:
            self._record(str(event), fields)
        except Exception:  # noqa: BLE001 - a relay failure must not kill the broker's supervision
            self.dropped += 1

    def _stamp(self, fields: dict[str, Any]) -> None:
        """Overwrite what the bot says about itself with what the broker knows."""
        claimed = fields.get("profile")
        fields.pop("claimed_profile", None)  # only the broker writes this one
        if claimed is not None and claimed in self.profiles:
            pass  # one of the run's profiles: the bot's signer for it reported
        elif self.profile is not None:
            if claimed not in (None, self.profile):
                fields["claimed_profile"] = claimed
            fields["profile"] = self.profile
        for key, value in (("host", self.host), ("user", self.user)):
            if value is not None:
                fields[key] = value
        fields["relayed_from"] = self.child_pid

    def close(self, timeout: float = 2.0) -> None:
        """Close the broker's copy of the write end and wait for the child's last lines."""
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
        self._thread.join(timeout)
