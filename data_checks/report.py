"""The validation report: what failed (file, rows, rule), rendered as text, markdown and HTML.

The text form is what ``DataValidationError`` says and what ``rlhf validate`` prints; the HTML
page is the MLflow artifact (a self-contained stand-in for GX data docs, which would need a
file-backed GX context and a site build per run); the markdown is the Prefect artifact.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_ROWS_SHOWN = 5

# Stable rule names, used in messages, metrics and tests. Descriptions are the report's legend.
RULES: dict[str, str] = {
    "file_exists": "the file exists",
    "uri_scheme": "the dataset URI is a local path, file:// or s3://bucket/key",
    "s3_access": "the S3 endpoint answers and the AWS credentials may read/write the object",
    "dataset_split": "a `datasets` DatasetDict directory has a 'train' split",
    "file_format": "a .parquet file is Parquet, a directory is a `datasets` save_to_disk",
    "utf8": "each line (Parquet: each string) is valid UTF-8; a UTF-8 BOM may start a file",
    "json": "each line is one JSON object (CRLF line endings are fine)",
    "max_row_bytes": "each row is at most max_row_bytes bytes (larger ones are not read)",
    "min_rows": "the dataset has at least the configured number of rows",
    "required_columns": "the columns of the TRL format are present",
    "not_null": "required values are not null/NaN/missing",
    "column_type": "values have the expected type (text: str or a list of messages)",
    "message_schema": "conversational messages have a known role and str content",
    "consistent_format": "all rows use the same TRL format (standard or conversational)",
    "chat_template": "conversational data has a chat template (the tokenizer's or "
                     "base_model.chat_template)",
    "non_empty_text": "text fields contain non-whitespace text",
    "valid_utf8_text": "strings (any column) have no lone surrogates, U+FFFD replacement "
                       "characters or NUL",
    "max_prompt_tokens": "the prompt fits the configured token limit",
    "max_total_tokens": "prompt + response fits the configured token limit",
    "chosen_differs_from_rejected": "chosen and rejected differ",
    "duplicate_pairs": "no pair (prompt, chosen, rejected) appears twice",
    "contradictory_pairs": "no pair appears again with chosen and rejected swapped",
    "unique_pair_id": "pair ids are unique",
    "vote_counts": "0 <= chosen_votes <= num_votes",
    "chosen_is_majority": "chosen has at least half of the votes",
    "prompt_leakage": "evaluation prompts do not appear in training data",
    "label_values": "preferred is 'chosen' or 'rejected'",
    "unique_votes": "one vote per (pair, annotator)",
    "label_pair_exists": "labels refer to pairs in a pairs file",
    "position_bias": "chosen is not (almost) always the response shown first",
    "annotator_agreement": "overall Krippendorff's alpha is at least the configured minimum",
    "annotator_quality": "no annotator agrees far less than the others",
}


@dataclass
class Failure:
    dataset: str
    file: str
    rule: str
    message: str
    severity: str = "error"
    """"error" refuses the data, "warning" is reported only, "quarantined" was set aside."""
    rows: list[int] = field(default_factory=list)
    """1-based rows (JSONL line numbers) that break the rule; empty for table-level rules."""
    count: int = 0
    """Rows breaking the rule (may exceed len(rows) only if rows were capped)."""
    examples: list[str] = field(default_factory=list)

    def line(self) -> str:
        if not self.rows:
            where = ""
        elif self.count == 1:
            where = f"row {self.rows[0]}: "
        else:
            first = ", ".join(map(str, self.rows[:MAX_ROWS_SHOWN]))
            where = f"{self.count} rows (first {min(self.count, MAX_ROWS_SHOWN)}: {first}): "
        return f"{self.file}: {where}rule {self.rule}: {self.message}"


@dataclass
class DatasetSummary:
    name: str
    file: str
    suite: str
    rows: int
    sha256: str
    bad_rows: int = 0
    quarantine_path: str | None = None
    clean_path: str | None = None


@dataclass
class Report:
    datasets: list[DatasetSummary] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    agreement: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Failure]:
        return [f for f in self.failures if f.severity == "error"]

    @property
    def warnings(self) -> list[Failure]:
        return [f for f in self.failures if f.severity == "warning"]

    @property
    def passed(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        head = ("data validation passed" if self.passed else
                f"data validation failed: {len(self.errors)} rule violation(s) in "
                f"{len({f.file for f in self.errors})} file(s)")
        lines = [head]
        lines += [f"  {f.line()}" for f in self.errors]
        lines += [f"  warning: {f.line()}" for f in self.warnings]
        lines += [f"  quarantined: {f.line()}" for f in self.failures
                  if f.severity == "quarantined"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "datasets": [asdict(d) for d in self.datasets],
                "failures": [asdict(f) for f in self.failures], "agreement": self.agreement,
                "notes": self.notes}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_markdown(self) -> str:
        out = [f"# Data validation: {'PASSED' if self.passed else 'FAILED'}", "",
               "| dataset | file | suite | rows | bad rows | sha256 |", "|---|---|---|---|---|---|"]
        out += [f"| {d.name} | `{d.file}` | {d.suite} | {d.rows} | {d.bad_rows} | "
                f"`{d.sha256[:12]}` |" for d in self.datasets]
        if self.failures:
            out += ["", "| severity | file | rule | rows | message |", "|---|---|---|---|---|"]
            for f in self.failures:
                rows = ", ".join(map(str, f.rows[:MAX_ROWS_SHOWN])) + (
                    f" ... ({f.count})" if f.count > MAX_ROWS_SHOWN and f.rows else "")
                out.append(f"| {f.severity} | `{f.file}` | `{f.rule}` | {rows} | "
                           f"{f.message.replace('|', '/')} |")
        if self.agreement:
            out += ["", f"Krippendorff's alpha: **{self.agreement.get('alpha', float('nan')):.3f}**"
                    f" over {self.agreement.get('pairs', 0)} pairs", "",
                    "| annotator | votes | agreement with majority | alpha without | flagged |",
                    "|---|---|---|---|---|"]
            for a in self.agreement.get("annotators", []):
                out.append(f"| {a['annotator']} | {a['votes']} | "
                           f"{a['agreement_with_majority']:.3f} | {a['alpha_without']:.3f} | "
                           f"{'yes: ' + a['reason'] if a['flagged'] else ''} |")
        out += [f"\n_{n}_" for n in self.notes]
        return "\n".join(out) + "\n"

    def to_html(self) -> str:
        e = html.escape
        status = "PASSED" if self.passed else "FAILED"
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'><title>Data validation</title>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
            "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;"
            "vertical-align:top}.error{background:#fdd}.warning{background:#ffd}"
            ".quarantined{background:#def}code{font-size:90%}</style></head><body>",
            f"<h1>Data validation: {status}</h1>",
            "<h2>Datasets</h2><table><tr><th>dataset</th><th>file</th><th>suite</th>"
            "<th>rows</th><th>bad rows</th><th>sha256</th><th>quarantine</th></tr>"]
        for d in self.datasets:
            parts.append(f"<tr><td>{e(d.name)}</td><td><code>{e(d.file)}</code></td>"
                         f"<td>{e(d.suite)}</td><td>{d.rows}</td><td>{d.bad_rows}</td>"
                         f"<td><code>{d.sha256}</code></td>"
                         f"<td>{e(d.quarantine_path or '')}</td></tr>")
        parts.append("</table><h2>Failures</h2>")
        if not self.failures:
            parts.append("<p>None.</p>")
        else:
            parts.append("<table><tr><th>severity</th><th>file</th><th>rule</th><th>rows</th>"
                         "<th>message</th><th>examples</th></tr>")
            for f in self.failures:
                rows = ", ".join(map(str, f.rows[:20])) + (
                    f" ... ({f.count} in all)" if f.count > 20 and f.rows else "")
                ex = "<br>".join(f"<code>{e(x)}</code>" for x in f.examples)
                parts.append(f"<tr class='{f.severity}'><td>{f.severity}</td>"
                             f"<td><code>{e(f.file)}</code></td><td><code>{e(f.rule)}</code></td>"
                             f"<td>{rows}</td><td>{e(f.message)}</td><td>{ex}</td></tr>")
            parts.append("</table>")
        if self.agreement:
            parts.append(f"<h2>Annotator agreement</h2><p>Krippendorff's alpha (nominal): "
                         f"<b>{self.agreement.get('alpha', float('nan')):.3f}</b> over "
                         f"{self.agreement.get('pairs', 0)} pairs</p><table><tr><th>annotator"
                         "</th><th>votes</th><th>agreement with majority of others</th>"
                         "<th>alpha without</th><th>flag</th></tr>")
            for a in self.agreement.get("annotators", []):
                cls = " class='warning'" if a["flagged"] else ""
                parts.append(f"<tr{cls}><td>{e(a['annotator'])}</td><td>{a['votes']}</td>"
                             f"<td>{a['agreement_with_majority']:.3f}</td>"
                             f"<td>{a['alpha_without']:.3f}</td><td>{e(a['reason'])}</td></tr>")
            parts.append("</table>")
        parts.append("<h2>Rules</h2><table>")
        parts += [f"<tr><td><code>{k}</code></td><td>{e(v)}</td></tr>" for k, v in RULES.items()]
        parts.append("</table>")
        parts += [f"<p><i>{e(n)}</i></p>" for n in self.notes]
        parts.append("</body></html>")
        return "\n".join(parts)
