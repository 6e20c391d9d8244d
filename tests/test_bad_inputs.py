"""A corpus of bad inputs, each refused by the validation stage with the right rule named.

The corpus is generated into tmp_path from the DEFECTS table: a small valid dataset set
(``bad_corpus.base_rows``) with one defect applied, written as JSONL, Parquet and a `datasets`
directory wherever the defect can exist in that format (``bad_corpus.formats_of``). Each case
asserts the refusal names the rule (and the row, where the rule is row-level) and that no
input file changed by a single byte. The defects any file can have, in every role, are in
``test_bad_inputs_every_role.py``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import pytest

from bad_corpus import (CHAT_TEMPLATE, FORMATS, N, ROLES, TOKENIZER, base_rows, build_case,
                        formats_of, write_dataset)
from dataio import content_hash
from tasks.validation import DataValidationError, ValidationConfig, run_validation


def write_base(tmp_path: Path, rows: dict[str, list[dict]] | None = None,
               fmt: str = "jsonl") -> dict[str, str]:
    rows = rows or base_rows()
    return {name: write_dataset(tmp_path, name, rs, fmt) for name, rs in rows.items()}


# --- defects: each edits the rows (or the file bytes) of the valid base ----------------------

def _set(name: str, i: int, **fields) -> Callable:
    def edit(rows, data):
        rows[name][i].update(fields)
    return edit


def _drop_field(name: str, i: int, key: str) -> Callable:
    def edit(rows, data):
        del rows[name][i][key]
    return edit


def _drop_column(name: str, key: str) -> Callable:
    def edit(rows, data):
        for r in rows[name]:
            r.pop(key, None)
    return edit


def _raw(name: str, fn: Callable[[bytes], bytes]) -> Callable:
    """Edit the bytes of a file after it is written (encodings, truncation)."""
    def edit(rows, data):
        return name, fn
    return edit


def _truncate(b: bytes) -> bytes:
    return b[:-25]  # cut the last line mid-object, as an interrupted write would


def _replace_line(i: int, new: bytes) -> Callable[[bytes], bytes]:
    def fn(b: bytes) -> bytes:
        lines = b.splitlines(keepends=True)
        lines[i] = new
        return b"".join(lines)
    return fn


def _prefix_line(i: int, prefix: bytes) -> Callable[[bytes], bytes]:
    def fn(b: bytes) -> bytes:
        lines = b.splitlines(keepends=True)
        lines[i] = prefix + lines[i]
        return b"".join(lines)
    return fn


def _keep(name: str, n: int) -> Callable:
    def edit(rows, data):
        rows[name] = rows[name][:n]
    return edit


def _duplicate(name: str, i: int, j: int) -> Callable:
    def edit(rows, data):
        rows[name][j] = dict(rows[name][i])
    return edit


def _same_texts(i: int) -> Callable:
    def edit(rows, data):
        rows["preferences"][i]["rejected"] = rows["preferences"][i]["chosen"]
    return edit


def _swap(i: int, j: int) -> Callable:
    def edit(rows, data):
        a = rows["preferences"][i]
        rows["preferences"][j].update(prompt=a["prompt"], chosen=a["rejected"],
                                      rejected=a["chosen"])
    return edit


def _leak(name: str, i: int) -> Callable:
    def edit(rows, data):
        rows[name][i]["prompt"] = "  TELL me about movie   number 7 "  # case/space differ
    return edit


def _careless(rows, data):
    """a3 votes on every pair and disagrees with the others every time."""
    rows["preference_labels"] += [
        {"pair_id": p["pair_id"], "annotator_id": "a3", "preferred": "rejected",
         "chosen_shown_first": i % 2 == 0} for i, p in enumerate(rows["preferences"])]


def _random_labels(rows, data):
    rng = random.Random(0)
    for r in rows["preference_labels"]:
        r["preferred"] = rng.choice(["chosen", "rejected"])


def _all_first(rows, data):
    for r in rows["preference_labels"]:
        r["chosen_shown_first"] = True


def _mixed_format(rows, data):
    rows["sft"][4]["prompt"] = [{"role": "user", "content": "hi there"}]
    rows["sft"][4]["completion"] = [{"role": "assistant", "content": "hello"}]


def _conversational_sft(rows, data):
    rows["sft"] = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                    "completion": [{"role": "assistant", "content": r["completion"]}]}
                   for r in rows["sft"]]


def _missing_file(rows, data):
    data["rl_prompts"] = str(Path(data["rl_prompts"]).with_name("nowhere.jsonl"))


# (case id, edit, expected rule, expected row or None for table-level rules, config overrides)
DEFECTS: list[tuple[str, str, Callable, str, int | None, dict]] = [
    ("truncated_jsonl", "preferences", _raw("preferences", _truncate), "json", N, {}),
    ("latin1_encoding", "sft", _raw("sft", lambda b: b.replace(b"part 3.", "caf\u00e9 3.".encode("latin-1"))),
     "utf8", 4, {}),
    ("utf16_file", "rl_prompts", _raw("rl_prompts", lambda b: b.decode().encode("utf-16")), "utf8", 1, {}),
    # A BOM starting the file is read past (test_bad_inputs_every_role); one inside is not.
    ("bom_inside_file", "eval_prompts", _raw("eval_prompts", _prefix_line(4, b"\xef\xbb\xbf")),
     "json", 5, {}),
    ("not_an_object", "sft", _raw("sft", _replace_line(2, b'["a", "b"]\n')), "json", 3, {}),
    ("garbage_line", "eval_pairs", _raw("eval_pairs", _replace_line(9, b"this is not json\n")), "json", 10, {}),
    ("missing_column", "preferences", _drop_column("preferences", "rejected"), "required_columns", None, {}),
    ("missing_labels_column", "preference_labels", _drop_column("preference_labels", "preferred"),
     "required_columns", None, {}),
    ("missing_field_in_row", "preferences", _drop_field("preferences", 6, "chosen"), "not_null", 7, {}),
    ("nan_value", "sft", _set("sft", 8, completion=float("nan")), "not_null", 9, {}),
    ("null_prompt", "rl_prompts", _set("rl_prompts", 2, prompt=None), "not_null", 3, {}),
    ("int_completion", "sft", _set("sft", 5, completion=5), "column_type", 6, {}),
    ("dict_prompt", "eval_prompts", _set("eval_prompts", 3, prompt={"text": "x"}), "column_type", 4, {}),
    ("string_votes", "preferences", _set("preferences", 2, chosen_votes="3"), "column_type", 3, {}),
    ("string_shown_first", "preference_labels", _set("preference_labels", 4, chosen_shown_first="yes"),
     "column_type", 5, {}),
    ("empty_completion", "sft", _set("sft", 1, completion=""), "non_empty_text", 2, {}),
    ("whitespace_chosen", "preferences", _set("preferences", 3, chosen="  \n\t"), "non_empty_text", 4, {}),
    ("lone_surrogate", "sft", _set("sft", 7, completion="broken \ud800 text"), "valid_utf8_text", 8, {}),
    ("replacement_char", "eval_pairs", _set("eval_pairs", 2, rejected="caf\ufffd au lait"),
     "valid_utf8_text", 3, {}),
    ("nul_char", "rl_prompts", _set("rl_prompts", 9, prompt="tell me\x00 more"), "valid_utf8_text", 10, {}),
    ("huge_row", "sft", _set("sft", 10, completion=" great" * 50_000), "max_total_tokens", 11, {}),
    ("long_prompt", "rl_prompts", _set("rl_prompts", 11, prompt="word " * 40), "max_prompt_tokens", 12,
     {"max_prompt_tokens": 24}),
    ("chosen_equals_rejected", "preferences", _same_texts(16),
     "chosen_differs_from_rejected", 17, {}),
    ("duplicate_pair", "preferences", _duplicate("preferences", 3, 20), "duplicate_pairs", 21, {}),
    ("contradictory_pair", "preferences", _swap(4, 22), "contradictory_pairs", 23, {}),
    ("duplicate_pair_id", "eval_pairs", _set("eval_pairs", 12, pair_id="e003"), "unique_pair_id", 13, {}),
    ("votes_exceed_total", "preferences", _set("preferences", 8, chosen_votes=4), "vote_counts", 9, {}),
    ("negative_votes", "eval_pairs", _set("eval_pairs", 8, chosen_votes=-1), "vote_counts", 9, {}),
    ("chosen_in_minority", "preferences", _set("preferences", 9, chosen_votes=1), "chosen_is_majority", 10, {}),
    ("leak_eval_prompts", "eval_prompts", _leak("eval_prompts", 5), "prompt_leakage", 6, {}),
    ("leak_eval_pairs", "eval_pairs", _leak("eval_pairs", 6), "prompt_leakage", 7, {}),
    ("too_few_rows", "rl_prompts", _keep("rl_prompts", 5), "min_rows", None, {}),
    ("empty_file", "eval_prompts", _keep("eval_prompts", 0), "min_rows", None, {}),
    ("bad_label_value", "preference_labels", _set("preference_labels", 7, preferred="A"), "label_values", 8, {}),
    ("duplicate_vote", "preference_labels", _set("preference_labels", 1, annotator_id="a0"), "unique_votes", 2, {}),
    ("unknown_pair", "preference_labels", _set("preference_labels", 10, pair_id="p999"), "label_pair_exists", 11, {}),
    ("chosen_always_first", "preference_labels", _all_first, "position_bias", None, {}),
    ("careless_annotator", "preference_labels", _careless, "annotator_quality", None,
     {"flagged_annotator_is_error": True}),
    ("random_labels", "preference_labels", _random_labels, "annotator_agreement", None, {}),
    ("bad_message_role", "sft", _set("sft", 12, prompt=[{"role": "bot", "content": "hi"}],
                              completion=[{"role": "assistant", "content": "yo"}]),
     "message_schema", 13, {}),
    ("mixed_formats", "sft", _mixed_format, "consistent_format", 5, {}),
    ("missing_file", "rl_prompts", _missing_file, "file_exists", None, {}),
    ("no_chat_template", "sft", _conversational_sft, "chat_template", None, {}),
    ("bad_rows_beyond_quarantine_share", "sft", _set("sft", 3, completion=""), "non_empty_text", 4,
     {"quarantine": True, "max_bad_row_fraction": 0.0}),
]


# Every case in every format it can be written in (formats_of: byte edits and columns of
# mixed types exist only in JSONL; Parquet's own schema defects are in test_bad_inputs_every_role).
CASES = [pytest.param(*d, fmt, id=f"{d[0]}-{fmt}") for d in DEFECTS for fmt in formats_of(d[1], d[2])]


def test_corpus_has_enough_distinct_defects():
    assert len({case[0] for case in DEFECTS}) == len(DEFECTS) >= 30


@pytest.mark.parametrize("fmt", FORMATS)
def test_valid_base_passes(tmp_path, fmt):
    data = write_base(tmp_path, fmt=fmt)
    result = run_validation(ValidationConfig(), data=data, tokenizer_path=TOKENIZER,
                            out_dir=str(tmp_path / "out"), ctx=None)
    assert result.passed and set(result.hashes) == set(data) == set(ROLES)


@pytest.mark.parametrize("case, dataset, edit, rule, row, overrides, fmt", CASES)
def test_bad_input_is_refused(tmp_path, case, dataset, edit, rule, row, overrides, fmt):
    data = build_case(tmp_path, dataset, edit, fmt)
    before = {n: content_hash(u) for n, u in data.items() if Path(u).exists()}
    with pytest.raises(DataValidationError) as exc:
        run_validation(ValidationConfig(**overrides), data=data, tokenizer_path=TOKENIZER,
                       out_dir=str(tmp_path / "out"), ctx=None)
    msg = str(exc.value)
    assert f"rule {rule}:" in msg, msg
    errors = [f for f in exc.value.report.errors if f.rule == rule]
    assert errors, msg
    if row is not None:
        assert any(row in f.rows for f in errors), msg
        assert any(f"row {row}:" in line or f" {row}," in line or f" {row})" in line
                   for line in msg.splitlines() if f"rule {rule}:" in line), msg
    assert {n: content_hash(u) for n, u in data.items() if Path(u).exists()} == before
    assert (tmp_path / "out" / "validation" / "report.html").exists()


def test_every_format_holds_most_cases():
    """The Parquet and `datasets` runs are not an empty shell: most cases can be written there."""
    per_format = {fmt: sum(1 for c in CASES if c.values[-1] == fmt) for fmt in FORMATS}
    assert per_format["jsonl"] == len(DEFECTS) and per_format["parquet"] >= 25, per_format
    assert per_format["parquet"] == per_format["datasets"]


def test_chat_template_setting_admits_conversational_data(tmp_path):
    """The no_chat_template case again: the message says how to fix it, and the fix works
    (a template string or a .jinja file), down to the tokenizer the SFT stage loads."""
    from models.loading import load_tokenizer

    data = build_case(tmp_path, "sft", _conversational_sft)
    with pytest.raises(DataValidationError) as exc:
        run_validation(ValidationConfig(), data=data, tokenizer_path=TOKENIZER,
                       out_dir=str(tmp_path / "out"), ctx=None)
    assert (f"{data['sft']}: rule chat_template: conversational rows are rendered with a chat "
            f"template, and the tokenizer of {TOKENIZER} has none: set "
            f"base_model.chat_template") in str(exc.value)
    jinja = tmp_path / "chat.jinja"
    jinja.write_text(CHAT_TEMPLATE, encoding="utf-8")
    for template in (CHAT_TEMPLATE, str(jinja)):
        result = run_validation(ValidationConfig(), data=data, tokenizer_path=TOKENIZER,
                                chat_template=template, out_dir=str(tmp_path / "out"), ctx=None)
        assert result.passed
        assert load_tokenizer(TOKENIZER, chat_template=template).chat_template == CHAT_TEMPLATE
    with pytest.raises(DataValidationError, match=r"rule chat_template: base_model.chat_template: "
                                                  r"chat template file .*nowhere.jinja not found"):
        run_validation(ValidationConfig(), data=data, tokenizer_path=TOKENIZER,
                       chat_template=str(tmp_path / "nowhere.jinja"),
                       out_dir=str(tmp_path / "out"), ctx=None)


def test_sft_stage_trains_conversational_data_with_the_configured_template(tmp_path, make_ctx):
    """The crash this rule prevents, fixed by the setting: SFT renders the messages with
    ``base_model.chat_template`` and saves it with its tokenizer for the later stages."""
    from transformers import AutoTokenizer

    from tasks.base import BaseModelConfig
    from tasks.sft import SFTConfig, run_sft

    data = build_case(tmp_path, "sft", _conversational_sft)
    result = run_sft(SFTConfig(max_steps=2, per_device_train_batch_size=4, eval_fraction=0.0),
                     base_model=BaseModelConfig(path=TOKENIZER, chat_template=CHAT_TEMPLATE),
                     data_uri=data["sft"], out_dir=str(tmp_path / "sft"), seed=0,
                     ctx=make_ctx("sft_chat_template"))
    assert AutoTokenizer.from_pretrained(result.model_uri).chat_template == CHAT_TEMPLATE
