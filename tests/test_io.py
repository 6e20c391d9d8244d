"""Reading TRL-format datasets from JSONL, Parquet and `datasets` directories."""

import datasets
import pandas as pd
import pytest

from tasks.io import DataError, content_hash, is_conversational, read_records

CHAT = [{"role": "user", "content": "Review?"}, {"role": "assistant", "content": "Great."}]


def test_parquet_conversational_rows_are_plain_lists(tmp_path):
    p = tmp_path / "chat.parquet"
    pd.DataFrame({"messages": [CHAT], "n": [3]}).to_parquet(p)
    row = read_records(str(p))[0]
    assert row == {"messages": CHAT, "n": 3} and is_conversational(row["messages"])


def test_datasets_directory_and_jsonl_agree(tmp_path):
    rows = [{"prompt": "The film is", "chosen": " great.", "rejected": " bad."}]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "ds")
    (tmp_path / "d.jsonl").write_text('{"prompt": "The film is", "chosen": " great.", '
                                      '"rejected": " bad."}\n')
    assert read_records(str(tmp_path / "ds")) == rows == read_records(f"file://{tmp_path}/d.jsonl")
    assert len(content_hash(str(tmp_path / "ds"))) == 64


def test_unsupported_scheme_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="only local paths"):
        read_records("s3://bucket/prefs.jsonl")
    with pytest.raises(DataError, match="file not found"):
        read_records(str(tmp_path / "nope.jsonl"))
