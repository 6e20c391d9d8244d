"""Headless Debian ``chromium`` driven over the Chrome DevTools Protocol, with no extra
packages (``websockets`` comes with prefect and uvicorn); and the subprocess helpers the
browser tests share (read a child's output lines, wait for one, stop it)."""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from tasks.process import stop_group


class DevTools:
    """The few Chrome DevTools Protocol calls the tests need, over one page's websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=10)
        self.next_id = 0

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive in between; skip them
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def eval(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait(self, condition: str, what: str, deadline: float, poll: float = 0.1):
        """Poll a JavaScript expression until it is truthy; fail with the page's text."""
        while time.monotonic() < deadline:
            value = self.eval(condition)
            if value:
                return value
            time.sleep(poll)
        body = self.eval("document.body ? document.body.innerText : ''")
        raise AssertionError(f"page never {what}; body: {body!r}")

    def key(self, key: str) -> None:
        code, vk, text = KEYS[key]
        self.send("Input.dispatchKeyEvent", type="keyDown", key=key, code=code,
                  windowsVirtualKeyCode=vk, nativeVirtualKeyCode=vk, **({"text": text} if text
                                                                       else {}))
        self.send("Input.dispatchKeyEvent", type="keyUp", key=key, code=code,
                  windowsVirtualKeyCode=vk, nativeVirtualKeyCode=vk)

    def screenshot(self, path: Path) -> Path:
        """The page as it is now, as a PNG."""
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self.ws.close()


KEYS = {"1": ("Digit1", 49, "1"), "2": ("Digit2", 50, "2"), "u": ("KeyU", 85, "u"),
        "ArrowLeft": ("ArrowLeft", 37, ""), "ArrowRight": ("ArrowRight", 39, ""),
        "Backspace": ("Backspace", 8, "")}


def start_reader(stream) -> queue.Queue:
    """Lines of a pipe, read by a thread (so the child never blocks on a full pipe)."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in iter(stream.readline, ""):
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_line(lines: queue.Queue, marker: str, deadline: float, what: str) -> str:
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        seen.append(line)
        if marker in line:
            return line.strip()
    raise AssertionError(f"{what} did not print {marker!r} in time; it printed:\n"
                         + "".join(seen[-20:]))


@contextlib.contextmanager
def headless_chromium(tmp_path: Path, deadline: float,
                      window: tuple[int, int] = (1280, 800)) -> Iterator[DevTools]:
    """Debian's ``chromium``, headless, with a fresh profile; yields its blank page's DevTools
    connection and stops the browser (its whole process group) afterwards. Fails, not skips,
    without chromium: ``.ci/run`` installs it."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not on PATH: install it (apt-get install -y chromium); "
                    ".ci/run does this before the tests")
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    browser = subprocess.Popen(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-dev-shm-usage",
         f"--window-size={window[0]},{window[1]}", f"--user-data-dir={profile}",
         "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    devtools = None
    try:
        ws = wait_line(start_reader(browser.stderr), "DevTools listening on", deadline,
                       "chromium").split("listening on ")[1]
        port = ws.split(":")[2].split("/")[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        devtools = DevTools(page["webSocketDebuggerUrl"])
        devtools.send("Page.enable")
        yield devtools
    finally:
        if devtools is not None:
            devtools.close()
        stop_group(browser, timeout=10)
