"""Stage 1: validate every dataset against its data contract before any training.

One GX suite per kind of data (``data_checks/suites.py``), helper columns for the rules that
span rows or files (``data_checks/frames.py``), annotator agreement (``data_checks/agreement.py``)
and one report (``data_checks/report.py``). A failing rule refuses the data: the stage logs the
report and raises ``DataValidationError`` naming file, rows and rule, so the flow stops before
SFT. Input files are only read. With ``quarantine`` on, rows that break row-level rules are
copied to ``<out_dir>/quarantine/`` and the rest to ``<out_dir>/clean/``, and the stage passes
only if the bad share is at most ``max_bad_row_fraction``; downstream stages then read the
URIs in ``ValidationResult.data``.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import prefect
from pydantic import Field

from data_checks.report import DatasetSummary, Failure, Report
from dataio import DataError, content_hash, openable, redact
from tasks.base import StageConfig, StageResult, TrackingContext
from tasks.refusal import Refusal, refusals_returned

if TYPE_CHECKING:  # data_checks.frames imports pandas: only when validation runs
    from data_checks.frames import Loaded

STAGE = "validation"
# Tokenizers report a huge sentinel (int(1e30)) as model_max_length when they know no limit.
NO_LIMIT = 1_000_000


class ValidationConfig(StageConfig):
    """Data contracts: thresholds of the validation stage (defaults pass the demo data)."""

    min_rows: int = Field(default=16, ge=0)
    """Fewest rows any dataset may have (after parsing)."""
    max_row_bytes: int | None = Field(default=16 * 2**20, ge=1)
    """Largest row in bytes (a JSONL line, or a Parquet/``datasets`` row's values); larger rows
    are refused (rule ``max_row_bytes``) without being read into memory. 16 MiB holds a
    128k-token conversation several times over; None: no limit."""
    min_rows_by_dataset: dict[str, int] = Field(default_factory=dict)
    """Per-dataset overrides of ``min_rows``, keyed by data config name (e.g. ``eval_prompts``)."""
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    """Longest prompt in tokens of the base model's tokenizer; None: no separate prompt limit."""
    max_total_tokens: int | None = Field(default=None, ge=1)
    """Longest prompt + response (completion, chosen or rejected) in tokens; None: the
    tokenizer's ``model_max_length`` when it states a real limit (64 for the demo model)."""
    min_chosen_first_share: float = Field(default=0.2, ge=0.0, le=1.0)
    """Position bias: least share of labels where chosen was the response shown first."""
    max_chosen_first_share: float = Field(default=0.8, ge=0.0, le=1.0)
    """Position bias: largest share of labels where chosen was shown first (1.0 = always)."""
    min_alpha: float = Field(default=0.2, ge=-1.0, le=1.0)
    """Least overall Krippendorff's alpha (nominal) of the preference labels. Preference labels
    agree less than classic coding tasks; 0.2 refuses labels near chance. The demo gives 0.41
    (0.63 without its careless annotator a4)."""
    min_annotator_agreement: float = Field(default=0.6, ge=0.0, le=1.0)
    """Flag an annotator who agrees with the majority of the other annotators of the same pairs
    on fewer than this share of votes (demo: a0-a3 0.83-0.89, a4 0.56)."""
    max_annotator_gap: float = Field(default=0.15, ge=0.0, le=1.0)
    """Flag an annotator whose agreement with the majority is this far below the median of the
    other annotators'."""
    min_annotator_votes: int = Field(default=20, ge=1)
    """Annotators with fewer scored votes are reported but never flagged (too little evidence)."""
    flagged_annotator_is_error: bool = False
    """Refuse the data when an annotator is flagged; default: report it as a warning."""
    quarantine: bool = False
    """Copy rows that break row-level rules to ``<out_dir>/quarantine/`` and go on with the
    rest (written to ``<out_dir>/clean/``), if their share is within ``max_bad_row_fraction``."""
    max_bad_row_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    """Largest share of bad rows per dataset that quarantine may set aside; 0 = refuse any."""


class ValidationResult(StageResult):
    """Datasets that passed: what to train on and the content hashes that key later stages."""

    data: dict[str, str]
    """Dataset name -> URI to train on: the original, or its clean copy under quarantine."""
    hashes: dict[str, str]
    """Dataset name -> sha256 of the original file's bytes."""
    report_uri: str
    passed: bool


class DataValidationError(Refusal):
    """A dataset broke its contract; ``str(e)`` names file, rows and rule, ``.report`` has it all."""

    def __init__(self, report: Report, report_path: str | None = None):
        self.report = report
        self.report_path = report_path
        msg = report.summary()
        if report_path:
            msg += f"\n  report: {report_path}"
        super().__init__(msg)

    @property
    def headline(self) -> str:
        """The count, the first violation and the report, on one line (a Prefect state message)."""
        first = self.report.errors[0].line() if self.report.errors else ""
        more = len(self.report.errors) - 1
        return (f"{self.report.summary().splitlines()[0]}: {first}"
                + (f" (and {more} more)" if more > 0 else "")
                + (f"; report: {self.report_path}" if self.report_path else ""))

    def __reduce__(self):  # picklable as Prefect result storage may need (args are not msg)
        return type(self), (self.report, self.report_path)


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    """The tokenizer is only read (token counts), so one per path and process is enough."""
    from data_checks.frames import TokenCounter

    return TokenCounter(openable(path))  # an s3:// base model: its cached local copy


def _limits(cfg: ValidationConfig, name: str, tokenizer):
    from data_checks.suites import Limits

    total = cfg.max_total_tokens
    if total is None and tokenizer is not None:
        limit = getattr(tokenizer, "model_max_length", None)
        total = int(limit) if limit and limit < NO_LIMIT else None
    return Limits(min_rows=cfg.min_rows_by_dataset.get(name, cfg.min_rows),
                  max_prompt_tokens=cfg.max_prompt_tokens, max_total_tokens=total,
                  min_chosen_first_share=cfg.min_chosen_first_share,
                  max_chosen_first_share=cfg.max_chosen_first_share)


def _agreement(cfg: ValidationConfig, frames: dict, uris: dict, report: Report) -> None:
    import pandas as pd

    from data_checks.agreement import annotator_agreement, votes_frame

    labels = frames.get("preference_labels")
    need = {"pair_id", "annotator_id", "preferred"}
    if labels is None or not need <= set(labels.columns):
        return
    pairs = [frames[n][["pair_id", "chosen", "rejected"]] for n in ("preferences", "eval_pairs")
             if n in frames and {"pair_id", "chosen", "rejected"} <= set(frames[n].columns)]
    if not pairs:
        return
    ok = labels[labels["preferred"].isin(["chosen", "rejected"])].dropna(subset=list(need))
    votes = votes_frame(ok, pd.concat(pairs))
    if votes.empty:
        return
    stats = annotator_agreement(votes, min_agreement=cfg.min_annotator_agreement,
                                max_gap=cfg.max_annotator_gap, min_votes=cfg.min_annotator_votes)
    report.agreement = {"alpha": stats.alpha, "pairs": stats.pairs,
                        "annotators": [a.__dict__ for a in stats.annotators]}
    uri = uris["preference_labels"]
    if not stats.alpha >= cfg.min_alpha:  # also refuses NaN (no pair with two votes)
        report.failures.append(Failure(
            "preference_labels", uri, "annotator_agreement",
            f"Krippendorff's alpha {stats.alpha:.3f} over {stats.pairs} pairs is below "
            f"min_alpha {cfg.min_alpha}"))
    for a in stats.flagged():
        report.failures.append(Failure(
            "preference_labels", uri, "annotator_quality", f"annotator {a.annotator!r} {a.reason}",
            severity="error" if cfg.flagged_annotator_is_error else "warning", count=a.votes))


def _chat_template(frames: dict, specs: dict, uris: dict, report: Report, *, tokenizer,
                   tokenizer_path: str | None, chat_template: str | None) -> None:
    """Conversational data needs a chat template: the tokenizer's, or ``base_model.chat_template``.

    Without one, training would stop in transformers ("tokenizer.chat_template is not set")
    after validation passed; refusing here names the file and says how to set one.
    """
    from data_checks.frames import uses_messages
    from models.loading import chat_template_text

    if chat_template is not None:
        try:
            chat_template_text(chat_template)
        except OSError as e:
            report.failures.append(Failure("base_model", chat_template, "chat_template",
                                           f"base_model.chat_template: {e}"))
        return
    conversational = [n for n, df in frames.items() if uses_messages(df, specs[n])]
    if not conversational:
        return
    if tokenizer is None:
        report.notes.append("conversational data: no tokenizer configured, so whether it has "
                            "a chat template was not checked")
        return
    if tokenizer.has_chat_template:
        return
    for name in conversational:
        report.failures.append(Failure(
            name, uris[name], "chat_template",
            f"conversational rows are rendered with a chat template, and the tokenizer of "
            f"{tokenizer_path} has none: set base_model.chat_template to a Jinja template "
            f"string or a path to a .jinja file (e.g. --set base_model.chat_template="
            f"templates/chat.jinja)"))


def _quarantine(cfg: ValidationConfig, loaded: Loaded, summary: DatasetSummary,
                failures: list[Failure], out_dir: Path) -> None:
    """Set bad rows aside when allowed; otherwise leave the failures as errors."""
    errors = [f for f in failures if f.severity == "error"]
    if not errors or not cfg.quarantine or any(not f.rows for f in errors):
        return  # table-level rules (min_rows, agreement, ...) cannot be fixed by dropping rows
    bad: dict[int, list[str]] = {}
    for f in errors:
        for r in f.rows:
            bad.setdefault(r, []).append(f.rule)
    total = max(loaded.total_rows, 1)
    if len(bad) / total > cfg.max_bad_row_fraction:
        return
    qdir, cdir = out_dir / "quarantine", out_dir / "clean"
    qdir.mkdir(parents=True, exist_ok=True)
    cdir.mkdir(parents=True, exist_ok=True)
    qpath, cpath = qdir / f"{loaded.name}.jsonl", cdir / f"{loaded.name}.jsonl"
    with (qpath.open("wb") as q, cpath.open("wb") as c,
          (qdir / f"{loaded.name}.reasons.jsonl").open("w", encoding="utf-8") as why):
        # JSONL: copy the bytes exactly as they were. A row over max_row_bytes was never read,
        # so it is in neither file; reasons.jsonl lists it.
        if loaded.raw_lines is not None:
            for row, raw in loaded.raw_lines.items():
                (q if row in bad else c).write(raw if raw.endswith(b"\n") else raw + b"\n")
        else:
            cols = [k for k in loaded.frame.columns if not k.startswith("_") and "__" not in k]
            for rec in loaded.frame[cols + ["_row"]].to_dict("records"):
                row = int(rec.pop("_row"))
                line = json.dumps(rec, ensure_ascii=False, default=str) + "\n"
                (q if row in bad else c).write(line.encode("utf-8"))
        for row in sorted(bad):
            why.write(json.dumps({"row": row, "rules": bad[row]}) + "\n")
    for f in errors:
        f.severity = "quarantined"
    summary.quarantine_path, summary.clean_path = str(qpath), str(cpath)


def _metric_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", s)


def _metrics(report: Report) -> dict[str, float]:
    m: dict[str, float] = {}
    for d in report.datasets:
        m[f"data/{d.name}/rows"] = d.rows
        m[f"data/{d.name}/bad_rows"] = d.bad_rows
    for f in report.failures:
        key = f"rules/{f.rule}/failures"
        m[key] = m.get(key, 0) + max(f.count, 1)
    m["rules/errors"] = len(report.errors)
    m["rules/warnings"] = len(report.warnings)
    if report.agreement:
        m["agreement/alpha"] = report.agreement["alpha"]
        for a in report.agreement["annotators"]:
            name = _metric_name(a["annotator"])
            m[f"agreement/{name}/agreement_with_majority"] = a["agreement_with_majority"]
            m[f"agreement/{name}/alpha_without"] = a["alpha_without"]
            m[f"agreement/{name}/flagged"] = float(a["flagged"])
    return {k: float(v) for k, v in m.items() if v == v}  # drop NaN


def _prefect_artifact(report: Report) -> None:
    """Markdown artifact, only inside a Prefect flow or task run (it needs a run to attach to)."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=report.to_markdown(), key="data-validation-report",
                             description="Data validation report (validation stage)")


def run_validation(cfg: ValidationConfig, *, data: dict[str, str | None],
                   tokenizer_path: str | None, out_dir: str, ctx: TrackingContext | None,
                   chat_template: str | None = None) -> ValidationResult:
    """Validate every dataset in ``data`` (name -> URI, names as in DataConfig).

    ``tokenizer_path`` and ``chat_template`` are the base model's (``base_model.path`` and
    ``base_model.chat_template``): they give the token limits and whether conversational data
    has a chat template to be rendered with. ``ctx`` None runs without MLflow (``rlhf
    validate``). Raises ``DataValidationError`` after writing (and logging) the report when
    any rule fails with severity error.
    """
    from data_checks import suites
    from data_checks.frames import SPECS, add_cross_file_flags, add_helpers, load, spec_for

    out = Path(out_dir) / STAGE
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    tokenizer = _tokenizer(tokenizer_path) if tokenizer_path else None
    if tokenizer is None:
        report.notes.append("no tokenizer configured: token length limits were not checked")

    uris = {k: v for k, v in data.items() if v}
    unknown = sorted(set(uris) - set(SPECS))
    if unknown:
        raise ValueError(f"validation: unknown dataset names {unknown}; known: {sorted(SPECS)}")
    loaded: dict[str, Loaded] = {}
    hashes: dict[str, str] = {}
    for name, uri in uris.items():
        try:
            loaded[name] = load(name, uri, max_row_bytes=cfg.max_row_bytes)
        except DataError as e:
            report.failures.append(Failure(name, uri, e.rule, e.message))
            continue
        hashes[name] = content_hash(uri)
    specs = {n: spec_for(n, l.frame) for n, l in loaded.items()}
    frames = {n: add_helpers(l, specs[n], tokenizer) for n, l in loaded.items()}
    add_cross_file_flags(frames, uris)
    _agreement(cfg, frames, uris, report)
    _chat_template(frames, specs, uris, report, tokenizer=tokenizer, tokenizer_path=tokenizer_path,
                   chat_template=chat_template)

    gx_results = {}
    for name, l in loaded.items():
        failures = [Failure(name, l.uri, rule, msg, rows=[row], count=1)
                    for row, rule, msg in l.parse_errors]
        found, gx_results[name] = suites.validate(name, l.uri, specs[name], frames[name],
                                                  _limits(cfg, name, tokenizer))
        failures += found
        summary = DatasetSummary(name, l.uri, specs[name].suite, l.total_rows, hashes[name])
        summary.bad_rows = len({r for f in failures if f.severity == "error" for r in f.rows})
        _quarantine(cfg, l, summary, failures + [f for f in report.failures if f.dataset == name],
                    out)
        report.datasets.append(summary)
        report.failures += failures

    report_path = out / "report.html"
    report_path.write_text(report.to_html(), encoding="utf-8")
    (out / "report.md").write_text(report.to_markdown(), encoding="utf-8")
    (out / "report.json").write_text(report.to_json(), encoding="utf-8")
    (out / "gx_results.json").write_text(json.dumps(gx_results, default=str), encoding="utf-8")
    metrics = _metrics(report)
    clean = {d.name: d.clean_path or d.file for d in report.datasets}
    _prefect_artifact(report)

    run_id = ""
    if ctx is not None:
        import mlflow

        from tasks.tracking import log_metrics, stage_run

        with stage_run(ctx, STAGE, cfg) as run:
            run_id = run.info.run_id
            mlflow.set_tags({f"data.{n}.sha256": h for n, h in hashes.items()})
            mlflow.set_tags({f"data.{n}.uri": redact(u) for n, u in uris.items()})
            log_metrics(metrics)
            mlflow.log_artifacts(str(out), "data_validation")
            for name, l in loaded.items():
                _log_input(ctx, run_id, name, l, hashes[name])
    if not report.passed:
        raise DataValidationError(report, str(report_path))
    return ValidationResult(stage=STAGE, run_id=run_id, metrics=metrics, data=clean,
                            hashes=hashes, report_uri=str(report_path), passed=report.passed)


def _log_input(ctx: TrackingContext, run_id: str, name: str, loaded: Loaded,
               sha256: str) -> None:
    """Dataset lineage in MLflow's inputs tab; the sha256 tags above are the contract."""
    import mlflow

    from tasks.tracking import log_dataset_input

    cols = [c for c in loaded.frame.columns if not c.startswith("_") and "__" not in c]
    try:
        log_dataset_input(ctx.tracking_uri, run_id, name, loaded.frame[cols], loaded.uri, sha256)
    except Exception as e:  # lineage is best effort: never fail validation over it
        mlflow.set_tag(f"data.{name}.log_input_error", str(e)[:250])


# Refused data comes back as the task's value (the flow's `accepted` raises it), so Prefect
# logs no traceback for it (tasks/refusal.py).
validation_task = prefect.task(name="validation")(refusals_returned(run_validation))
