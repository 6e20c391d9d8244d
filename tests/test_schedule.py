"""Recurring runs: deploy/prefect.yaml deployed by `rlhf schedule` to a real `prefect server`,
a run created by the server's scheduler and executed to COMPLETED by the worker that
`rlhf schedule --worker` becomes, on the tiny demo config."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import yaml

from tasks.process import free_port, stop_group

ROOT = Path(__file__).resolve().parents[1]


def _wait(what: str, check, timeout: float, procs=()):
    """Poll ``check`` until it returns something truthy; fail naming ``what`` (with the logs of
    any process that died) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p, log in procs:
            if p.poll() is not None:
                pytest.fail(f"{what}: process exited {p.returncode}:\n{log.read_text()[-4000:]}")
        got = check()
        if got:
            return got
        time.sleep(1)
    logs = "\n".join(log.read_text()[-4000:] for _, log in procs)
    pytest.fail(f"{what}: not within {timeout:.0f} s\n{logs}")


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` on 127.0.0.1:FREE with its own PREFECT_HOME (SQLite); the
    scheduler looks for due schedules every second instead of every 60."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                             "127.0.0.1", "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    api = env["PREFECT_API_URL"]

    def healthy():
        try:
            return httpx.get(f"{api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait("prefect server /api/health", healthy, 150, [(proc, log)])
        yield api, env, (proc, log)
    finally:
        stop_group(proc, timeout=30)


def test_cli_schedule_without_server_exits_2(capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    # No API URL from the environment, a profile or the session's test harness.
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["schedule"]) == 2
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err


def test_schedule_deploy_spec_fills_parameters_and_pool():
    """`prefect deploy --all` ignores --params and --pool, so `rlhf schedule` deploys a copy
    of the file with them filled in; everything else is the file's."""
    from flows.cli import deploy_spec

    spec = yaml.safe_load((ROOT / "deploy/prefect.yaml").read_text())
    params = {"config_path": "c.yaml", "overrides": ["seed=1"]}
    filled = deploy_spec(spec, ["nightly", "weekly"], "pool-a", params)
    by_name = {d["name"]: d for d in filled["deployments"]}
    assert by_name["nightly"]["parameters"] == params
    assert by_name["weekly"]["parameters"] == {**params, "rounds": None}
    assert {d["work_pool"]["name"] for d in filled["deployments"]} == {"pool-a"}
    assert filled["pull"] == spec["pull"] and filled["build"] == spec["build"]
    assert by_name["nightly"]["schedules"] == spec["deployments"][0]["schedules"]
    assert yaml.safe_load(yaml.safe_dump(filled)) == filled  # written out as YAML
    only = deploy_spec(spec, ["weekly"], None, None)
    assert [d["name"] for d in only["deployments"]] == ["weekly"]
    assert only["deployments"][0] == spec["deployments"][1]  # untouched without options
    assert spec["deployments"][0]["parameters"]["config_path"] == "configs/demo.yaml"


def test_registry_limit_name_is_a_valid_prefect_name():
    from flows.scheduled import registry_limit_name

    assert registry_limit_name("rlhf-policy") == "rlhf-registry-rlhf-policy"
    assert registry_limit_name("team/rlhf policy%2") == "rlhf-registry-team-rlhf-policy-2"


def test_prefect_yaml_schedules_and_limits():
    """What the deploy file promises: one deployment per flow entry point, nightly cron for
    the pipeline, its own schedule for the feedback flow, one run at a time, ENQUEUE."""
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "deploy/prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert deps["nightly"]["entrypoint"] == "flows/scheduled.py:scheduled_pipeline"
    assert deps["weekly"]["entrypoint"] == "flows/scheduled.py:scheduled_feedback"
    assert deps["nightly"]["schedules"][0]["cron"] == "0 2 * * *"
    assert deps["weekly"]["schedules"][0]["cron"] != deps["nightly"]["schedules"][0]["cron"]
    for d in deps.values():
        assert d["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
        assert d["parameters"]["config_path"] == "configs/demo.yaml"
        # Every parameter the file sets is one the entry point takes.
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        assert set(d["parameters"]) <= set(flow.parameters.properties)


def test_schedule_nightly_rounds_on_refusal_as_rlhf_run():
    """The nightly entry point goes on to feedback rounds exactly when `rlhf run` does."""
    from types import SimpleNamespace as NS

    from flows.feedback import rounds_on_refusal

    def cfg(on_refusal, max_rounds):
        return NS(feedback=NS(on_refusal=on_refusal, max_rounds=max_rounds))

    refused, promoted = NS(result="feedback_round_needed"), NS(result="promoted")
    assert rounds_on_refusal(cfg("round", 2), refused)
    assert not rounds_on_refusal(cfg("round", 2), promoted)
    assert not rounds_on_refusal(cfg("stop", 2), refused)
    assert not rounds_on_refusal(cfg("round", 0), refused)


def test_schedule_scheduled_run_executed_by_worker(prefect_server, tiny_overrides, tmp_path):
    from mlflow import MlflowClient

    api, env, server = prefect_server
    # A refused tiny run ends there (the rounds have their own end-to-end test).
    tiny_overrides = tiny_overrides + ["feedback.on_refusal=stop"]
    log = tmp_path / "schedule.log"
    # Deploys both deployments of deploy/prefect.yaml (tiny config as their parameters), then
    # becomes a worker of the process pool.
    worker = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "schedule", "--config", "configs/demo.yaml",
         "--worker"] + [a for o in tiny_overrides for a in ("--set", o)],
        env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    procs = [server, (worker, log)]
    try:
        def deployment(flow, name):
            r = httpx.get(f"{api}/deployments/name/{flow}/{name}", timeout=5)
            return r.json() if r.status_code == 200 else None

        _wait("deployments created", lambda: deployment("rlhf-scheduled-feedback", "weekly"),
              180, procs)
        nightly = deployment("rlhf-scheduled-pipeline", "nightly")
        weekly = deployment("rlhf-scheduled-feedback", "weekly")
        for d in (nightly, weekly):
            assert d["global_concurrency_limit"]["limit"] == 1
            assert d["concurrency_options"]["collision_strategy"] == "ENQUEUE"
            assert d["work_pool_name"] == "rlhf-local"
            assert d["parameters"]["config_path"] == "configs/demo.yaml"
            assert d["parameters"]["overrides"] == tiny_overrides
            assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory":
                                        {"directory": str(ROOT)}}]
        assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
        assert weekly["parameters"]["rounds"] is None

        # A schedule that fires in a few seconds, beside the nightly one (through the REST
        # API: a `prefect deployment schedule create` subprocess takes longer than that to
        # start here); the scheduler service, not this test, creates the run.
        anchor = (datetime.now(timezone.utc) + timedelta(seconds=8)).replace(microsecond=0)
        r = httpx.post(f"{api}/deployments/{nightly['id']}/schedules", timeout=10,
                       json=[{"schedule": {"interval": 3600, "anchor_date": anchor.isoformat()},
                              "active": True}])
        assert r.status_code == 201, r.text

        def runs(state=None):
            body = {"deployments": {"id": {"any_": [nightly["id"]]}},
                    "flow_runs": {"expected_start_time": {"before_": (
                        anchor + timedelta(seconds=1)).isoformat()}}}
            if state:
                body["flow_runs"]["state"] = {"type": {"any_": [state]}}
            return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=5).json()

        def finished():
            done = runs("COMPLETED") + runs("FAILED") + runs("CRASHED")
            return done or None

        (run,) = _wait("scheduled run finished", finished, 420, procs)
        assert run["state_type"] == "COMPLETED", run["state"]
        assert run["auto_scheduled"] is True  # created by the scheduler service
        assert datetime.fromisoformat(run["expected_start_time"]) == anchor
        assert run["parameters"]["overrides"] == tiny_overrides

        # The pipeline ran inside it: one finished MLflow parent run with the gate's result.
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        exp = client.get_experiment_by_name("rlhf-demo")
        parents = [r for r in client.search_runs([exp.experiment_id])
                   if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert parents[0].data.tags["rlhf.result"] in ("promoted", "feedback_round_needed")

        # The run held the registered model's slot, which exists (1 slot) and was given back.
        assert "holding the rlhf-registry-rlhf-policy slot" in log.read_text()
        r = httpx.get(f"{api}/v2/concurrency_limits/rlhf-registry-rlhf-policy", timeout=5)
        assert r.status_code == 200, r.text
        assert r.json()["limit"] == 1 and r.json()["active_slots"] == 0
    finally:
        stop_group(worker, timeout=30)
