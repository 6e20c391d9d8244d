"""The team setup: ``mlflow server`` on PostgreSQL with artifacts on S3 (moto's server), and
datasets on S3. Real servers on free ports (tests/servers.py), no mocks.

One tiny pipeline run covers both halves of the issue's "done when" (its datasets are
``s3://`` URIs, its tracking URI is the server), so the suite pays for one run, not two."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from tasks.tracking import artifact_location, pipeline_run
from test_flow import PLUMBING

DEMO = Path(__file__).resolve().parents[1] / "demo" / "data"


class _Cfg(BaseModel):
    seed: int = 0


def _without_aws(monkeypatch):
    """A client with no S3 settings at all: what it logs must go through the server."""
    import os

    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_artifact_location_follows_the_tracking_store(tmp_path, monkeypatch):
    assert (artifact_location(f"sqlite:///{tmp_path}/m.db", "rlhf demo/x")
            == (tmp_path / "mlruns" / "rlhf_demo_x").as_uri())
    assert artifact_location("http://127.0.0.1:5000", "e") is None
    assert artifact_location("postgresql://u@h/db", "e") is None
    assert artifact_location("http://h:1", "e", "s3://b/mlflow/") == "s3://b/mlflow/e"
    # A SQLite store elsewhere than the working directory keeps its artifacts beside it.
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    with pipeline_run("t", "exp", f"sqlite:///{store}/mlflow.db", _Cfg()) as run:
        pass
    run_dir = store / "mlruns" / "exp" / run.ctx.parent_run_id
    assert (run_dir / "artifacts" / "config" / "pipeline.json").is_file()
    assert not (tmp_path / "mlruns").exists()


def test_server_proxies_artifacts_to_s3(mlflow_server, s3_server, monkeypatch):
    from mlflow import MlflowClient

    _without_aws(monkeypatch)
    with pipeline_run("proxy", "proxy-check", mlflow_server.uri, _Cfg()) as run:
        pass
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment(run.ctx.experiment_id)
    assert exp.artifact_location.startswith("mlflow-artifacts:/")
    key = f"mlflow/{exp.experiment_id}/{run.ctx.parent_run_id}/artifacts/config/pipeline.json"
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    assert json.loads(body) == {"seed": 0}


def test_demo_on_mlflow_server_with_datasets_on_s3(prefect_harness, mlflow_server, s3_server,
                                                   tmp_path):
    """The issue's "done when": a pipeline whose datasets are s3:// URIs runs end to end
    against mlflow server on PostgreSQL + S3; the registered model's artifacts are read back
    from the bucket with boto3 and the alias resolves."""
    from mlflow import MlflowClient

    from conftest import TINY
    from dataio import content_hash
    from flows.config import load_config
    from flows.pipeline import rlhf_pipeline
    from release.registry import alias_version, champion_policy_dir

    s3, bucket = s3_server.client(), s3_server.bucket
    data = {}
    for f in sorted(DEMO.glob("*.jsonl")):
        s3.upload_file(str(f), bucket, f"datasets/demo/{f.name}")
        data[f.stem] = f"s3://{bucket}/datasets/demo/{f.name}"
    cfg = load_config("configs/demo.yaml", TINY + PLUMBING + [
        *(f"data.{name}={uri}" for name, uri in data.items()),
        f"tracking.uri={mlflow_server.uri}", "tracking.experiment=team-servers",
        f"output_dir={tmp_path}/runs"])
    summary = rlhf_pipeline(cfg)
    assert summary.result == "promoted" and summary.tracking_uri == mlflow_server.uri

    # Runs and metrics read back from the server (PostgreSQL).
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("team-servers")
    assert exp.artifact_location.startswith("mlflow-artifacts:/")  # proxied, not ./mlruns
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["rlhf.result"] == "promoted"
    children = {r.info.run_name for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert children == {"validation", "sft", "reward", "policy", "evaluate", "gate"}
    policy_run = next(r for r in runs if r.info.run_name == "policy")
    assert len(client.get_metric_history(policy_run.info.run_id, "ppo/objective/kl")) == 2
    # The S3 datasets carry the same content hashes as the local files they were copied from.
    for name, uri in data.items():
        assert parent.data.tags[f"data.{name}.sha256"] == content_hash(str(DEMO / f"{name}.jsonl"))

    # The alias resolves, and the registered model's files are in the bucket.
    name, version = cfg.registry.policy_name, summary.registration.policy_version
    assert alias_version(mlflow_server.uri, name, "production") == version
    mv = client.get_model_version(name, version)
    assert set(mv.aliases) == {"candidate", "staging", "production"}
    location = client.get_model_version_download_uri(name, version)  # the logged model's
    assert location.startswith("mlflow-artifacts:/")
    prefix = "mlflow/" + location[len("mlflow-artifacts:/"):].strip("/") + "/"
    keys = {o["Key"][len(prefix):] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix) for o in page.get("Contents", [])}
    assert "MLmodel" in keys
    weights = next(k for k in keys if k.endswith("/model.safetensors"))
    in_bucket = s3.get_object(Bucket=bucket, Key=prefix + weights)["Body"].read()
    assert in_bucket == (Path(summary.policy_uri) / "model.safetensors").read_bytes()
    champion = champion_policy_dir(mlflow_server.uri, name, dst=str(tmp_path / "champion"))
    assert (Path(champion) / "model.safetensors").read_bytes() == in_bucket

    # No credential reached a param or a tag of any run.
    secrets = (s3_server.env["AWS_SECRET_ACCESS_KEY"], s3_server.env["AWS_ACCESS_KEY_ID"])
    for run in runs:
        for value in [*run.data.params.values(), *run.data.tags.values()]:
            assert not any(s in value for s in secrets), run.info.run_name
