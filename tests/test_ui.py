"""``rlhf ui``: the links it prints, a clean error when MLflow cannot start, and MLflow's UI
after a tiny pipeline run, driven in headless Chromium: the pipeline's parent run, its stage
runs and the policy's KL chart, whose plotted points are the logged ones."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from browser import headless_chromium, start_reader, wait_line
from flows.config import load_config
from tasks.process import stop_process
from tasks.ui import UiError, UiLinks, experiment_url, serve_ui, server_env

REPO = Path(__file__).resolve().parents[1]
STAGES = {"validation", "sft", "reward", "policy", "evaluate", "gate"}


def test_links_open_the_model_training_view():
    url = experiment_url("http://127.0.0.1:5000/", "7")
    assert url == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    lines = UiLinks("http://h:1", url, "http://p:4200").lines("rlhf-demo")
    assert lines == ["MLflow UI: http://h:1", f"experiment rlhf-demo: {url}",
                     "Prefect UI: http://p:4200"]
    bare = UiLinks("http://h:1", None, None).lines("x")
    assert "none yet" in bare[1] and "PREFECT_API_URL is not set" in bare[2]


def test_job_runner_off_unless_asked_for():
    assert server_env({})["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    asked = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"}
    assert server_env(asked)["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"


@pytest.mark.timeout(300)
def test_unreachable_mlflow_is_a_clear_error_and_leaves_nothing_running(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        printed = []
        with pytest.raises(UiError, match="mlflow server exited with code"):
            serve_ui(f"sqlite:///{tmp_path}/mlflow.db", "none", port=port,
                     on_ready=printed.append, startup_timeout=240)
        assert printed == []  # no link to a server that never answered
    # mlflow server (and any uvicorn it started) is gone.
    assert not [c for c in map(_cmdline, Path("/proc").glob("[0-9]*/cmdline"))
                if "mlflow" in " ".join(c) and f"--port\0{port}" in "\0".join(c)]
    # Nor a link to a tracking server that does not answer (the port is closed now).
    with pytest.raises(UiError, match=f"tracking server http://127.0.0.1:{port} does not"):
        serve_ui(f"http://127.0.0.1:{port}", "none", on_ready=printed.append)
    assert printed == []


def _cmdline(path: Path) -> list[str]:
    try:
        return path.read_bytes().decode(errors="replace").split("\0")
    except OSError:  # the process ended meanwhile
        return []


def _store_runs(uri: str, experiment: str, parent_run_id: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    children = {r.info.run_name: r.info.run_id for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent_run_id}
    kl = [(m.step, m.value) for m in
          client.get_metric_history(children["policy"], "ppo/objective/kl")]
    return exp.experiment_id, children, kl


# Plotly keeps a chart's traces on its graph div (``gd.data``): the points the chart drew.
KL_CARD_TRACES = """(() => {
  const card = [...document.querySelectorAll('[data-testid=experiment-view-compare-runs-card]')]
    .find(c => c.querySelector('h4') && c.querySelector('h4').innerText.trim() === 'kl');
  const gd = card && [...card.querySelectorAll('div')].find(e => e.data && e._fullLayout);
  return gd && gd.querySelector('path.js-line') ? JSON.stringify(gd.data.map(t => [t.x, t.y]))
                                                 : null;
})()"""


@pytest.mark.timeout(900)
def test_rlhf_ui_shows_the_pipeline_runs_and_kl_chart_in_chromium(prefect_harness,
                                                                   tiny_overrides, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import rlhf_pipeline

    cfg = load_config("configs/demo.yaml", tiny_overrides)
    summary = rlhf_pipeline(cfg)
    exp_id, children, kl = _store_runs(summary.tracking_uri, cfg.tracking.experiment,
                                       summary.parent_run_id)
    assert set(children) == STAGES and len(kl) == 2

    started = time.monotonic()
    deadline = started + 240  # a busy 2-core machine: mlflow server alone took ~60 s there
    api = PREFECT_API_URL.value()  # the harness's real temporary server
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PREFECT_API_URL": api}
    ui = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ui", "--config", "configs/demo.yaml",
         "--set", f"tracking.uri={summary.tracking_uri}", "--port", "0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = start_reader(ui.stdout)
        base = wait_line(lines, "MLflow UI: ", deadline, "rlhf ui").split("MLflow UI: ")[1]
        assert base.startswith("http://127.0.0.1:")
        link = wait_line(lines, "experiment rlhf-demo: ", deadline, "rlhf ui").split(": ", 1)[1]
        assert link == experiment_url(base, exp_id)
        prefect = wait_line(lines, "Prefect UI: ", deadline, "rlhf ui")
        assert prefect == f"Prefect UI: {api.removesuffix('/api')}"
        server_ready = time.monotonic() - started
        # A tracking server (this one, now) is linked, not served a second time.
        linked = []
        assert serve_ui(base, cfg.tracking.experiment, on_ready=linked.append) == 0
        assert linked[:2] == [f"MLflow UI: {base}", f"experiment rlhf-demo: {link}"]

        with headless_chromium(tmp_path, deadline, window=(1400, 900)) as page:
            page.send("Page.navigate", url=link)
            # The runs table, in the model-training view: the parent run, then (expanded) its
            # stage runs, each a link to its own run id.
            page.wait("[...document.querySelectorAll('a')].some(a => a.getAttribute('href') === "
                      f"'#/experiments/{exp_id}/runs/{summary.parent_run_id}')",
                      "listed the parent run", deadline)
            assert page.eval("document.body.innerText.includes('Evaluation runs')") is False, \
                "opened in the GenAI view"
            page.eval(f"document.querySelector('.ag-row[row-id=\"{summary.parent_run_id}\"] "
                      "button[data-component-id*=runnamecellrenderer]').click()")
            runs_js = ("JSON.stringify(Object.fromEntries([...document.querySelectorAll('a')]"
                       f".filter(a => (a.getAttribute('href') || '').startsWith('#/experiments/"
                       f"{exp_id}/runs/')).map(a => [a.innerText.trim(), a.getAttribute('href')"
                       ".split('/').pop()])))")
            page.wait(f"Object.keys(JSON.parse({runs_js})).length >= {len(STAGES) + 1}",
                      "listed the stage runs", deadline)
            listed = json.loads(page.eval(runs_js))
            assert listed == {**children, f"{cfg.name}-pipeline": summary.parent_run_id}
            page.screenshot(tmp_path / "runs.png")

            # The policy run's metric charts, filtered to the KL ones.
            page.send("Page.navigate", url=f"{base}/#/experiments/{exp_id}/runs/"
                      f"{children['policy']}/model-metrics?workflowType=machine_learning")
            search = "document.querySelector('input[placeholder=\"Search metric charts\"]')"
            page.wait(f"!!{search}", "showed the metric charts", deadline)
            page.eval(f"{search}.focus()")
            page.send("Input.insertText", text="objective/kl")
            traces = json.loads(page.wait(KL_CARD_TRACES, "drew the KL chart", deadline))
            assert traces and all([list(zip(x, y)) == kl for x, y in traces])
            page.wait("document.body.innerText.includes('policy (ppo/objective/kl)')",
                      "labelled the KL line", deadline)
            shot = page.screenshot(tmp_path / "kl.png")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
        print(f"rlhf ui answered in {server_ready:.1f} s; browser checks done in "
              f"{time.monotonic() - started - server_ready:.1f} s")
    finally:
        stop_process(ui, timeout=60)  # it stops mlflow server first: seconds, more on a busy machine
    assert ui.returncode == 0, "rlhf ui should exit cleanly on SIGTERM"
