"""Every bad file in every role and format: the defects any data file can have, applied to each
of the six data roles (sft, preferences, preference_labels, rl_prompts, eval_prompts,
eval_pairs) and written as JSONL, Parquet and a ``datasets`` directory from the same rows.

Each refusal names file, row and rule, and leaves the inputs byte-identical. Row-level
defects share a file per (role, format), each on its own row (one validation run checks them
all, and a defect missed or a row misreported fails the test naming it); defects of the whole
file get a run each. Also: exports that must be *read*, not refused (a UTF-8 BOM, CRLF line
endings), a 200 MB row refused without being held in memory, and Parquet files whose schema is
wrong. ``test_bad_inputs.py`` has the rules of particular roles (votes, leakage, agreement...).
"""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from bad_corpus import (FORMATS, N, NEEDS, ROLES, TOKENIZER, RawBytes, base_rows, jsonl_line,
                        write_dataset)
from dataio import content_hash, read_records, read_rows
from tasks.validation import DataValidationError, ValidationConfig, run_validation

# The string field each role's defects go into (preference labels have no text fields: their
# annotator id is the string a broken export breaks).
FIELD = {"sft": "completion", "preferences": "chosen", "preference_labels": "annotator_id",
         "rl_prompts": "prompt", "eval_prompts": "prompt", "eval_pairs": "rejected"}
TEXT_ROLES = tuple(r for r in ROLES if r != "preference_labels")
MAX_ROW = 4096  # max_row_bytes for the shared files: the oversized row is over it, no other
BOM = b"\xef\xbb\xbf"
DROP = object()  # a value edit that removes the key from the row


@dataclass(frozen=True)
class RowDefect:
    case: str
    row: int
    """1-based row the defect is put on (a JSONL line number, a Parquet record number)."""
    rule: str
    value: Callable[[Any], Any] | None = None
    """New value of the role's FIELD, from the old one (DROP: the key is left out)."""
    line: Callable[[bytes], bytes] | None = None
    """JSONL only: new bytes of the row's line, from the old ones."""
    formats: tuple[str, ...] = FORMATS
    roles: tuple[str, ...] = ROLES


ROW_DEFECTS = [
    RowDefect("null_value", 2, "not_null", value=lambda v: None),
    # In Parquet a key missing from one row is a null (the null_value case); only JSONL can omit it.
    RowDefect("missing_key", 4, "not_null", value=lambda v: DROP, formats=("jsonl",)),
    # A column has one type in Parquet: wrong types there are the whole-column schema cases below.
    RowDefect("object_instead_of_text", 6, "column_type", value=lambda v: {"text": v},
              formats=("jsonl",)),
    RowDefect("empty_text", 8, "non_empty_text", value=lambda v: "  \n", roles=TEXT_ROLES),
    RowDefect("nul_character", 10, "valid_utf8_text", value=lambda v: v + "\x00"),
    RowDefect("replacement_character", 12, "valid_utf8_text", value=lambda v: v + " caf\ufffd"),
    # json.dumps writes a lone surrogate as the escape \ud800 (what a broken exporter emits);
    # Arrow strings cannot hold one, so Parquet's version is the CESU-8 bytes below.
    RowDefect("lone_surrogate_escape", 14, "valid_utf8_text", value=lambda v: v + "\ud800",
              formats=("jsonl",)),
    RowDefect("latin1_bytes", 16, "utf8",
              value=lambda v: RawBytes(v.encode() + " caf\xe9".encode("latin-1"))),
    RowDefect("cesu8_surrogate_bytes", 18, "utf8", value=lambda v: RawBytes(v.encode() + b"\xed\xa0\x80")),
    RowDefect("oversized_row", 20, "max_row_bytes", value=lambda v: v + "x" * 2 * MAX_ROW),
    RowDefect("too_many_tokens", 22, "max_total_tokens", value=lambda v: v + " great" * 80,
              roles=TEXT_ROLES),
    RowDefect("not_an_object", 24, "json", line=lambda b: b'["a", "b"]\n', formats=("jsonl",)),
    RowDefect("garbage_line", 26, "json", line=lambda b: b"this is not json\n", formats=("jsonl",)),
    # Files concatenated from several exports: a BOM inside the file is not read past.
    RowDefect("bom_inside_file", 28, "json", line=lambda b: BOM + b, formats=("jsonl",)),
    RowDefect("truncated_last_line", None, "json", line=lambda b: b[:-12], formats=("jsonl",)),
]
# preference_labels has 3 votes per pair (3 * N rows); the rows above fit every role.


def _rows_of(role: str) -> int:
    return len(base_rows()[role])


def write_row_defects(directory: Path, role: str, fmt: str) -> tuple[dict[str, str], list]:
    """The role's file with every applicable row defect, plus the (valid) files it needs."""
    rows = base_rows()
    mine = rows[role]
    defects = [d for d in ROW_DEFECTS if fmt in d.formats and role in d.roles]
    expected = []
    for d in defects:
        row = d.row or len(mine)
        expected.append((d, row))
        if d.value is not None:
            record = mine[row - 1]
            new = d.value(record[FIELD[role]])
            if new is DROP:
                del record[FIELD[role]]
            else:
                record[FIELD[role]] = new
    data = {n: write_dataset(directory, n, rows[n], fmt) for n in (role, *NEEDS.get(role, ()))}
    lines = [d for d in defects if d.line is not None]
    if lines:
        path = Path(data[role])
        raw = path.read_bytes().splitlines(keepends=True)
        for d in lines:
            i = (d.row or len(raw)) - 1
            raw[i] = d.line(raw[i])
        path.write_bytes(b"".join(raw))
    return data, expected


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("role", ROLES)
def test_row_defects_are_refused_in_every_role_and_format(tmp_path, role, fmt):
    data, expected = write_row_defects(tmp_path, role, fmt)
    before = {n: content_hash(u) for n, u in data.items()}
    with pytest.raises(DataValidationError) as exc:
        run_validation(ValidationConfig(max_row_bytes=MAX_ROW), data=data,
                       tokenizer_path=TOKENIZER, out_dir=str(tmp_path / "out"), ctx=None)
    report, msg = exc.value.report, str(exc.value)
    missed = []
    for d, row in expected:
        found = [f for f in report.errors if f.rule == d.rule and row in f.rows
                 and f.file == data[role]]
        line_named = any(f"rule {d.rule}:" in ln and (f"row {row}:" in ln or f" {row}," in ln
                                                      or f" {row})" in ln)
                         for ln in msg.splitlines())
        if not (found and line_named):
            missed.append(f"{d.case}: rule {d.rule} at row {row}")
    assert not missed, f"not refused as expected: {missed}\n{msg}"
    # Nothing else broke: each error is one of the defects (the base rows are valid).
    rules = {d.rule for d, _ in expected}
    assert {f.rule for f in report.errors} <= rules, msg
    assert {n: content_hash(u) for n, u in data.items()} == before
    assert exc.value.report_path and Path(exc.value.report_path).exists()


# --- defects of a whole file: one validation run each --------------------------------------

WRONG_TYPE = {"sft": 7, "preferences": 7, "preference_labels": ("preferred", True),
              "rl_prompts": 7, "eval_prompts": 7, "eval_pairs": 7}
RENAMED = {"completion": "response", "chosen": "preferred_response", "annotator_id": "annotator",
           "prompt": "question", "rejected": "dispreferred"}


def _rename(role: str, rows: list[dict]) -> list[dict]:
    old = FIELD[role]
    return [{(RENAMED[old] if k == old else k): v for k, v in r.items()} for r in rows]


def _wrong_type(role: str, rows: list[dict]) -> list[dict]:
    """The whole column of another type: Parquet's schema says int64 (or bool) where a string
    column belongs."""
    spec = WRONG_TYPE[role]
    col, value = spec if isinstance(spec, tuple) else (FIELD[role], spec)
    return [{**r, col: value} for r in rows]


# (case, formats, rows edit, expected rule, rows expected in the refusal, text in the message)
FILE_DEFECTS: list[tuple[str, tuple[str, ...], Callable, str, bool, str]] = [
    ("renamed_column", FORMATS, _rename, "required_columns", False, "found"),
    ("wrong_column_type", FORMATS, _wrong_type, "column_type", True, "expected"),
    ("no_rows", FORMATS, lambda role, rows: [], "min_rows", False, "need at least"),
]


FILE_CASES = [pytest.param(case, edit, rule, has_rows, text, role, fmt, id=f"{case}-{role}-{fmt}")
              for case, formats, edit, rule, has_rows, text in FILE_DEFECTS
              for role in ROLES for fmt in formats]


@pytest.mark.parametrize("case, edit, rule, has_rows, text, role, fmt", FILE_CASES)
def test_file_defects_are_refused_in_every_role_and_format(tmp_path, case, edit, rule, has_rows,
                                                           text, role, fmt):
    rows = base_rows()
    rows[role] = edit(role, rows[role])
    data = {n: write_dataset(tmp_path, n, rows[n], fmt) for n in (role, *NEEDS.get(role, ()))}
    before = {n: content_hash(u) for n, u in data.items()}
    with pytest.raises(DataValidationError) as exc:
        run_validation(ValidationConfig(), data=data, tokenizer_path=TOKENIZER,
                       out_dir=str(tmp_path / "out"), ctx=None)
    mine = [f for f in exc.value.report.errors if f.rule == rule and f.file == data[role]]
    assert mine, str(exc.value)
    if has_rows:  # every row breaks it: the message counts them and names the first
        assert mine[0].count == len(rows[role]) and mine[0].rows[0] == 1
    line = next(ln for ln in str(exc.value).splitlines() if f"rule {rule}:" in ln)
    assert data[role] in line and text in line, line
    assert {n: content_hash(u) for n, u in data.items()} == before


def _unreadable(directory: Path, fmt: str, role: str) -> str:
    """A file the format's reader cannot open at all: a truncated Parquet file, a `datasets`
    directory whose .arrow shard is cut short, a directory of JSONL files."""
    directory.mkdir()
    if fmt == "jsonl_dir":
        write_dataset(directory, role, base_rows()[role], "jsonl")
        return str(directory)
    uri = write_dataset(directory, role, base_rows()[role], fmt)
    path = Path(uri) if fmt == "parquet" else next(Path(uri).glob("*.arrow"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return uri


@pytest.mark.parametrize("role", ROLES)
def test_missing_unreadable_and_utf16_files_are_refused(tmp_path, role):
    """Defects of the file itself, before any row: refused by the reader, in every role (no
    GX suite runs for a file that could not be read, so these cost little)."""
    cases = {"missing_jsonl": (str(tmp_path / "nowhere.jsonl"), "file_exists"),
             "missing_parquet": (str(tmp_path / "nowhere.parquet"), "file_exists"),
             "missing_datasets_dir": (str(tmp_path / "nowhere"), "file_exists")}
    for fmt in ("parquet", "datasets", "jsonl_dir"):
        cases[f"unreadable_{fmt}"] = (_unreadable(tmp_path / fmt, fmt, role), "file_format")
    utf16 = tmp_path / f"{role}.utf16.jsonl"
    utf16.write_bytes(b"".join(jsonl_line(r) for r in base_rows()[role]).decode().encode("utf-16"))
    cases["utf16_jsonl"] = (str(utf16), "utf8")
    for case, (uri, rule) in cases.items():
        before = content_hash(uri) if Path(uri).exists() else None
        with pytest.raises(DataValidationError) as exc:
            run_validation(ValidationConfig(), data={role: uri}, tokenizer_path=TOKENIZER,
                           out_dir=str(tmp_path / "out"), ctx=None)
        assert f"{uri}: " in str(exc.value) and f"rule {rule}:" in str(exc.value), (case, str(exc.value))
        if case == "utf16_jsonl":
            assert "row 1: rule utf8: the file is UTF-16" in str(exc.value)
        assert (content_hash(uri) if Path(uri).exists() else None) == before, case


# --- exports that must be read, not refused ----------------------------------------------

def test_bom_and_crlf_exports_are_read_as_written(tmp_path):
    """Decision: a UTF-8 BOM starting a JSONL file (Excel, Windows PowerShell 5) and CRLF line
    endings are read, giving exactly the rows of the plain file, in every role; the file's
    content hash stays that of its own bytes, which are never rewritten."""
    rows = base_rows()
    data = {}
    for role in ROLES:
        plain = b"".join(jsonl_line(r) for r in rows[role])
        for name, raw in (("bom", BOM + plain), ("crlf", plain.replace(b"\n", b"\r\n")),
                          ("bom_crlf", BOM + plain.replace(b"\n", b"\r\n"))):
            path = tmp_path / f"{role}.{name}.jsonl"
            path.write_bytes(raw)
            assert read_records(str(path)) == rows[role], (role, name)
            assert read_rows(str(path), strict=False).raw_lines[1].startswith(
                BOM if "bom" in name else b"{")
        data[role] = str(tmp_path / f"{role}.bom_crlf.jsonl")
    before = {n: content_hash(u) for n, u in data.items()}
    result = run_validation(ValidationConfig(), data=data, tokenizer_path=TOKENIZER,
                            out_dir=str(tmp_path / "out"), ctx=None)
    assert result.passed and result.hashes == before
    assert {n: content_hash(u) for n, u in data.items()} == before


# --- a 200 MB row --------------------------------------------------------------------------

ROW_MB = 200


def _write_huge_row_jsonl(path: Path, rows: list[dict], at: int) -> None:
    """``rows`` as JSONL with a 200 MB completion on row ``at``, written in 1 MB pieces."""
    chunk = b"x" * (1 << 20)
    with path.open("wb") as f:
        for i, r in enumerate(rows, start=1):
            if i != at:
                f.write(jsonl_line(r))
                continue
            f.write(b'{"prompt": "' + r["prompt"].encode() + b'", "completion": "')
            for _ in range(ROW_MB):
                f.write(chunk)
            f.write(b'"}\n')


def test_a_200_mb_row_is_refused_without_holding_it(tmp_path):
    """The default max_row_bytes (16 MiB) refuses a 200 MB row by size: the reader never holds
    more than the limit of it (traced allocations stay far below one copy of the row), and the
    stage's refusal names file, row and rule."""
    path = tmp_path / "sft.jsonl"
    _write_huge_row_jsonl(path, base_rows()["sft"], at=7)
    assert path.stat().st_size > ROW_MB * 2**20
    before = content_hash(str(path))
    cfg = ValidationConfig()
    tracemalloc.start()
    try:
        rows = read_rows(str(path), strict=False, max_row_bytes=cfg.max_row_bytes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(e.row, e.rule) for e in rows.errors] == [(7, "max_row_bytes")]
    assert len(rows.records) == N - 1 and 7 not in rows.raw_lines
    assert peak < 3 * cfg.max_row_bytes < ROW_MB * 2**20 / 4, peak
    with pytest.raises(DataValidationError) as exc:
        run_validation(cfg, data={"sft": str(path)}, tokenizer_path=TOKENIZER,
                       out_dir=str(tmp_path / "out"), ctx=None)
    assert (f"{path}: row 7: rule max_row_bytes: row is {ROW_MB * 2**20 + 60:,} bytes"
            in str(exc.value)), str(exc.value)
    assert content_hash(str(path)) == before


def test_a_large_parquet_row_is_refused_before_python_sees_it(tmp_path):
    """The same rule on Arrow data: sizes are summed from the Arrow buffers (strings nested in
    lists of messages too), and the row is left out before any Python object is made of it."""
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"},
                          {"role": "assistant", "content": "x" * (5000 if i == 3 else 10)}]}
            for i in range(N)]
    uri = write_dataset(tmp_path, "sft", rows, "parquet")
    got = read_rows(uri, strict=False, max_row_bytes=4096)
    assert [(e.row, e.rule) for e in got.errors] == [(4, "max_row_bytes")]
    assert got.numbers == [i for i in range(1, N + 1) if i != 4]
    assert got.records == [r for i, r in enumerate(rows) if i != 3]
