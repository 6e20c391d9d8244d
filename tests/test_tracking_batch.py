"""The parent run's data tags and headline metrics, written in batches, read back intact."""

from __future__ import annotations

from mlflow import MlflowClient

from tasks.tracking import PipelineRun


def test_record_and_tag_data_write_every_value(make_ctx):
    ctx = make_ctx("batch")
    client = MlflowClient(ctx.tracking_uri)
    run = PipelineRun(client, ctx)
    run.tag_data({"sft": "a" * 64, "preferences": "b" * 64})
    # more than one batch's worth, so the split is exercised
    metrics = {f"eval/m{i}": i / 7 for i in range(1203)}
    run.record("promoted", {**metrics, "gate/promoted": 1})
    data = client.get_run(ctx.parent_run_id).data
    assert data.tags["data.sft.sha256"] == "a" * 64
    assert data.tags["data.preferences.sha256"] == "b" * 64
    assert data.tags["rlhf.result"] == "promoted"
    assert data.metrics == {**metrics, "gate/promoted": 1.0}
    history = client.get_metric_history(ctx.parent_run_id, "eval/m1202")
    assert [(h.step, h.value) for h in history] == [(0, 1202 / 7)]
