"""``s3://`` in the data layer against a real S3 endpoint (moto's server on a free port):
reading JSONL, Parquet and ``datasets`` directories through the ETag-keyed cache, content
hashes equal to the local file's, atomic writes, and refusals that name the URI."""

from __future__ import annotations

from pathlib import Path

import datasets
import pandas as pd
import pytest

from dataio import DataError, content_hash, local_path, read_records, write_jsonl_atomic
from flows.cli import main

DEMO = Path(__file__).resolve().parents[1] / "demo" / "data"


def test_jsonl_parquet_and_datasets_dir_read_like_local_files(s3_server, tmp_path):
    c, b = s3_server.client(), s3_server.bucket
    c.upload_file(str(DEMO / "eval_prompts.jsonl"), b, "t1/eval_prompts.jsonl")
    rows = [{"prompt": "The film is", "chosen": " great.", "rejected": " bad."}]
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    c.upload_file(str(tmp_path / "p.parquet"), b, "t1/p.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "ds")
    for f in (tmp_path / "ds").rglob("*"):
        if f.is_file():
            c.upload_file(str(f), b, f"t1/ds/{f.relative_to(tmp_path / 'ds').as_posix()}")

    uri = f"s3://{b}/t1/eval_prompts.jsonl"
    assert read_records(uri) == read_records(str(DEMO / "eval_prompts.jsonl"))
    # Same bytes, same hash: a dataset copied to S3 keeps its data.*.sha256 tags.
    assert content_hash(uri) == content_hash(str(DEMO / "eval_prompts.jsonl"))
    assert read_records(f"s3://{b}/t1/p.parquet") == rows
    assert read_records(f"s3://{b}/t1/ds") == rows == read_records(f"s3://{b}/t1/ds/")
    assert content_hash(f"s3://{b}/t1/ds") == content_hash(str(tmp_path / "ds"))

    # The cache is keyed by ETag: an unchanged object is the same local file, a new one is new.
    first = local_path(uri)
    assert local_path(uri) == first and first.is_relative_to(s3_server.env["RLHF_CACHE_DIR"])
    c.put_object(Bucket=b, Key="t1/eval_prompts.jsonl", Body=b'{"prompt": "changed"}\n')
    assert local_path(uri) != first and read_records(uri) == [{"prompt": "changed"}]


def test_write_jsonl_to_s3(s3_server):
    uri = f"s3://{s3_server.bucket}/t2/feedback/batch.jsonl"
    write_jsonl_atomic(uri, [{"pair_id": "p1", "prompt": "café"}], head=b'{"pair_id": "p0"}\n')
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key="t2/feedback/batch.jsonl")
    assert body["Body"].read() == '{"pair_id": "p0"}\n{"pair_id": "p1", "prompt": "café"}\n'.encode()
    assert read_records(uri) == [{"pair_id": "p0"}, {"pair_id": "p1", "prompt": "café"}]


def test_missing_bucket_key_and_credentials_are_named(s3_server, monkeypatch):
    b = s3_server.bucket
    with pytest.raises(DataError, match=r"^s3://no-such-bucket/x.jsonl: rule file_exists: "
                                        r"bucket 'no-such-bucket' does not exist$"):
        read_records("s3://no-such-bucket/x.jsonl")
    with pytest.raises(DataError, match=rf"^s3://{b}/nope.jsonl: rule file_exists: file not found"):
        read_records(f"s3://{b}/nope.jsonl")
    with pytest.raises(DataError, match=r"rule file_exists: bucket 'no-such-bucket'"):
        write_jsonl_atomic("s3://no-such-bucket/x.jsonl", [{"a": 1}])
    with pytest.raises(DataError, match=r"^s3://: rule uri_scheme: an S3 URI names a bucket"):
        read_records("s3://")
    with pytest.raises(DataError, match=r"^gs://b/x: rule uri_scheme: unsupported URI scheme"):
        read_records("gs://b/x")

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(DataError, match=rf"^s3://{b}/x.jsonl: rule s3_access: no AWS credentials"):
        read_records(f"s3://{b}/x.jsonl")


def test_cli_refuses_a_missing_s3_dataset_with_exit_2(s3_server, prefect_harness, capsys,
                                                      tmp_path):
    missing = f"s3://{s3_server.bucket}/absent/sft.jsonl"
    code = main(["validate", "--config", "configs/demo.yaml", "--set", f"data.sft={missing}",
                 "--set", f"output_dir={tmp_path}/runs"])
    out = capsys.readouterr()
    assert code == 2
    assert f"{missing}" in out.out + out.err and "file_exists" in out.out + out.err
    assert "Traceback" not in out.out + out.err
    assert s3_server.env["AWS_SECRET_ACCESS_KEY"] not in out.out + out.err


def test_labeling_an_s3_batch_needs_a_local_labels_file(s3_server, tmp_path):
    from labeling.server import open_server

    uri = f"s3://{s3_server.bucket}/t3/batch.jsonl"
    write_jsonl_atomic(uri, [{"pair_id": "p1", "prompt": "The film", "response_a": " good.",
                              "response_b": " bad."}])
    with pytest.raises(DataError, match=rf"^{uri}: rule uri_scheme: .*give --out LABELS"):
        open_server(uri, annotator="alice")
    server = open_server(uri, annotator="alice", out=str(tmp_path / "labels.jsonl"))
    try:
        assert server.session.progress()["total"] == 1
    finally:
        server.server_close()


def test_output_dir_is_a_local_folder_or_an_s3_prefix():
    from flows.config import ConfigError, load_config

    assert load_config("configs/demo.yaml", ["output_dir=s3://b/runs/"]).output_dir == "s3://b/runs"
    assert load_config("configs/demo.yaml", ["output_dir=file:///tmp/r"]).output_dir == "/tmp/r"
    with pytest.raises(ConfigError, match=r"output_dir: .*'gs://b/runs': output_dir is a local "
                                          r"folder or s3://bucket/prefix"):
        load_config("configs/demo.yaml", ["output_dir=gs://b/runs"])
    with pytest.raises(ConfigError, match=r"names a bucket"):
        load_config("configs/demo.yaml", ["output_dir=s3:///runs"])


def test_a_base_model_directory_on_s3_loads_from_its_cached_copy(s3_server):
    from dataio import openable
    from models.loading import load_causal_lm, load_tokenizer

    base = Path(__file__).resolve().parents[1] / "demo" / "base_model"
    for f in base.iterdir():
        s3_server.client().upload_file(str(f), s3_server.bucket, f"models/base/{f.name}")
    uri = f"s3://{s3_server.bucket}/models/base"
    local = openable(uri)
    assert sorted(p.name for p in Path(local).iterdir()) == sorted(p.name for p in base.iterdir())
    assert openable("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # hub ids pass through
    tok = load_tokenizer(local)
    assert tok("The acting")["input_ids"] == load_tokenizer(str(base))("The acting")["input_ids"]
    assert load_causal_lm(local).num_parameters() == load_causal_lm(str(base)).num_parameters()
