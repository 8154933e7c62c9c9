"""Headless Chromium driven over the DevTools protocol: pages checked by their DOM, screenshots.

In:  Debian's `chromium` (`apt-get install chromium`), URLs on 127.0.0.1 or `file://` pages.
Out: `Browser` (a context manager): `open(url)`, `wait(js, what)` until a JavaScript condition
     holds (the page's own rendering, not a fixed delay), `text()` / `html()` of the page,
     `expand_runs()` (clicks every "+" of MLflow's runs table until the run tree is open),
     `screenshot(path)`. The browser has no network beyond 127.0.0.1: every other host name
     fails to resolve, and background/component/sync traffic is off.

    with Browser() as b:
        b.open("http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning")
        b.wait("document.body.innerText.includes('finetune')", "the runs to show")
        b.screenshot(Path("runs.png"))
"""
from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--hide-scrollbars",
         "--remote-debugging-port=0"]
# MLflow's runs table: the "+" button of a run whose children are hidden
EXPAND_JS = """(() => {
  const plus = [...document.querySelectorAll('button[data-component-id$="runnamecellrenderer.tsx_46"]')]
    .filter(b => (b.querySelector('path')?.getAttribute('d') || '').startsWith('M7.25 7.25V4.5'));
  plus.forEach(b => b.click());
  return plus.length;
})()"""


ROWS_JS = "document.querySelectorAll('.ag-center-cols-container [role=row]').length"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(RuntimeError):
    """The browser did not start, or a page never reached the awaited state."""


class Browser:
    def __init__(self, width: int = 1920, height: int = 1080, timeout: float = 60.0):
        exe = chromium()
        if exe is None:
            raise BrowserError("no chromium on PATH (Debian: apt-get install -y chromium)")
        self.width, self.height, self.timeout = width, height, timeout
        self._profile = tempfile.mkdtemp(prefix="ptf-chromium-")
        self._log = open(Path(self._profile) / "chromium.log", "w")
        self._proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={self._profile}",
                                       f"--window-size={width},{height}", "about:blank"],
                                      stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._ids = itertools.count(1)
        self._ws = None

    def __enter__(self) -> "Browser":
        from websockets.sync.client import connect

        port_file = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while not port_file.is_file() or not port_file.read_text().strip():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise BrowserError("chromium did not start: "
                                   + (Path(self._profile) / "chromium.log").read_text()[-2000:])
            time.sleep(0.05)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self._ws = connect(page["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024)
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._ws is not None:
            self._ws.close()
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events that arrive meanwhile are dropped)."""
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv(timeout=self.timeout))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise BrowserError(f"{expression[:80]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait(self, condition: str, what: str, timeout: float | None = None) -> Any:
        """Poll the JavaScript `condition` until it is truthy; `BrowserError` naming `what` else."""
        deadline = time.monotonic() + (timeout or self.timeout)
        guarded = f"(() => {{ try {{ return ({condition}); }} catch (e) {{ return false; }} }})()"
        while True:
            value = self.eval(guarded)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {what}; the page says: {self.text()[:1500]}")
            time.sleep(0.2)

    def text(self) -> str:
        return self.eval("document.body ? document.body.innerText : ''") or ""

    def html(self) -> str:
        return self.eval("document.documentElement.outerHTML") or ""

    def expand_runs(self, rounds: int = 5) -> None:
        """Open MLflow's run tree level by level (children appear after a parent opens)."""
        for _ in range(rounds):
            rows = self.eval(ROWS_JS)
            if not self.eval(EXPAND_JS):
                return
            self.wait(f"{ROWS_JS} > {rows}", "the runs of the opened level to show", timeout=20)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
