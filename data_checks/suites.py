"""Great Expectations suites, one per kind of data, run on the frames from ``frames.py``.

GX Core 1.x flow (ephemeral context -> pandas data source -> dataframe asset -> whole-dataframe
batch definition -> batch -> ``batch.validate(suite)``). The context is built once per process
and reused: building it and importing GX cost seconds, validating a frame costs little.
``great_expectations`` is imported only inside these functions (its import takes ~4.4 s).

Every expectation carries ``meta={"rule": <stable rule name>, "message": <template>}``; the
template's ``{values}`` is filled with the first distinct unexpected values.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import pandas as pd

from data_checks.frames import Spec
from data_checks.report import Failure

_LOCK = threading.Lock()
_BATCH_DEFINITION = None
RESULT_FORMAT = {"result_format": "COMPLETE", "partial_unexpected_count": 5,
                 "return_unexpected_index_query": False}
FLAG_MESSAGES = {
    # Lone surrogates (broken escapes), U+FFFD (decoded with errors="replace" upstream) and
    # NUL, in any column: found by frames.load, which must repair them before pandas sees them.
    "valid_utf8_text": "{values}",
    "message_schema": "{values}",
    "chosen_differs_from_rejected": "chosen and rejected are identical",
    "duplicate_pairs": "duplicate pair: {values}",
    "contradictory_pairs": "contradictory pair: {values}",
    "prompt_leakage": "evaluation prompt leaks from training: {values}",
    "label_pair_exists": "{values}",
}


@dataclass(frozen=True)
class Limits:
    """The thresholds a suite needs (taken from ValidateConfig by the stage)."""

    min_rows: int
    max_prompt_tokens: int | None
    max_total_tokens: int | None
    min_chosen_first_share: float
    max_chosen_first_share: float


def _batch_definition():
    global _BATCH_DEFINITION
    if _BATCH_DEFINITION is None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = context.data_sources.add_pandas("rlhf_data")
        asset = source.add_dataframe_asset(name="dataset")
        _BATCH_DEFINITION = asset.add_batch_definition_whole_dataframe("whole")
    return _BATCH_DEFINITION


def build_suite(name: str, spec: Spec, df: pd.DataFrame, limits: Limits):
    """The GX suite for one dataset, given which columns it actually has."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name=f"{spec.suite}.{name}")

    def add(exp_cls, rule: str, message: str, **kwargs: Any) -> None:
        suite.add_expectation(exp_cls(**kwargs, meta={"rule": rule, "message": message}))

    cols = set(df.columns)
    add(gxe.ExpectTableRowCountToBeBetween, "min_rows",
        f"{{observed}} rows, need at least {limits.min_rows}", min_value=limits.min_rows)
    # An implicit prompt is derived from chosen and rejected: their own rules cover a missing
    # or null side, and an empty shared start gets its own message below.
    derived = {"prompt"} if spec.implicit_prompt else set()
    required = [c for c in [*spec.text_fields, *spec.required_columns] if c not in derived]
    needs = ", ".join(required) + (" (the prompt: a column, or implicit as the shared start of "
                                   "chosen and rejected)" if derived else "")
    # What the file has instead: a renamed column ("response" for "completion") is then plain.
    found = ", ".join(c for c in df.columns if not c.startswith("_") and "__" not in c) or "none"
    for col in required:
        if col not in cols:
            add(gxe.ExpectColumnToExist, "required_columns",
                f"column {col!r} is missing (suite {spec.suite} needs {needs}; found {found})",
                column=col)
        else:
            add(gxe.ExpectColumnValuesToNotBeNull, "not_null", f"{col} is missing or null",
                column=col)
    for col in spec.text_fields:
        if col not in cols:
            continue
        add(gxe.ExpectColumnValuesToBeInSet, "column_type",
            f"{col} is {{values}}, expected str or a list of messages",
            column=f"{col}__type", value_set=["str", "messages"])
        add(gxe.ExpectColumnValuesToMatchRegex, "non_empty_text",
            "implicit prompt (the shared start of chosen and rejected) is empty or whitespace "
            "only" if col in derived
            else f"{col} is empty or whitespace only", column=f"{col}__text", regex=r"\S")
    for col, allowed in spec.extra_columns.items():
        if col in cols:
            add(gxe.ExpectColumnValuesToBeInSet, "column_type",
                f"{col} is {{values}}, expected {' or '.join(allowed)}",
                column=f"{col}__type", value_set=list(allowed))
    if "_format" in cols:
        formats = df["_format"].value_counts()
        formats = formats[formats.index.isin(["standard", "conversational"])]
        if len(formats):
            major = str(formats.index[0])
            add(gxe.ExpectColumnValuesToBeInSet, "consistent_format",
                f"row is {{values}}, the file is {major} (TRL format)",
                column="_format", value_set=[major])
    if limits.max_prompt_tokens is not None and "_prompt_tokens" in cols:
        add(gxe.ExpectColumnValuesToBeBetween, "max_prompt_tokens",
            f"prompt has {{values}} tokens, limit {limits.max_prompt_tokens}",
            column="_prompt_tokens", max_value=limits.max_prompt_tokens)
    if limits.max_total_tokens is not None and "_total_tokens" in cols:
        add(gxe.ExpectColumnValuesToBeBetween, "max_total_tokens",
            f"prompt + response has {{values}} tokens, limit {limits.max_total_tokens}",
            column="_total_tokens", max_value=limits.max_total_tokens)
    for rule, message in FLAG_MESSAGES.items():
        if f"_flag_{rule}" in cols:
            add(gxe.ExpectColumnValuesToBeNull, rule, message, column=f"_flag_{rule}")
    if "pair_id__key" in cols and spec.text_fields:
        add(gxe.ExpectColumnValuesToBeUnique, "unique_pair_id", "pair_id {values} is not unique",
            column="pair_id__key")
    if {"chosen_votes", "num_votes"} <= cols:
        add(gxe.ExpectColumnValuesToBeBetween, "vote_counts", "chosen_votes is {values} < 0",
            column="_chosen_votes", min_value=0)
        add(gxe.ExpectColumnPairValuesAToBeGreaterThanB, "vote_counts",
            "(num_votes, chosen_votes) = {values}: more chosen votes than votes",
            column_A="_num_votes", column_B="_chosen_votes", or_equal=True)
        add(gxe.ExpectColumnPairValuesAToBeGreaterThanB, "chosen_is_majority",
            "(2 x chosen_votes, num_votes) = {values}: chosen has less than half the votes",
            column_A="_chosen_votes_x2", column_B="_num_votes", or_equal=True)
    if "preferred" in cols:
        add(gxe.ExpectColumnValuesToBeInSet, "label_values",
            "preferred is {values}, expected 'chosen' or 'rejected'",
            column="preferred", value_set=["chosen", "rejected"])
    if {"pair_id__key", "annotator_id__key"} <= cols and not spec.text_fields:
        add(gxe.ExpectCompoundColumnsToBeUnique, "unique_votes",
            "the same annotator labelled the same pair more than once: {values}",
            column_list=["pair_id__key", "annotator_id__key"],
            # A vote without a (well-typed) pair or annotator is not_null's or column_type's
            # to report; two of them on one pair are not the same annotator twice.
            ignore_row_if="any_value_is_missing")
    if "_chosen_first" in cols:
        add(gxe.ExpectColumnMeanToBeBetween, "position_bias",
            f"chosen was the response shown first in {{observed}} of labels, outside "
            f"[{limits.min_chosen_first_share}, {limits.max_chosen_first_share}]",
            column="_chosen_first", min_value=limits.min_chosen_first_share,
            max_value=limits.max_chosen_first_share)
    return suite


def _short(v: Any, n: int = 80) -> str:
    if isinstance(v, dict):  # a compound key: name its columns as the file does
        v = {str(k).removesuffix("__key"): x for k, x in v.items()}
    s = repr(v) if not isinstance(v, str) else v
    return s if len(s) <= n else s[:n] + "..."


def _exception_message(info: dict[str, Any]) -> str | None:
    """The error GX caught while checking an expectation, if any. GX 1.24 reports it either
    at the top level (``raised_exception``) or per metric (``{metric id: {...}}``) when a
    metric function raised; the second form left the rule failing with no rows and no reason."""
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for v in info.values():
        if isinstance(v, dict) and v.get("raised_exception"):
            return str(v.get("exception_message"))
    return None


def validate(name: str, uri: str, spec: Spec, df: pd.DataFrame,
             limits: Limits) -> tuple[list[Failure], dict[str, Any]]:
    """Run the dataset's suite; failures name file, rows (1-based, from ``_row``) and rule."""
    with _LOCK:
        batch_definition = _batch_definition()  # the context must exist before a suite does
        suite = build_suite(name, spec, df, limits)
        batch = batch_definition.get_batch(batch_parameters={"dataframe": df})
        result = batch.validate(suite, result_format=RESULT_FORMAT)
    failures = []
    row_numbers = df["_row"].to_numpy()
    for r in result.results:
        if r.success:
            continue
        meta = r.expectation_config.meta or {}
        rule, template = meta.get("rule", "unknown"), meta.get("message", "")
        error = _exception_message(r.exception_info or {})
        if error is not None:
            failures.append(Failure(name, uri, rule, f"could not be checked: {error[:300]}"))
            continue
        res = r.result or {}
        if "unexpected_index_list" in res:
            idx = res.get("unexpected_index_list") or []
            rows = sorted(int(row_numbers[i]) for i in idx)
            values = list(dict.fromkeys(_short(v) for v in res.get("unexpected_list") or []))
            message = template.format(values=", ".join(values[:3]), observed="")
            failures.append(Failure(name, uri, rule, message, rows=rows,
                                    count=int(res.get("unexpected_count", len(rows))),
                                    examples=values[:5]))
        else:
            observed = res.get("observed_value")
            if isinstance(observed, float):
                observed = f"{observed:.1%}" if rule == "position_bias" else f"{observed:.3g}"
            failures.append(Failure(name, uri, rule, template.format(values="", observed=observed)))
    return failures, result.to_json_dict()
