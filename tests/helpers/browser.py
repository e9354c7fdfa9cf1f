"""Load a page in headless Chromium and watch it over the DevTools protocol (standard library only).

The protocol runs over ``--remote-debugging-pipe``: Chromium reads commands
on fd 3 and writes answers and events on fd 4, one JSON message each,
terminated by a NUL byte. We attach to the page target in flattened mode
(every page command carries the ``sessionId``), enable the console, log,
runtime and network domains, set a 1280x800 viewport, navigate, wait for the
load event, and collect what a reviewer would care about: console errors,
exceptions, and every network request.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import threading
import queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-extensions", "--disable-sync", "--disable-default-apps", "--no-default-browser-check",
         "--hide-scrollbars", "--remote-debugging-pipe")
WIDTH, HEIGHT = 1280, 800
DEADLINE_S = 60.0


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageVisit:
    """What loading the page showed."""

    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL the page asked for, the page itself included
    evaluated: dict[str, Any] = field(default_factory=dict)
    screenshot: bytes = b""

    @property
    def network_requests(self) -> list[str]:
        """Requests that would leave the machine (anything but the file itself and inline data)."""
        return [u for u in self.requests if not u.startswith(("file:", "data:", "about:"))]


class _Pipe:
    def __init__(self, binary: str, profile_dir: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def fds() -> None:  # in the child: its fd 3 reads our commands, its fd 4 writes to us
            a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile_dir}", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=fds,
            close_fds=False)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next = 0
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._answers: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.stderr_tail = b""
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_tail = (self.stderr_tail + line)[-4000:]

    def _read(self) -> None:
        buf = b""
        with os.fdopen(self._from_chrome, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                buf += chunk
                *messages, buf = buf.split(b"\0")
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        with self._lock:
                            box = self._answers.get(msg["id"])
                        if box is not None:
                            box.put(msg)
                    else:
                        self.events.put(msg)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        with self._lock:
            self._next += 1
            ident = self._next
            box: queue.Queue[dict[str, Any]] = queue.Queue()
            self._answers[ident] = box
        msg: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        try:
            answer = box.get(timeout=DEADLINE_S)
        except queue.Empty:
            raise AssertionError(f"Chromium did not answer {method}; stderr: {self.stderr_tail[-800:]!r}") from None
        if "error" in answer:
            raise AssertionError(f"{method} failed: {answer['error']}")
        return dict(answer.get("result", {}))

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        os.close(self._to_chrome)


def visit(binary: str, page: Path, profile_dir: Path, expressions: dict[str, str]) -> PageVisit:
    """Load ``page`` at 1280x800, evaluate ``expressions`` (name -> JS returning JSON), take a screenshot."""
    pipe = _Pipe(binary, profile_dir)
    out = PageVisit()
    try:
        targets = pipe.send("Target.getTargets")["targetInfos"]
        target = next(t["targetId"] for t in targets if t["type"] == "page")
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.send("Emulation.setDeviceMetricsOverride",
                  {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session=session)
        pipe.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        loaded = False
        while not loaded:
            try:
                event = pipe.events.get(timeout=DEADLINE_S)
            except queue.Empty:
                raise AssertionError("the page never finished loading") from None
            loaded = _note(event, out) or loaded
        # Whatever arrived with the load event is in the queue: read it too.
        while True:
            try:
                _note(pipe.events.get_nowait(), out)
            except queue.Empty:
                break
        for name, js in expressions.items():
            res = pipe.send("Runtime.evaluate", {"expression": js, "returnByValue": True}, session=session)
            if "exceptionDetails" in res:
                out.console_errors.append(f"evaluating {name}: {res['exceptionDetails'].get('text')}")
            out.evaluated[name] = res.get("result", {}).get("value")
        shot = pipe.send("Page.captureScreenshot", {"format": "png"}, session=session)
        out.screenshot = base64.b64decode(shot["data"])
        while True:
            try:
                _note(pipe.events.get_nowait(), out)
            except queue.Empty:
                break
    finally:
        pipe.close()
    return out


def _note(event: dict[str, Any], out: PageVisit) -> bool:
    """Record one event; True for the page's load event."""
    method, params = event.get("method"), event.get("params", {})
    if method == "Page.loadEventFired":
        return True
    if method == "Network.requestWillBeSent":
        out.requests.append(str(params.get("request", {}).get("url")))
    elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        out.console_errors.append(json.dumps(params.get("args"))[:300])
    elif method == "Runtime.exceptionThrown":
        out.console_errors.append(str(params.get("exceptionDetails", {}).get("text")))
    elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        out.console_errors.append(str(params["entry"].get("text")))
    return False
