"""An in-memory audit sink for the agent and policy tests."""

from __future__ import annotations

from typing import Any


class FakeLog:
    """An AuditSink that remembers what was committed, and can be made to fail."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, dict[str, Any]]] = []
        self.committed: list[tuple[str, dict[str, Any]]] = []
        self.flushes = 0
        self.fail = False

    def record(self, event: str, fields: Any, *, durable: bool = True) -> None:
        self.pending.append((event, dict(fields)))
        if durable:
            self.flush()

    def flush(self) -> None:
        from broker.errors import AuditError

        if self.fail:
            self.pending.clear()
            raise AuditError("cannot write the audit log /x: No space left on device", "free some space")
        self.flushes += 1
        self.committed += self.pending
        self.pending = []
