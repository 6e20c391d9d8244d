"""``output_dir: s3://bucket/prefix`` (tasks/outputs.py) against a real S3 endpoint (moto's
server on a free port): stage folders published with their record last, results carrying
``s3://`` URIs, Prefect's records on S3, and a tiny pipeline end to end whose unchanged
re-run reuses every stage from the bucket."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import BaseModel

from tasks.outputs import OutputRoot, S3ResultStorage


def _keys(s3_server, prefix: str) -> set[str]:
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(
        Bucket=s3_server.bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


class _Result(BaseModel):
    model_uri: str
    heldout_uri: str | None = None
    data: dict[str, str] = {}
    note: str = "hub/id"


def test_output_roots_local_and_s3(s3_server):
    local = OutputRoot.of("runs", "demo")
    assert local == OutputRoot(local=Path("runs/demo")) and local.uri("data") == "runs/demo/data"
    assert local.result_storage() == Path("runs/demo").resolve()
    remote = OutputRoot.of(f"s3://{s3_server.bucket}/team/runs", "demo")
    assert remote.remote == f"s3://{s3_server.bucket}/team/runs/demo"
    # The scratch folder lives in the cache, never under the working directory.
    assert remote.local.is_relative_to(s3_server.env["RLHF_CACHE_DIR"])
    assert remote.uri("data") == f"s3://{s3_server.bucket}/team/runs/demo/data"
    assert OutputRoot.of(f"s3://{s3_server.bucket}", "demo").remote == f"s3://{s3_server.bucket}/demo"


def test_publish_uploads_the_folder_and_its_siblings_and_rewrites_paths(s3_server):
    out = OutputRoot.of(f"s3://{s3_server.bucket}/p1", "demo")
    folder = out.local / "reward-abc"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\x01" * 16)
    (folder / "sub" / "x.json").write_text("{}")
    heldout = out.local / "reward-abc-heldout"  # the reward stage's sibling folder
    heldout.mkdir()
    (heldout / "model.safetensors").write_bytes(b"\x02" * 16)
    result = _Result(model_uri=str(folder), heldout_uri=str(heldout),
                     data={"prefs": str(folder / "sub" / "x.json"), "sft": "s3://other/sft.jsonl"})
    published = out.publish(result, folder)
    base = f"s3://{s3_server.bucket}/p1/demo"
    assert published.model_uri == f"{base}/reward-abc"
    assert published.heldout_uri == f"{base}/reward-abc-heldout"
    assert published.data == {"prefs": f"{base}/reward-abc/sub/x.json", "sft": "s3://other/sft.jsonl"}
    assert published.note == "hub/id"
    assert _keys(s3_server, "p1/demo/") == {
        "p1/demo/reward-abc/model.safetensors", "p1/demo/reward-abc/sub/x.json",
        "p1/demo/reward-abc-heldout/model.safetensors"}
    # Consumers get the cached local copy of what was published; other URIs pass through.
    local = out.localize({"model_uri": published.model_uri, "data_uri": "s3://other/sft.jsonl",
                          "seed": 3})
    assert out.localize(published.model_uri) == local["model_uri"]
    assert (Path(local["model_uri"]) / "sub" / "x.json").read_text() == "{}"
    assert local["data_uri"] == "s3://other/sft.jsonl" and local["seed"] == 3
    # A local output root changes nothing.
    assert OutputRoot.of("runs", "demo").publish(result, folder) is result


def test_prefect_result_storage_reads_and_writes_records_on_s3(s3_server):
    storage = S3ResultStorage(basepath=f"s3://{s3_server.bucket}/p2/demo")
    key = storage._resolve_path("sft-abc/result.json")
    assert key == f"s3://{s3_server.bucket}/p2/demo/sft-abc/result.json"
    storage.write_path(key, b'{"a": 1}', _sync=True)
    assert storage.read_path("sft-abc/result.json", _sync=True) == b'{"a": 1}'
    assert _keys(s3_server, "p2/") == {"p2/demo/sft-abc/result.json"}


def test_dataset_versions_are_written_to_s3(s3_server):
    from dataio import read_records
    from tasks.feedback import write_version

    data_dir = OutputRoot.of(f"s3://{s3_server.bucket}/p3", "demo").uri("data")
    rows = [{"pair_id": "a", "prompt": "p", "chosen": "c", "rejected": "r"}]
    version = write_version(None, rows, data_dir, "preferences")
    assert version.uri == f"{data_dir}/preferences-{version.sha256[:12]}.jsonl"
    assert read_records(version.uri) == rows
    # Content-addressed: the same rows are the same object, not written again.
    assert write_version(None, rows, data_dir, "preferences") == version


def test_pipeline_with_output_dir_on_s3_runs_and_reuses_every_stage_from_the_bucket(
        s3_server, prefect_harness, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from flows.config import load_config
    from flows.pipeline import rlhf_pipeline
    from tests.conftest import TINY

    stages = {"validation", "sft", "reward", "policy", "evaluate", "gate"}
    # A working directory holding only the demo (its config names paths relative to it).
    repo, cwd = Path(__file__).resolve().parents[1], tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "demo").symlink_to(repo / "demo")
    monkeypatch.chdir(cwd)
    cfg = load_config(str(repo / "configs" / "demo.yaml"),
                      TINY + [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                              f"output_dir=s3://{s3_server.bucket}/runs"])
    first = rlhf_pipeline(cfg)
    base = f"s3://{s3_server.bucket}/runs/{cfg.name}"
    assert first.policy_uri.startswith(base + "/policy-")
    assert first.sft_model_uri.startswith(base + "/sft-")
    assert first.reward_model_uri.startswith(base + "/reward-")
    keys = _keys(s3_server, f"runs/{cfg.name}/")
    folders = {k.split("/")[2] for k in keys}
    for stage in stages:
        done = [f for f in folders if f.startswith(f"{stage}-") and
                f"runs/{cfg.name}/{f}/result.json" in keys]
        assert len(done) == 1, (stage, sorted(folders))
    policy_folder = first.policy_uri.removeprefix(f"s3://{s3_server.bucket}/").rsplit("/", 1)[0]
    assert any(k.startswith(policy_folder + "/") and k.endswith(".safetensors") for k in keys)
    assert first.heldout_reward_uri is None or first.heldout_reward_uri.startswith(base)

    # Unchanged, with the local scratch gone (another machine): every stage found on S3.
    shutil.rmtree(OutputRoot.of(cfg.output_dir, cfg.name).local)
    again = rlhf_pipeline(cfg)
    assert set(again.reused) == stages
    assert again.metrics == first.metrics and again.policy_uri == first.policy_uri
    assert _keys(s3_server, f"runs/{cfg.name}/") == keys  # nothing added
    # Each reused stage points at the run of the first pipeline run that did the work.
    client = MlflowClient(again.tracking_uri)
    first_runs = client.search_runs(
        [client.get_run(first.parent_run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{first.parent_run_id}'")
    assert again.reused == {r.info.run_name: r.info.run_id for r in first_runs
                            if r.info.run_name in stages}
    assert again.candidate.policy_version == first.candidate.policy_version
    # Nothing under the working directory: stages wrote only into the scratch cache.
    assert [p.name for p in cwd.iterdir()] == ["demo"]
