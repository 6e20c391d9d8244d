"""The data layer (dataio): one reader for JSONL, Parquet and `datasets` directories, strict
and tolerant, URIs, and TRL's formats."""

import datasets
import pandas as pd
import pytest

from dataio import DataError, content_hash, is_conversational, read_records, read_rows

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


def test_datasets_dict_without_train_split_is_refused(tmp_path):
    ds = datasets.Dataset.from_list([{"prompt": "a"}])
    datasets.DatasetDict({"test": ds}).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataError, match=r"rule dataset_split: .*'train' split, found \['test'\]"):
        read_records(str(tmp_path / "dd"))


def test_unsupported_scheme_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="s3://bucket/prefs.jsonl: rule uri_scheme: only local paths"):
        read_records("s3://bucket/prefs.jsonl")
    with pytest.raises(DataError, match="rule file_exists: file not found"):
        read_records(str(tmp_path / "nope.jsonl"))


BAD_JSONL = (b'{"prompt": "a"}\n'
             b'\n'                         # blank: skipped, keeps its number
             b'{"prompt": "caf\xe9"}\n'    # latin-1
             b'["not", "an", "object"]\n'
             b'{"prompt": \n'              # truncated
             b'{"prompt": "b"}\n')


def test_strict_read_stops_at_the_first_bad_row(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(BAD_JSONL)
    with pytest.raises(DataError) as exc:
        read_records(str(p))
    assert str(exc.value) == (f"{p}: row 3: rule utf8: not valid UTF-8 "
                              f"(invalid continuation byte at byte 15)")
    assert (exc.value.row, exc.value.rule) == (3, "utf8")


def test_tolerant_read_collects_every_bad_row_and_the_raw_lines(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(BAD_JSONL)
    rows = read_rows(str(p), strict=False)
    assert rows.records == [{"prompt": "a"}, {"prompt": "b"}] and rows.numbers == [1, 6]
    assert [(e.row, e.rule) for e in rows.errors] == [(3, "utf8"), (4, "json"), (5, "json")]
    assert rows.errors[1].message == "expected a JSON object, got list"
    assert sorted(rows.raw_lines) == [1, 3, 4, 5, 6]
    assert b"".join(rows.raw_lines.values()) == BAD_JSONL.replace(b"\n\n", b"\n")
