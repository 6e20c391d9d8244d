"""Prefect's temporary API, started at the CLI's first step instead of at the flow's first call.

With no API configured, Prefect starts a temporary API server (uvicorn on the SQLite database in
``PREFECT_HOME``) when the flow makes its first call, and the run waits for it: 4.3 s of a 15 s
unchanged re-run of the demo, 11 s of the first run on a new database (``bench/README.md``),
most of it the server importing itself. Started here, before the CLI imports the stages and
MLflow, it boots on the other core while this process imports, and the wait mostly goes.

It is Prefect's own server, started the way ``prefect.server.api.server.SubprocessASGIServer``
starts it (same command and server settings) and living as long: until this process exits.
Stdlib only (and `tasks.process`): importing Prefect here would cost the very time this saves.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
import tomllib
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Mapping

from tasks.process import ExitedEarly, free_port, stop_process, wait_healthy

# What Prefect's SubprocessASGIServer sets for its server: no UI, and the server knows it is
# the temporary one.
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
              "PREFECT__SERVER_FINAL": "1"}
PORT_IN_USE = 3
"""uvicorn's exit code when the port was taken between choosing and binding it."""
_OFF = ("0", "false", "no", "off")


def configured_elsewhere(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment or the active Prefect profile names an API (or rules out a
    temporary one): then Prefect uses that, and nothing is started here.

    Prefect also reads settings from ``.env``, ``prefect.toml`` and ``pyproject.toml``; those
    are checked after Prefect is imported (``TemporaryAPI.settings_url``)."""
    if environ.get("PREFECT_API_URL"):
        return True
    for name in ("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "PREFECT_SERVER_EPHEMERAL_ENABLED"):
        if environ.get(name, "").strip().lower() in _OFF:
            return True
    home = Path(environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    path = Path(environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False  # no profiles (Prefect's default) or one Prefect will complain about itself
    active = environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    profile = profiles.get("profiles", {}).get(active, {})
    return bool(isinstance(profile, dict) and profile.get("PREFECT_API_URL"))


class TemporaryAPI:
    """A Prefect API server started now; ``ready()`` waits for it, ``stop()`` ends it (also at
    exit, after Prefect's own exit hooks have sent their last events and logs to it)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._start()
        atexit.register(self.stop)  # registered before Prefect's hooks, so it runs after them

    def _start(self) -> None:
        self.port = free_port()
        app_dir = Path(find_spec("prefect").submodule_search_locations[0]).parent
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, **SERVER_ENV})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def ready(self, timeout: float | None = None) -> str:
        """Wait until the server answers its health check; returns its API URL."""
        timeout = timeout or float(os.environ.get(
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
        deadline = time.monotonic() + timeout
        while True:
            try:  # polled often: the run is waiting on it
                wait_healthy(f"{self.url}/health", self.proc, deadline - time.monotonic(), 0.05)
                return self.url
            except ExitedEarly as e:
                if e.code != PORT_IN_USE:
                    raise RuntimeError(f"Prefect's temporary API server exited with code "
                                       f"{e.code} before it answered (its output is above)") from None
                self._start()  # someone took the port meanwhile: another one
            except TimeoutError:
                self.stop()
                raise RuntimeError(f"Prefect's temporary API server did not answer within "
                                   f"{timeout:.0f} s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
                                   ) from None

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s, as Prefect does); idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, timeout=5)


def start_unless_configured() -> TemporaryAPI | None:
    """Start the temporary API now, unless an API is configured (see ``configured_elsewhere``;
    with Prefect already imported, e.g. under a test harness, its settings say)."""
    if "prefect.settings" in sys.modules:
        from prefect.settings import get_current_settings

        if get_current_settings().api.url:
            return None
    return None if configured_elsewhere() else TemporaryAPI()


@contextmanager
def serving(api: TemporaryAPI | None):
    """Run what is inside against ``api`` once it answers, unless Prefect's settings (now that
    it is imported: ``.env``, ``prefect.toml``, ``pyproject.toml`` too) name an API after all;
    then ``api`` is stopped unused and Prefect uses theirs."""
    if api is None:
        yield
        return
    from prefect.settings import (PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
                                  get_current_settings, temporary_settings)

    if get_current_settings().api.url:
        api.stop()
        yield
        return
    # No heartbeats: they let a server's automations mark a crashed run, but a temporary API
    # ends with the run, so nothing could act on them; and stopping the heartbeat thread
    # costs up to a second at the end of every run (it sleeps in 1 s steps).
    with temporary_settings({PREFECT_API_URL: api.ready(),
                             PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
