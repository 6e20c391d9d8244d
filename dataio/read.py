"""One reader for JSONL files, Parquet files and ``datasets`` save_to_disk directories.

Two modes over the same parsing code:

- strict (``read_records``, the stages): the first line that is not UTF-8 or not one JSON
  object raises ``DataError`` naming file, row and rule (``utf8`` / ``json``);
- tolerant (``read_rows(uri, strict=False)``, the validation stage): every such line becomes
  a per-row parse error and reading goes on, so a report lists every bad line; the raw bytes
  of each JSONL line come back too, so quarantine can copy lines exactly as they were.

Row numbers are 1-based JSONL line numbers (blank lines are skipped but keep their number)
and 1-based record numbers for Parquet and ``datasets`` directories.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from dataio.uri import DataError, local_path


class ParseError(NamedTuple):
    row: int
    rule: str
    """``utf8`` or ``json`` (the validation report's rule names)."""
    message: str


@dataclass
class Rows:
    """What a read returns: the rows that parsed, with their row numbers, and the rest."""

    uri: str
    records: list[dict[str, Any]] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)
    """Row number of each record (see the module docstring)."""
    errors: list[ParseError] = field(default_factory=list)
    """Lines that could not be parsed (tolerant mode; strict mode raises at the first)."""
    raw_lines: dict[int, bytes] | None = None
    """JSONL only: row number -> the line's bytes, parsed or not (blank lines left out)."""


def read_rows(uri: str, *, strict: bool) -> Rows:
    """Rows of a JSONL file, a Parquet file or a ``datasets`` save_to_disk directory.

    Raises ``DataError`` if the dataset cannot be opened at all (rule ``file_exists``,
    ``uri_scheme``, ``dataset_split``), and in strict mode at the first unparsable line.
    """
    path = local_path(uri)
    if not path.exists():
        raise DataError(uri, "file not found", rule="file_exists")
    if path.is_dir() or path.suffix == ".parquet":
        records = _read_directory(uri, path) if path.is_dir() else _read_parquet(path)
        return Rows(uri, records, list(range(1, len(records) + 1)))
    rows = Rows(uri, raw_lines={})
    for i, raw, value, error in _jsonl_lines(path):
        rows.raw_lines[i] = raw
        if error is not None:
            if strict:
                raise DataError(uri, error.message, rule=error.rule, row=i)
            rows.errors.append(error)
        else:
            rows.records.append(value)
            rows.numbers.append(i)
    return rows


def read_records(uri: str) -> list[dict[str, Any]]:
    """The rows of a dataset, refusing it at the first bad line (what stages read)."""
    return read_rows(uri, strict=True).records


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes, dict | None, ParseError | None]]:
    """(row, raw bytes, parsed object or None, parse error or None) per non-blank line."""
    with path.open("rb") as f:
        for i, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield i, raw, None, ParseError(
                    i, "utf8", f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                yield i, raw, None, ParseError(
                    i, "json", f"not valid JSON ({e.msg}, column {e.colno})")
                continue
            if not isinstance(value, dict):
                yield i, raw, None, ParseError(
                    i, "json", f"expected a JSON object, got {type(value).__name__}")
                continue
            yield i, raw, value, None


def _read_directory(uri: str, path: Path) -> list[dict[str, Any]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(uri, f"a DatasetDict needs a 'train' split, found {sorted(ds)}",
                            rule="dataset_split")
        ds = ds["train"]
    return ds.to_list()


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    # Parquet list columns come back as numpy arrays; TRL formats expect lists (of dicts).
    return [{k: _plain(v) for k, v in row.items()}
            for row in pd.read_parquet(path).to_dict("records")]


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
