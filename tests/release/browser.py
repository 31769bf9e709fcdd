"""Headless Chromium driven over the Chrome DevTools Protocol (its websocket, through `websocket-client`), for the
page test: navigate, type, press keys, click, read the DOM, take screenshots. No driver binary, no browser
download: Debian's `chromium` package and one pure-Python websocket library.

`find_chromium()` installs Debian's chromium with apt-get when it is absent and we are root (the test set-up the
issue asks for), or says in one line how to get it."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL = "apt-get install -y chromium   (Debian/Ubuntu; or put chromium on PATH, or set TEAR_LORA_CHROMIUM)"


def _which() -> str | None:
    given = os.environ.get("TEAR_LORA_CHROMIUM")
    if given:
        return given if shutil.which(given) else None
    return next((found for found in map(shutil.which, NAMES) if found), None)


def find_chromium() -> tuple[str | None, str]:
    """(path, "") or (None, one line saying how to get it). Installs it first where apt-get and root allow."""
    found = _which()
    if found or os.environ.get("TEAR_LORA_CHROMIUM"):
        return found, "" if found else f"TEAR_LORA_CHROMIUM={os.environ['TEAR_LORA_CHROMIUM']} is not a program"
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                        ["apt-get", "install", "-y", "-q", "chromium"]):
            subprocess.run(command, env=env, capture_output=True, timeout=900)
            if _which():
                return _which(), ""
    return None, f"Chromium not found: {INSTALL}"


class Browser:
    """One headless Chromium with one tab; `call` sends a CDP command and waits for its answer."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 900, timeout: float = 60):
        import websocket

        binary, how = find_chromium()
        if binary is None:
            raise RuntimeError(how)
        self.ws = None
        profile.mkdir(parents=True, exist_ok=True)
        self.log = open(profile.parent / f"{profile.name}-chromium.log", "w")  # a pipe could fill and block it
        self.process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        active = profile / "DevToolsActivePort"  # chromium writes the port it chose here
        while not (active.is_file() and active.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not open its DevTools port within {timeout:.0f} s "
                                   f"(log: {self.log.name})")
            time.sleep(0.1)
        port = int(active.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            tab = next(t for t in json.loads(response.read()) if t["type"] == "page")
        self.ws = websocket.create_connection(tab["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True)
        self.ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.resize(width, height)

    def call(self, method: str, **params) -> dict:
        message_id = next(self.ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:  # events arrive in between; skip them
            message = json.loads(self.ws.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def resize(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def open(self, url: str, ready: str = "document.readyState === 'complete'", timeout: float = 60) -> None:
        self.call("Page.navigate", url=url)
        self.wait(ready, timeout)

    def js(self, expression: str):
        """The value of a JS expression (promises awaited), or RuntimeError with the page's exception."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    def wait(self, condition: str, timeout: float, every: float = 0.25):
        """Poll a JS condition until it is truthy; its value, or TimeoutError with the page's state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(condition)
            if value:
                return value
            time.sleep(every)
        raise TimeoutError(f"{condition!r} still false after {timeout:.0f} s; page state: {self.js(STATE)}")

    def type(self, selector: str, text: str) -> None:
        """Focus an element and type into it as a user does (insertText, as an IME commit)."""
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def key(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code,
                      nativeVirtualKeyCode=code, **({"text": "\r"} if kind == "keyDown" and key == "Enter" else {}))

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                      " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def screenshot(self) -> bytes:
        """The whole page as PNG bytes."""
        return base64.b64decode(self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"])

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


# the page's visible state, for timeouts and failures: each column's state and error
STATE = ("JSON.stringify([...document.querySelectorAll('.column')].map(c => [c.dataset.name, c.dataset.state, "
         "c.querySelector('.state').textContent]).concat([document.getElementById('status').textContent]))")
