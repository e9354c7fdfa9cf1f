"""listenKey upkeep in proxy mode: the proxy keeps alive the futures listenKey the bot created through it.

When the bot's client creates a USDⓈ-M futures listenKey through the proxy
(``POST /fapi/v1/listenKey`` answered 200), the proxy adopts that key
(``listen_key_created``, ``by: bot``) and a ``ListenKeyKeeper`` keeps it alive
(``PUT`` every 30 minutes, jittered) over the proxy's own connection pool,
whatever the client does itself (a second PUT is harmless, weight 1). When the
exchange answers -1125 the keeper creates a new one; Binance returns the
account's active listenKey to every ``POST``, so the bot gets that key when
its client asks again. When the bot closes its key (``DELETE``) the keeper
stops.

The bot reports a stream message that means its listenKey is gone
(``{"e": "error", "m": "Invalid listenKey"}``, ``{"e": "listenKeyExpired"}``)
with ``POST $CREDBROKER_PROXY_URL/credbroker/v1/streamEvent`` and the message
as the JSON body: recorded (``listen_key_failed``, source ``stream``), the key
recreated, and the answer ``{"listenKey": "<new key>"}`` (``{"listenKey":
null}`` for a message that is not trouble). Only the bot's process tree
reaches the proxy at all (the peer check comes first).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

from ..errors import BrokerError
from ..events import Recorder
from ..signing.listenkey import PATH, ListenKeyKeeper, report_stream_error
from ..errors import UpstreamError
from .upstream import Answer, Upstream

STREAM_EVENT_PATH = "/credbroker/v1/streamEvent"
_JSON = [("Content-Type", "application/json;charset=UTF-8")]


class ProxyListenKeys:
    """The proxy's one keeper (futures has one listenKey per API key), made on the bot's first create."""

    def __init__(self, api_key: str, profile: str, record: Recorder,
                 *, interval: float | None = None) -> None:
        self._api_key = api_key
        self._profile = profile
        self._record = record
        self._interval = interval
        self._lock = threading.Lock()
        self.keeper: ListenKeyKeeper | None = None

    def after_answer(self, method: str, path: str, answer: Answer, upstream: Upstream) -> None:
        """Watch the bot's listenKey calls: adopt a created key, stop on its DELETE."""
        if path != PATH or answer.status != 200:
            return
        if method == "DELETE":
            with self._lock:
                keeper, self.keeper = self.keeper, None
            if keeper is not None:
                keeper.stop(timeout=0)
            return
        if method != "POST":
            return
        key = _listen_key(answer)
        if key is None:
            return
        try:
            with self._lock:
                if self.keeper is None:
                    self.keeper = self._make(upstream)
                keeper = self.keeper
            keeper.adopt(key, by="bot")
            keeper.start()
        except BrokerError:
            pass  # recorded by the keeper; the bot has its key and its own client may keep it alive

    def _make(self, upstream: Upstream) -> ListenKeyKeeper:
        def send(method: str, target: str, headers: Mapping[str, str]) -> tuple[int, bytes]:
            try:
                answer = upstream.request(method, target, None, headers)
            except UpstreamError as exc:
                raise OSError(exc.message) from None
            return answer.status, answer.body

        options: dict[str, Any] = {} if self._interval is None else {"interval": self._interval}
        return ListenKeyKeeper(self._api_key, upstream.base_url, record=self._record, profile=self._profile,
                               transport=send, by="proxy", **options)

    def stream_event(self, method: str, body: bytes) -> Answer:
        """The bot's report of a stream message (``STREAM_EVENT_PATH``)."""
        if method != "POST":
            return Answer(405, _JSON, b'{"code":-1000,"msg":"POST the stream message as JSON"}')
        try:
            message = json.loads(body)
        except ValueError:
            return Answer(400, _JSON, b'{"code":-1100,"msg":"the body is not JSON"}')
        keeper = self.keeper
        if keeper is not None:
            new_key = keeper.report_stream_event(message)
        else:
            report_stream_error(message, profile=self._profile, api_key=self._api_key, record=self._record)
            new_key = None
        return Answer(200, _JSON, json.dumps({"listenKey": new_key}).encode())

    def stop(self) -> None:
        with self._lock:
            keeper, self.keeper = self.keeper, None
        if keeper is not None:
            keeper.stop()


def _listen_key(answer: Answer) -> str | None:
    """The ``listenKey`` of an answer the proxy passes on unchanged (so possibly gzip- or deflate-encoded,
    as the client asked)."""
    import gzip
    import zlib

    body = answer.body
    encoding = next((v.strip().lower() for k, v in answer.headers if k.lower() == "content-encoding"), "")
    try:
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        elif encoding not in ("", "identity"):
            return None
        data = json.loads(body)
    except (ValueError, OSError, EOFError, zlib.error):
        return None
    key = data.get("listenKey") if isinstance(data, dict) else None
    return key if isinstance(key, str) and key else None
