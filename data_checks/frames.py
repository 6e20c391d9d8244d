"""Datasets as pandas frames, plus the helper columns the GX suites assert on.

Reading is tolerant: a JSONL line that is not UTF-8 or not a JSON object becomes a row-level
failure (rule ``utf8`` / ``json``) instead of stopping at the first one, so a report lists
every bad line and quarantine can set them aside. Row numbers (``_row``) are 1-based line
numbers for JSONL (blank lines keep their number) and 1-based record numbers otherwise.

Helper columns (all prefixed or suffixed so they never clash with data columns):
- ``<field>__type``   "str", "messages", or the Python type name; None where the value is null
- ``<field>__text``   the text (messages: their contents joined by newlines); None if not text
- ``<column>__key``   an optional column's value where its type is allowed, else None
- ``_format``         "standard" / "conversational" / "mixed" over the row's text fields
- ``_prompt_tokens``, ``_total_tokens``  token counts with the configured tokenizer
- ``_flag_<rule>``    a short reason string where a row breaks a cross-row rule, else None
  (cross-row and cross-file rules, and broken text in any column, are computed here with
  pandas; GX asserts the flags are null)

Preference files without a ``prompt`` column (TRL's implicit prompt) get one: the shared start
of chosen and rejected, split off as the stages split it, so every rule on prompts (leakage,
token limits, duplicate pairs) sees the prompt the stages will train on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dataio import is_conversational, read_rows, split_prompt

ROLES = {"system", "user", "assistant", "tool", "developer"}


@dataclass(frozen=True)
class Spec:
    """What a dataset name in the pipeline's data config holds."""

    suite: str
    """Name of the GX suite (one per kind of data)."""
    text_fields: tuple[str, ...]
    """Required text columns (TRL format), standard str or conversational messages."""
    extra_columns: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Optional columns and their allowed types, checked when present."""
    required_columns: tuple[str, ...] = ()
    """Required non-text columns."""
    implicit_prompt: bool = False
    """Preference data without a prompt column (TRL's implicit prompt, e.g. Anthropic HH):
    ``add_helpers`` splits the shared start of chosen and rejected off as ``prompt``, and the
    suite checks that derived prompt instead of requiring the column."""


PAIR_EXTRAS = {"pair_id": ("str", "int"), "chosen_votes": ("int",), "num_votes": ("int",)}
SPECS: dict[str, Spec] = {
    "sft": Spec("sft_demonstrations", ("prompt", "completion")),
    "preferences": Spec("preference_pairs", ("prompt", "chosen", "rejected"), PAIR_EXTRAS),
    "rl_prompts": Spec("rl_prompts", ("prompt",)),
    "eval_prompts": Spec("evaluation_prompts", ("prompt",)),
    "eval_pairs": Spec("evaluation_pairs", ("prompt", "chosen", "rejected"), PAIR_EXTRAS),
    "preference_labels": Spec(
        "feedback_labels", (),
        {"pair_id": ("str", "int"), "annotator_id": ("str", "int"), "preferred": ("str",),
         "chosen_shown_first": ("bool",)},
        required_columns=("pair_id", "annotator_id", "preferred")),
}
# SFT may also be TRL's conversational language-modeling format: {"messages": [...]}.
SFT_MESSAGES = Spec("sft_demonstrations", ("messages",))
PREFERENCE_NAMES = ("preferences", "eval_pairs")
TRAIN_PROMPT_SOURCES = ("sft", "preferences", "rl_prompts")
EVAL_NAMES = ("eval_prompts", "eval_pairs")


@dataclass
class Loaded:
    name: str
    uri: str
    frame: pd.DataFrame
    """Parsed rows (index 0..n-1) with ``_row``; helper columns are added later."""
    parse_errors: list[tuple[int, str, str]]
    """(row, rule, message) for lines that could not be parsed."""
    raw_lines: dict[int, bytes] | None
    """JSONL only: row -> raw bytes, so quarantine copies lines exactly as they were."""

    @property
    def total_rows(self) -> int:
        return len(self.frame) + len(self.parse_errors)


def load(name: str, uri: str, max_row_bytes: int | None = None) -> Loaded:
    """Read a dataset without modifying it (tolerant: bad lines become ``parse_errors``);
    raises DataError only if it cannot be opened.

    Strings with lone surrogates, U+FFFD or NUL, in any column and at any depth, are flagged
    (``_flag_valid_utf8_text``) and their surrogates replaced by U+FFFD in this in-memory
    copy: pandas 3 (Arrow strings), GX and the tokenizer cannot hold them, and a defect in an
    id column (preference labels have no text fields) must be refused, not crash a groupby.
    """
    rows = read_rows(uri, strict=False, max_row_bytes=max_row_bytes)
    # object dtype: pandas 3 would store text as Arrow strings, which reject lone surrogates
    # and coerce types we want to check.
    flags = [_repair_broken_strings(r) for r in rows.records]
    df = pd.DataFrame(rows.records, dtype=object) if rows.records else pd.DataFrame()
    df["_row"] = np.asarray(rows.numbers, dtype=np.int64)
    df["_flag_valid_utf8_text"] = pd.Series(flags, index=df.index, dtype=object)
    return Loaded(name, uri, df, list(rows.errors), rows.raw_lines)


BROKEN_TEXT = re.compile(r"[\ud800-\udfff\ufffd\x00]")
BROKEN_NAMES = {"\ufffd": "U+FFFD (text decoded with errors replaced upstream)",
                "\x00": "a NUL character"}


def _broken(text: str) -> str | None:
    m = BROKEN_TEXT.search(text)
    if m is None:
        return None
    c = m.group()
    return BROKEN_NAMES.get(c, f"a lone surrogate U+{ord(c):04X} (a broken \\u escape)")


def _repair_broken_strings(record: dict[str, Any]) -> str | None:
    """Why the first broken string of a record is broken (None if none is), repairing every
    lone surrogate of the record in place (only this parsed copy; files are never written)."""
    first: list[str] = []

    def visit(v: Any, where: str) -> Any:
        if isinstance(v, str):
            problem = _broken(v)
            if problem is None:
                return v
            if not first:
                first.append(f"{where} contains {problem}")
            return v.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        if isinstance(v, list):
            return [visit(x, f"{where}[{j}]") for j, x in enumerate(v)]
        if isinstance(v, dict):
            return {k: visit(x, f"{where}.{k}") for k, x in v.items()}
        return v

    for key in list(record):
        record[key] = visit(record[key], str(key))
    return first[0] if first else None


def spec_for(name: str, frame: pd.DataFrame) -> Spec:
    spec = SPECS[name]
    if name == "sft" and "messages" in frame.columns and "prompt" not in frame.columns:
        return SFT_MESSAGES
    if name in PREFERENCE_NAMES and "prompt" not in frame.columns:
        return dataclasses.replace(spec, implicit_prompt=True)
    return spec


def _is_null(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def value_type(v: Any) -> str | None:
    if _is_null(v):
        return None
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, str):
        return "str"
    if is_conversational(v):
        return "messages"
    if isinstance(v, (int, np.integer)):
        return "int"
    if isinstance(v, (float, np.floating)):
        return "int" if float(v).is_integer() else "float"  # pandas upcasts ints next to NaN
    return type(v).__name__


def _text(v: Any, kind: str | None) -> str | None:
    if kind == "str":
        return v
    if kind == "messages":
        return "\n".join(str(m.get("content", "")) for m in v)
    return None


def _message_problem(v: Any) -> str | None:
    for j, m in enumerate(v, start=1):
        if m.get("role") not in ROLES:
            return f"message {j}: role {m.get('role')!r} is not one of {sorted(ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"message {j}: content is {type(m.get('content')).__name__}, expected str"
    return None


def prompt_key(text: str) -> str:
    """Prompt identity for leakage: case and whitespace do not make a prompt new."""
    return " ".join(text.split()).casefold()


def add_helpers(loaded: Loaded, spec: Spec, tokenizer=None) -> pd.DataFrame:
    """Add the per-row helper columns of one dataset (types, texts, format, tokens, flags)."""
    df = loaded.frame
    n = len(df)
    if spec.implicit_prompt and {"chosen", "rejected"} <= set(df.columns):
        _split_implicit_prompt(df)
    for col in [*spec.text_fields, *spec.extra_columns]:
        if col not in df.columns:
            continue
        values = df[col].tolist()
        kinds = [value_type(v) for v in values]
        df[f"{col}__type"] = pd.Series(kinds, index=df.index, dtype=object)
        if col in spec.extra_columns:
            # Ids and labels of an allowed type, else None: uniqueness checks hash their values,
            # and a dict or list there (reported by column_type) must not break them.
            allowed = spec.extra_columns[col]
            df[f"{col}__key"] = pd.Series([v if k in allowed else None
                                           for v, k in zip(values, kinds)],
                                          index=df.index, dtype=object)
        if col in spec.text_fields:
            texts = [_text(v, k) for v, k in zip(values, kinds)]
            df[f"{col}__text"] = pd.Series(texts, index=df.index, dtype=object)
            problems = [_message_problem(v) if k == "messages" else None
                        for v, k in zip(values, kinds)]
            df["_flag_message_schema"] = _merge_flags(df.get("_flag_message_schema"), problems, n)
    present = [c for c in spec.text_fields if c in df.columns]
    if present:
        kinds = df[[f"{c}__type" for c in present]]
        is_msg = (kinds == "messages").any(axis=1)
        is_str = (kinds == "str").any(axis=1)
        fmt = np.where(is_msg & is_str, "mixed", np.where(is_msg, "conversational",
                                                          np.where(is_str, "standard", None)))
        df["_format"] = pd.Series(fmt, index=df.index, dtype=object)
    if tokenizer is not None and present:
        _add_token_counts(df, present, tokenizer)
    if {"prompt", "chosen", "rejected"} <= set(present):
        _add_pair_flags(df)
    if {"chosen_votes", "num_votes"} <= set(df.columns):
        for col in ("chosen_votes", "num_votes"):  # numbers only; column_type reports the rest
            df[f"_{col}"] = pd.to_numeric(df[col].where(df[f"{col}__type"] == "int"),
                                          errors="coerce").astype(float)
        df["_chosen_votes_x2"] = df["_chosen_votes"] * 2
    if "chosen_shown_first" in df.columns:
        df["_chosen_first"] = df["chosen_shown_first"].map(
            lambda v: float(v) if isinstance(v, bool) else np.nan).astype(float)
    return df


def _split_implicit_prompt(df: pd.DataFrame) -> None:
    """``prompt`` = the shared start of chosen and rejected, which keep the rest, as the
    stages split it (``dataio.split_prompt``). Rows whose two sides are not both text or both
    messages keep them whole and get a null prompt: their own rules report them."""
    parts = [split_prompt(c, r) or (None, c, r)
             for c, r in zip(df["chosen"].tolist(), df["rejected"].tolist())]
    for j, col in enumerate(("prompt", "chosen", "rejected")):
        df[col] = pd.Series([p[j] for p in parts], index=df.index, dtype=object)


def uses_messages(df: pd.DataFrame, spec: Spec) -> bool:
    """Whether any row holds conversational text (after ``add_helpers``): such rows are
    rendered with the tokenizer's chat template by every stage that reads them."""
    return any((df[f"{c}__type"] == "messages").any()
               for c in spec.text_fields if f"{c}__type" in df.columns)


def _merge_flags(existing, new: list, n: int) -> pd.Series:
    if existing is None:
        return pd.Series(new, dtype=object, index=range(n))
    return pd.Series([a if a is not None else b for a, b in zip(existing.tolist(), new)],
                     dtype=object, index=existing.index)


class TokenCounter:
    """Token counts with the configured tokenizer, without special tokens.

    A local directory with ``tokenizer.json`` is read with the ``tokenizers`` library directly:
    the same Rust tokenizer transformers wraps, without importing torch and transformers
    (~5 s) and with ``encode_batch_fast`` (no offsets). Anything else (a hub id) goes through
    ``models.loading.load_tokenizer``.
    """

    def __init__(self, path: str):
        from pathlib import Path

        local = Path(path) / "tokenizer.json"
        self._fast = None
        self._hf = None
        self.model_max_length: int | None = None
        self.has_chat_template = False
        """Whether the tokenizer brings a chat template (conversational data needs one)."""
        if local.exists():
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_file(str(local))
            # tokenizer.json may carry padding/truncation settings from its last use (the demo's
            # pads to 64): counting needs neither, and truncation would hide long rows.
            self._fast.no_padding()
            self._fast.no_truncation()
            cfg = Path(path) / "tokenizer_config.json"
            config = json.loads(cfg.read_text()) if cfg.exists() else {}
            self.model_max_length = config.get("model_max_length")
            # Where transformers 5 looks (tokenization_utils_base.from_pretrained): the
            # chat_template.jinja file, additional_chat_templates/*.jinja, then the config entry.
            self.has_chat_template = bool(
                (Path(path) / "chat_template.jinja").is_file()
                or any((Path(path) / "additional_chat_templates").glob("*.jinja"))
                or config.get("chat_template"))
        else:
            from models.loading import load_tokenizer

            self._hf = load_tokenizer(path)
            self.model_max_length = getattr(self._hf, "model_max_length", None)
            self.has_chat_template = bool(getattr(self._hf, "chat_template", None))

    def count(self, texts: list[str]) -> list[int]:
        if self._fast is not None:
            encode = getattr(self._fast, "encode_batch_fast", self._fast.encode_batch)
            return [len(e.ids) for e in encode(texts, add_special_tokens=False)]
        return [len(ids) for ids in self._hf(texts, add_special_tokens=False)["input_ids"]]


def _count_tokens(texts: pd.Series, tokenizer) -> pd.Series:
    """Token counts of each text (NaN for None); each distinct text is tokenized once."""
    uniq = pd.unique(texts.dropna())
    counts = {}
    if len(uniq):
        counts = dict(zip(uniq, tokenizer.count(list(uniq))))
    # A plain loop, not Series.map(dict): pandas would build an Arrow string index from the
    # dict's keys, which fails on text with lone surrogates.
    return pd.Series([counts.get(t, np.nan) if isinstance(t, str) else np.nan for t in texts],
                     index=texts.index, dtype=float)


def _add_token_counts(df: pd.DataFrame, present: list[str], tokenizer) -> None:
    # Conversational rows count the message contents only; the chat template adds a few
    # tokens per message, so keep a margin under the model's context for those.
    tokens = {c: _count_tokens(df[f"{c}__text"], tokenizer) for c in present}
    if "prompt" in tokens:
        df["_prompt_tokens"] = tokens["prompt"]
        answers = [tokens[c] for c in ("completion", "chosen", "rejected") if c in tokens]
        longest = pd.concat(answers, axis=1).max(axis=1) if answers else 0
        df["_total_tokens"] = tokens["prompt"] + longest
    else:  # {"messages": [...]}
        df["_total_tokens"] = tokens[present[0]]


def _add_pair_flags(df: pd.DataFrame) -> None:
    """chosen == rejected, duplicate pairs (keep the first), contradictory (swapped) pairs.

    Done in pandas rather than with ExpectSelectColumnValuesToBeUniqueWithinRecord: that
    expectation applies a Python function row by row (measured 8.9 s per 100k rows here),
    while the vectorised comparison is milliseconds; GX then asserts the flag column.
    """
    p, c, r = df["prompt__text"], df["chosen__text"], df["rejected__text"]
    ok = p.notna() & c.notna() & r.notna()
    same = ok & (c == r)
    df["_flag_chosen_differs_from_rejected"] = pd.Series(
        np.where(same, "chosen and rejected are identical", None), index=df.index, dtype=object)
    key = pd.DataFrame({"p": p, "c": c, "r": r, "_row": df["_row"]})[ok]
    first = key.drop_duplicates(["p", "c", "r"]).set_index(["p", "c", "r"])["_row"]
    first_row = pd.Series(first.reindex(pd.MultiIndex.from_frame(key[["p", "c", "r"]])).to_numpy(),
                          index=key.index)
    dup = first_row[first_row != key["_row"]]
    df["_flag_duplicate_pairs"] = pd.Series(None, index=df.index, dtype=object)
    df.loc[dup.index, "_flag_duplicate_pairs"] = [f"same prompt, chosen and rejected as row {int(x)}"
                                                  for x in dup]
    swapped = first.reindex(pd.MultiIndex.from_frame(key[["p", "r", "c"]])).to_numpy()
    swapped = pd.Series(swapped, index=key.index).dropna()
    swapped = swapped[~same.loc[swapped.index]]
    df["_flag_contradictory_pairs"] = pd.Series(None, index=df.index, dtype=object)
    df.loc[swapped.index, "_flag_contradictory_pairs"] = [
        f"row {int(x)} has the same prompt with chosen and rejected swapped" for x in swapped]


def add_cross_file_flags(frames: dict[str, pd.DataFrame], uris: dict[str, str]) -> None:
    """Prompt leakage (eval prompts seen in training files) and labels of unknown pairs."""
    seen: dict[str, str] = {}
    for name in TRAIN_PROMPT_SOURCES:
        df = frames.get(name)
        if df is None or "prompt__text" not in df.columns:
            continue
        sub = df[df["prompt__text"].notna()]
        keys = sub["prompt__text"].map(prompt_key)
        first = pd.Series(sub["_row"].to_numpy(), index=keys.to_numpy())
        first = first[~first.index.duplicated()]
        for k, row in first.items():
            seen.setdefault(k, f"{uris[name]} row {int(row)}")
    for name in EVAL_NAMES:
        df = frames.get(name)
        if df is None or "prompt__text" not in df.columns:
            continue
        keys = df["prompt__text"].map(lambda t: prompt_key(t) if isinstance(t, str) else None)
        df["_flag_prompt_leakage"] = keys.map(
            lambda k: f"prompt also in training data ({seen[k]})" if k in seen else None
        ).astype(object)
    labels = frames.get("preference_labels")
    if labels is not None and "pair_id" in labels.columns:
        known: set[str] = set()
        for name in ("preferences", "eval_pairs"):
            df = frames.get(name)
            if df is not None and "pair_id" in df.columns:
                known.update(df["pair_id"].dropna().astype(str))
        ids = labels["pair_id"].map(lambda v: None if _is_null(v) else str(v))
        labels["_flag_label_pair_exists"] = ids.map(
            lambda v: None if v is None or v in known else f"pair_id {v!r} is in no pairs file"
        ).astype(object)
