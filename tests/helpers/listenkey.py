"""A fake exchange with Binance's futures listenKey rules, shared by the listenKey keeper's tests and the
proxy's (not a test module)."""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import urlsplit

from broker.signing.listenkey import PATH
from tests.helpers.fake_binance import FakeBinance


class FuturesListenKeys(FakeBinance):
    """FakeBinance with Binance's futures listenKey rules: one active key per API key (POST returns it while
    it lives), PUT takes no parameter and answers -1125 once the key is gone (``expire``)."""

    def __init__(self) -> None:
        super().__init__()
        self.active: dict[str, str] = {}
        self.fail_next: list[tuple[int, Any]] = []

    def expire(self, api_key: str) -> None:
        with self._lock:
            self.active.pop(api_key, None)

    def answer(self, method: str, target: str, headers: Any, body: str) -> tuple[int, Any, dict[str, str]]:
        if urlsplit(target).path != PATH:
            return super().answer(method, target, headers, body)
        if self.fail_next:
            status, payload = self.fail_next.pop(0)
            return status, payload, {}
        api_key = headers.get("X-MBX-APIKEY")
        if api_key not in self.verifier.keys:
            return 401, {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}, {}
        with self._lock:
            current = self.active.get(api_key)
            if method == "POST":
                if current is None:
                    current = self.active[api_key] = secrets.token_urlsafe(48)
                return 200, {"listenKey": current}, {}
            if method == "PUT":
                if current is None:
                    return 400, {"code": -1125, "msg": "This listenKey does not exist."}, {}
                return 200, {"listenKey": current}, {}
            if method == "DELETE":
                self.active.pop(api_key, None)
                return 200, {}, {}
        return 405, {"code": -1000, "msg": "method"}, {}

    def calls(self) -> list[str]:
        return [r.method for r in self.requests if r.path == PATH]
