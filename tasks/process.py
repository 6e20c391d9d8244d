"""Child processes the pipeline starts in their own session (a launcher, a server)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request


class ExitedEarly(Exception):
    """The server process exited before its health check answered."""

    def __init__(self, code: int):
        super().__init__(f"exited with code {code} before it answered")
        self.code = code


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it), for a server or rendezvous that is
    told its port and binds it a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float,
                 interval: float = 0.5) -> None:
    """Poll ``url`` (a server's health endpoint) until it answers 200. Raises ``ExitedEarly``
    if ``proc`` exits first, ``TimeoutError`` after ``timeout`` seconds; callers say which
    server and where its output went."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ExitedEarly(proc.returncode)
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop one process (not its children: ``stop_group`` for a process group): SIGTERM, then
    SIGKILL if it has not exited within ``timeout`` seconds. Nothing to do once it exited."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it forked (its
    process group): SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
