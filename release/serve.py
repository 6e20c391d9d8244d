"""``rlhf serve``: MLflow's scoring protocol on the version an alias names, swapped live.

    POST /invocations  {"inputs": ["a prompt", ...]} -> {"predictions": ["...", ...]}
                       parsed and answered by MLflow's own scoring code
                       (``mlflow.pyfunc.scoring_server.invocations``), so every input format
                       ``mlflow models serve`` takes works here; header ``X-Model-Version``
    GET  /ping         200, as MLflow's server (no token: a liveness probe)
    GET  /health       {"status": "ok", "model", "alias", "version", "model_uri"}

Every route but /ping needs ``Authorization: Bearer <token>`` (401 without it): the token
``rlhf serve`` reads from ``RLHF_SERVE_TOKEN`` or generates and prints.

A watcher thread polls the alias every ``poll_seconds``. When it names another version, that
version is downloaded and loaded beside the serving one, then swapped in by one reference
assignment. A request reads the reference once, when it starts, so requests in flight finish
on the version they started with, and the old model is freed after the last of them. A version
that fails to load is logged and skipped until the alias moves again; the old one keeps
serving. Bound to 127.0.0.1 unless told otherwise; the token is not TLS, so a server on
another interface belongs behind a TLS proxy.
"""

from __future__ import annotations

import hmac
import json
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from release.aliases import UnknownAlias
from release.registry import alias_version, download_version

log = logging.getLogger("rlhf.serve")


@dataclass(frozen=True)
class Served:
    """One loaded version: what a request holds on to from start to finish."""

    version: str
    model: Any
    """The ``mlflow.pyfunc.PyFuncModel``."""
    local_dir: str


class Deployment:
    """The version ``alias`` names, loaded, and kept in step with the registry."""

    def __init__(self, tracking_uri: str, name: str, alias: str, poll_seconds: float = 10.0):
        from mlflow import MlflowClient

        self.tracking_uri, self.name, self.alias = tracking_uri, name, alias
        self.poll_seconds = poll_seconds
        self.client = MlflowClient(tracking_uri)
        self.workdir = tempfile.mkdtemp(prefix="rlhf-serve-")
        self._current: Served | None = None
        self._skipped: str | None = None  # a version that failed to load
        self._stop = threading.Event()

    @property
    def current(self) -> Served:
        served = self._current
        if served is None:
            raise RuntimeError("no version loaded yet: call start()")
        return served

    def start(self) -> Served:
        """Load the version the alias names now; raises UnknownAlias if it names none."""
        version = alias_version(self.tracking_uri, self.name, self.alias, self.client)
        if version is None:
            raise UnknownAlias(f"{self.name} has no version with alias {self.alias!r} at "
                               f"{self.tracking_uri}: promote one first (rlhf promote VERSION "
                               f"--to {self.alias})")
        self._current = self._load(version)
        return self._current

    def _load(self, version: str) -> Served:
        import mlflow

        local = download_version(self.tracking_uri, self.name, version,
                                 tempfile.mkdtemp(prefix=f"v{version}-", dir=self.workdir))
        return Served(version, mlflow.pyfunc.load_model(local), local)

    def refresh(self) -> bool:
        """Swap in the version the alias names now, if it changed; -> whether it swapped."""
        version = alias_version(self.tracking_uri, self.name, self.alias, self.client)
        old = self.current
        if version is None or version in (old.version, self._skipped):
            return False
        log.info("%s@%s moved to version %s: loading it", self.name, self.alias, version)
        try:
            new = self._load(version)
        except Exception:
            log.exception("version %s failed to load; still serving version %s", version,
                          old.version)
            self._skipped = version
            return False
        self._current, self._skipped = new, None  # the swap: one reference assignment
        # In-flight requests hold ``old``; its files were only read at load time.
        shutil.rmtree(old.local_dir, ignore_errors=True)
        log.info("now serving %s version %s", self.name, version)
        return True

    def watch(self) -> None:
        """Poll the alias until ``stop()``; registry hiccups are logged, not fatal."""
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception:
                log.exception("could not read alias %s of %s", self.alias, self.name)

    def stop(self) -> None:
        self._stop.set()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def health(self) -> dict[str, str]:
        served = self.current
        return {"status": "ok", "model": self.name, "alias": self.alias,
                "version": served.version, "model_uri": f"models:/{self.name}/{served.version}"}


class Handler(BaseHTTPRequestHandler):
    server: _Server

    def _send(self, status: int, body: str, content_type: str = "application/json",
              version: str | None = None) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if version is not None:
            self.send_header("X-Model-Version", version)
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        """Whether the request carries the bearer token; answers 401 if not."""
        given = self.headers.get("Authorization") or ""
        scheme, _, token = given.partition(" ")
        # compare_digest: no timing hint about how much of a guessed token was right.
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              self.server.token.encode()):
            return True
        data = json.dumps({"error_code": "UNAUTHENTICATED",
                           "message": "missing or wrong token: send Authorization: Bearer "
                                      "<token> (RLHF_SERVE_TOKEN, or the one rlhf serve "
                                      "printed)"}).encode()
        self.send_response(401)
        self.send_header("WWW-Authenticate", "Bearer")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return False

    def do_GET(self) -> None:
        if self.path == "/ping":
            self._send(200, "\n")
        elif not self._authorized():
            return
        elif self.path in ("/health", "/version"):
            self._send(200, json.dumps(self.server.deployment.health()))
        else:
            self._send(404, json.dumps({"message": f"no route {self.path}"}))

    def do_POST(self) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc.scoring_server import invocations

        if not self._authorized():
            return
        if self.path != "/invocations":
            self._send(404, json.dumps({"message": f"no route {self.path}"}))
            return
        served = self.server.deployment.current  # held until this request ends
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        content_type = self.headers.get("Content-Type") or "application/json"
        try:
            out = invocations(body, content_type, served.model,
                              served.model.metadata.get_input_schema())
            self._send(out.status, out.response, out.mimetype, served.version)
        except MlflowException as e:
            self._send(e.get_http_status_code(), e.serialize_as_json(), version=served.version)
        except Exception as e:
            log.exception("prediction failed")
            self._send(500, json.dumps({"error_code": "INTERNAL_ERROR", "message": str(e)}),
                       version=served.version)

    def log_message(self, format: str, *args) -> None:
        log.info("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], deployment: Deployment, token: str):
        if not token:
            raise ValueError("rlhf serve needs a non-empty bearer token")
        super().__init__(address, Handler)
        self.deployment, self.token = deployment, token


def serve(tracking_uri: str, name: str, alias: str, *, token: str, host: str = "127.0.0.1",
          port: int = 8080, poll_seconds: float = 10.0,
          on_ready: Callable[[str], None] = print) -> None:
    """Serve until interrupted; ``on_ready`` gets the base URL (port 0 picks a free port);
    requests need ``Authorization: Bearer <token>``."""
    deployment = Deployment(tracking_uri, name, alias, poll_seconds)
    try:
        served = deployment.start()
        server = _Server((host, port), deployment, token)
        watcher = threading.Thread(target=deployment.watch, name="alias-watcher", daemon=True)
        watcher.start()
        url = f"http://{host}:{server.server_address[1]}"
        on_ready(f"serving models:/{name}@{alias} (version {served.version}) on {url}")
        try:
            server.serve_forever()
        finally:
            server.server_close()
    finally:
        deployment.stop()

