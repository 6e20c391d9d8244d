"""``rlhf ui``: MLflow's own UI on the configured tracking store, and where Prefect's UI is.

A local store (``sqlite:///mlflow.db``, a database URL, a ``file:`` store) is served by
``mlflow server`` started here on 127.0.0.1; a tracking server (``http(s)://``) already
serves its UI, so it is only linked. The Prefect UI is linked when Prefect is configured
to talk to a server (``PREFECT_API_URL``, or the active Prefect profile); without one flows
run on a temporary API that has no UI worth opening.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

from tasks.process import ExitedEarly, free_port, stop_group, wait_healthy

# MLflow 3.17's UI picks its GenAI view or its model-training view from a ``workflowType``
# URL parameter, else the browser's localStorage, default GenAI; it does not read the
# experiment's ``mlflow.experimentKind`` tag for that (mlflow#24498; the fix, PR #24493, was
# closed unmerged). The pipeline still sets the tag (tasks/tracking.py); our links carry the
# parameter so the experiment opens on its runs and charts. Value from the UI bundle's
# WorkflowType enum (``MACHINE_LEARNING="machine_learning"``).
WORKFLOW_PARAM = "workflowType=machine_learning"


class UiError(RuntimeError):
    """The MLflow UI could not be started (the message says why)."""


@dataclass(frozen=True)
class UiLinks:
    """Where to look: MLflow's UI, the pipeline experiment's runs in it, Prefect's UI."""

    mlflow: str
    experiment: str | None  # None: the experiment has no runs yet
    prefect: str | None  # None: no Prefect server configured

    def lines(self, experiment_name: str) -> list[str]:
        out = [f"MLflow UI: {self.mlflow}"]
        out.append(f"experiment {experiment_name}: {self.experiment}" if self.experiment else
                   f"experiment {experiment_name}: none yet (no pipeline has run on this store)")
        out.append(f"Prefect UI: {self.prefect}" if self.prefect else
                   "Prefect UI: none (PREFECT_API_URL is not set: flows run on a temporary "
                   "API; `prefect server start` and PREFECT_API_URL give them one)")
        return out


def experiment_url(base_url: str, experiment_id: str) -> str:
    """The experiment's runs table in the model-training view."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{WORKFLOW_PARAM}"


def is_server_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_command(tracking_uri: str, host: str, port: int) -> list[str]:
    """``mlflow server`` for a local store. One worker: one person's browser, a shared CPU.
    Artifacts: runs already name theirs (their experiment's artifact location), which the
    server reads; new experiments created through the UI get MLflow's default."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
            "--host", host, "--port", str(port), "--workers", "1"]


def server_env(environ: dict[str, str]) -> dict[str, str]:
    """The server's environment: the job runner off unless asked for. It runs MLflow's GenAI
    jobs (scorers, trace rollups) in four more processes that took ~40 s to start on a busy
    2-core machine; a viewer of training runs needs none of it."""
    env = dict(environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def prefect_ui_url() -> str | None:
    """Prefect's UI for the configured API (``PREFECT_UI_URL``, else derived from
    ``PREFECT_API_URL`` by Prefect itself), or None without a server."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return settings.ui_url if settings.api.url else None


def experiment_id(tracking_uri: str, name: str) -> str | None:
    from mlflow import MlflowClient

    exp = MlflowClient(tracking_uri).get_experiment_by_name(name)
    return exp.experiment_id if exp else None


def wait_for_mlflow(base_url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll MLflow's ``/health`` until it answers OK; fail if the server exits first."""
    try:
        wait_healthy(f"{base_url}/health", proc, timeout)
    except ExitedEarly as e:
        raise UiError(f"mlflow server exited with code {e.code} "
                      "before it answered (its output is above)") from None
    except TimeoutError:
        raise UiError(f"mlflow server did not answer {base_url}/health in {timeout:.0f} s") from None


def serve_ui(tracking_uri: str, experiment: str, *, host: str = "127.0.0.1", port: int = 5000,
             on_ready: Callable[[str], None] = print, startup_timeout: float = 180.0) -> int:
    """Serve MLflow's UI on a local store until interrupted (Ctrl-C or SIGTERM, which the CLI
    turns into SystemExit), or link a tracking server's; report the links through
    ``on_ready``. Returns mlflow server's exit code (0 when we stopped it)."""
    prefect = prefect_ui_url()
    if is_server_uri(tracking_uri):
        # Fail fast with a plain message (MLflow's client would retry for minutes).
        try:
            with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=10):
                pass
        except (urllib.error.URLError, OSError) as e:
            raise UiError(f"the tracking server {tracking_uri} does not answer: {e}") from None
        exp_id = experiment_id(tracking_uri, experiment)
        links = UiLinks(tracking_uri, exp_id and experiment_url(tracking_uri, exp_id), prefect)
        for line in links.lines(experiment):
            on_ready(line)
        return 0
    exp_id = experiment_id(tracking_uri, experiment)
    port = port or free_port(host)
    # Bound to every interface, it is still reached (and linked) through loopback here.
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    # Its own process group, so stopping it also stops the uvicorn worker it starts.
    proc = subprocess.Popen(server_command(tracking_uri, host, port),
                            env=server_env(dict(os.environ)), start_new_session=True)
    try:
        wait_for_mlflow(base, proc, startup_timeout)
        for line in UiLinks(base, exp_id and experiment_url(base, exp_id), prefect).lines(
                experiment):
            on_ready(line)
        return proc.wait()
    finally:
        stop_group(proc)
