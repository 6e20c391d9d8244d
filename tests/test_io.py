"""The data layer (dataio): one reader for JSONL, Parquet and `datasets` directories, strict
and tolerant, URIs, and TRL's formats."""

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from dataio import (DataError, content_hash, explicit_prompts, is_conversational, preference_rows,
                    read_records, read_rows, split_prompt)

SFT_STANDIN = str(Path(__file__).resolve().parents[1] / "demo" / "base_model")
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
    with pytest.raises(DataError, match="hdfs://nn/prefs.jsonl: rule uri_scheme: unsupported"):
        read_records("hdfs://nn/prefs.jsonl")
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
                              f"(invalid continuation byte at byte 15): latin-1 or cp1252 text in a "
                              f"UTF-8 file?")
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


# --- TRL formats: implicit prompts ----------------------------------------------------------

def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


HH = {"chosen": "\n\nHuman: Is the film good?\n\nAssistant: Yes, very.",
      "rejected": "\n\nHuman: Is the film good?\n\nAssistant: No."}
SPLIT_CASES = [
    HH,
    {"chosen": "The film is great.", "rejected": "The film is bad."},
    {"chosen": "Same start, then A", "rejected": "Same start, then B"},
    {"chosen": "Hi there", "rejected": "Hi there, friend"},  # one side is a prefix
    {"chosen": "identical", "rejected": "identical"},
    {"chosen": [_user("Sky?"), _assistant("Blue.")], "rejected": [_user("Sky?"), _assistant("Red.")]},
    {"chosen": [_user("a"), _assistant("b"), _user("c"), _assistant("d")],
     "rejected": [_user("a"), _assistant("b"), _user("c"), _assistant("e")]},
]


@pytest.mark.parametrize("example", SPLIT_CASES)
def test_split_prompt_matches_trl_extract_prompt(example):
    from trl.data_utils import extract_prompt

    expected = extract_prompt(example)
    assert split_prompt(example["chosen"], example["rejected"]) == (
        expected["prompt"], expected["chosen"], expected["rejected"])


def test_split_prompt_where_trl_fails():
    # TRL 1.16 raises UnboundLocalError on an empty side and wraps idx - 1 to the last
    # character on a first-character difference; here both give an empty prompt.
    assert split_prompt("", "b") == ("", "", "b")
    assert split_prompt("a ", "b") == ("", "a ", "b")
    assert split_prompt("text", [_assistant("x")]) is None  # not both text or both messages


def test_preference_rows_split_an_implicit_prompt():
    rows = preference_rows([{**HH, "chosen_votes": 3, "num_votes": 4, "pair_id": "p1"}],
                           "hh.jsonl", with_margin=True)
    assert rows == [{"prompt": "\n\nHuman: Is the film good?\n\nAssistant:",
                     "chosen": " Yes, very.", "rejected": " No.", "margin": 0.5}]
    chat = {"chosen": [_user("Sky?"), _assistant("Blue.")],
            "rejected": [_user("Sky?"), _assistant("Red.")]}
    assert preference_rows([chat], "chat.jsonl", with_margin=False) == [
        {"prompt": [_user("Sky?")], "chosen": [_assistant("Blue.")],
         "rejected": [_assistant("Red.")]}]
    explicit = {"prompt": "Q", "chosen": "A", "rejected": "B"}
    assert preference_rows([explicit], "x.jsonl", with_margin=False) == [explicit]


def test_explicit_prompts_keep_other_columns_and_name_the_bad_row():
    rows = explicit_prompts([{**HH, "num_votes": 3}], "hh.jsonl")
    assert rows[0]["num_votes"] == 3 and rows[0]["prompt"].endswith("Assistant:")
    with pytest.raises(DataError, match="hh.jsonl: row 2: rule consistent_format"):
        explicit_prompts([HH, {"chosen": "a", "rejected": None}], "hh.jsonl")


def test_reward_and_dpo_stages_train_on_the_split_pairs(tmp_path, make_ctx, monkeypatch):
    """Both stages on a tiny HH-style file (2 steps each, the demo model as the SFT policy):
    the rows their TRL trainers receive carry the split prompt."""
    import trl

    import tasks.reward
    from tasks.dpo import DPOSettings, run_dpo
    from tasks.reward import RewardConfig, run_reward

    hh = tmp_path / "hh.jsonl"
    hh.write_text("".join(json.dumps({
        "chosen": f"\n\nHuman: Movie {i}?\n\nAssistant: A{i} is fine.",
        "rejected": f"\n\nHuman: Movie {i}?\n\nAssistant: Z{i} is poor.",
        "chosen_votes": 2, "num_votes": 3}) + "\n" for i in range(16)))
    seen = {}

    def recording(trainer_cls, name):
        class Recording(trainer_cls):
            def __init__(self, *args, train_dataset, **kwargs):
                seen[name] = train_dataset[0]
                super().__init__(*args, train_dataset=train_dataset, **kwargs)
        return Recording

    make_trainer = tasks.reward.make_trainer_class
    monkeypatch.setattr(tasks.reward, "make_trainer_class",
                        lambda: recording(make_trainer(), "reward"))
    monkeypatch.setattr(trl, "DPOTrainer", recording(trl.DPOTrainer, "dpo"))
    ctx = make_ctx("implicit_prompt")
    rm = run_reward(RewardConfig(max_steps=2, per_device_train_batch_size=4, normalize_samples=0),
                    sft_model_uri=SFT_STANDIN, train_uri=str(hh), eval_uri=str(hh),
                    rl_prompts_uri=str(hh), out_dir=str(tmp_path / "rm"), seed=0, ctx=ctx)
    run_dpo(DPOSettings(max_steps=2, per_device_train_batch_size=4), sft_model_uri=SFT_STANDIN,
            preferences_uri=str(hh), out_dir=str(tmp_path / "dpo"), seed=0, ctx=ctx)
    split = {"prompt": "\n\nHuman: Movie 0?\n\nAssistant:", "chosen": " A0 is fine.",
             "rejected": " Z0 is poor."}
    assert seen["reward"] == {**split, "margin": pytest.approx(1 / 3)}
    assert seen["dpo"] == split
    assert rm.metrics["reward/eval_pairs"] == 16.0
