"""Fault: the MLflow tracking server (team mode: ``mlflow server`` on PostgreSQL, artifacts
proxied to S3) stops during a run, and comes back or does not."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tasks.process import free_port
from tests.servers import _stop, _wait_healthy, create_database


class RestartableServer:
    """``mlflow server`` on one port that the test can stop and start again (same PostgreSQL
    database, same S3 artifact root: a restart, not a new server)."""

    def __init__(self, backend: str, dest: str, env: dict[str, str], log: Path):
        self.backend, self.dest, self.env, self.log = backend, dest, env, log
        self.port, self.proc, self.starts = free_port(), None, 0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
                 "--artifacts-destination", self.dest, "--serve-artifacts", "--host",
                 "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        _wait_healthy(self.uri, self.proc, self.log, timeout=120)
        self.starts += 1

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None


@pytest.fixture(scope="module")
def server(postgres, s3_server, tmp_path_factory):
    """One server for this module (a start costs ~20 s on a busy machine): the restart test
    leaves it running, the last test stops it for good."""
    tmp_path = tmp_path_factory.mktemp("mlflow_faults")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(s3_server.env)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # as tests/servers.py: no job workers
    srv = RestartableServer(create_database(postgres, f"faults_{uuid.uuid4().hex[:8]}"),
                            f"s3://{s3_server.bucket}/faults-{tmp_path.name}", env,
                            tmp_path / "server.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def make_ctx(uri: str):
    from mlflow import MlflowClient

    from tasks.base import TrackingContext

    client = MlflowClient(uri)
    exp = client.create_experiment(f"faults-{uuid.uuid4().hex[:8]}")
    parent = client.create_run(exp, run_name="pipeline").info.run_id
    return TrackingContext(tracking_uri=uri, experiment_id=exp, parent_run_id=parent)


def test_server_restart_mid_training_loses_no_metric(server, monkeypatch, tmp_path, head_file):
    """Fault: the tracking server is stopped after SFT step 3 and restarted a few seconds
    later, while training goes on. Guarantee: the client's retries (MLflow's HTTP retries with
    backoff: MLFLOW_HTTP_REQUEST_MAX_RETRIES / _BACKOFF_FACTOR) carry the logging over the
    outage: the stage finishes, its run is FINISHED, every step's loss (1-8) is on the server,
    no gap, and the model artifact reached the S3 artifact store."""
    import transformers
    from mlflow import MlflowClient

    from tasks.base import BaseModelConfig
    from tasks.sft import SFTConfig, run_sft

    restarted = threading.Event()

    class Outage(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:  # before step 3's metrics are logged
                server.stop()

                def back():
                    time.sleep(3)
                    server.start()
                    restarted.set()

                threading.Thread(target=back, daemon=True).start()

    init = transformers.Trainer.__init__

    def with_outage(self, *a, **kw):
        kw["callbacks"] = list(kw.get("callbacks") or []) + [Outage()]
        init(self, *a, **kw)

    monkeypatch.setattr(transformers.Trainer, "__init__", with_outage)
    ctx = make_ctx(server.uri)
    cfg = SFTConfig(max_steps=8, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                    learning_rate=1e-3, max_length=64, logging_steps=1, save_steps=0,
                    eval_fraction=0.0)
    result = run_sft(cfg, base_model=BaseModelConfig(path="demo/base_model"),
                     data_uri=head_file("demo/data/sft.jsonl", tmp_path / "sft.jsonl", 32),
                     out_dir=str(tmp_path / "sft"), seed=0, ctx=ctx)
    assert restarted.is_set() and server.starts == 2  # the outage happened, mid-stage

    client = MlflowClient(server.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "sft/loss")] == list(
        range(1, 9))
    assert {a.path for a in client.list_artifacts(result.run_id, "model")} >= {
        "model/model.safetensors", "model/tokenizer.json"}


def test_server_gone_for_good_fails_the_stage_loudly(server, monkeypatch):
    """Fault: the tracking server stops during a stage and does not come back. Guarantee: the
    stage raises once the client's retries are spent (bounded: here 2 retries, 1 s backoff);
    metrics are never dropped silently with the stage reported as done."""
    from mlflow.exceptions import MlflowException

    from tasks.tracking import log_metrics, stage_run

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    ctx = make_ctx(server.uri)
    t0 = time.monotonic()
    with pytest.raises(MlflowException, match="Max retries exceeded"):
        with stage_run(ctx, "sft"):
            log_metrics({"sft/loss": 1.0}, step=1)
            server.stop()
            log_metrics({"sft/loss": 0.9}, step=2)
            pytest.fail("logging to a stopped server returned normally")
    assert time.monotonic() - t0 < 60
