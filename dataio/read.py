"""One reader for JSONL files, Parquet files and ``datasets`` save_to_disk directories.

Two modes over the same parsing code:

- strict (``read_records``, the stages): the first line that is not UTF-8 or not one JSON
  object raises ``DataError`` naming file, row and rule (``utf8`` / ``json``);
- tolerant (``read_rows(uri, strict=False)``, the validation stage): every such line becomes
  a per-row parse error and reading goes on, so a report lists every bad line; the raw bytes
  of each JSONL line come back too, so quarantine can copy lines exactly as they were.

Row numbers are 1-based JSONL line numbers (blank lines are skipped but keep their number)
and 1-based record numbers for Parquet and ``datasets`` directories.

What real exports bring, and what the reader does with it:

- a UTF-8 byte-order mark at the start of a JSONL file (Excel, Windows PowerShell 5's
  ``Out-File -Encoding utf8``) is read past, as RFC 8259 section 8.1 allows a parser to; a
  BOM anywhere else (files concatenated from such exports) is refused by rule ``json``, and a
  UTF-16 file by rule ``utf8``, naming the row;
- CRLF line endings are JSON whitespace: read as LF (the raw bytes keep them);
- bytes that are not UTF-8 (latin-1 or cp1252 text pasted into a UTF-8 file, or invalid UTF-8
  in a Parquet string column) are refused by rule ``utf8`` at their row;
- a row larger than ``max_row_bytes`` is refused by rule ``max_row_bytes`` without being held
  in memory: a JSONL line is read at most ``max_row_bytes`` at a time and the rest skipped; an
  Arrow row's size is summed from its buffers before any Python object is made of it;
- a file that is not Parquet (or a directory that is not a ``datasets`` save) is refused by
  rule ``file_format``.
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
    """``utf8``, ``json`` or ``max_row_bytes`` (the validation report's rule names)."""
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
    """JSONL only: row number -> the line's bytes, parsed or not (blank lines and lines over
    ``max_row_bytes`` left out)."""


def read_rows(uri: str, *, strict: bool, max_row_bytes: int | None = None) -> Rows:
    """Rows of a JSONL file, a Parquet file or a ``datasets`` save_to_disk directory.

    Raises ``DataError`` if the dataset cannot be opened at all (rule ``file_exists``,
    ``uri_scheme``, ``dataset_split``, ``file_format``), and in strict mode at the first
    unreadable row. ``max_row_bytes``: rows above it become errors (rule ``max_row_bytes``;
    a JSONL row's size is its line without the line ending); None reads rows of any size.
    """
    path = local_path(uri)
    if not path.exists():
        raise DataError(uri, "file not found", rule="file_exists")
    if path.is_dir() or path.suffix == ".parquet":
        table = _open_directory(uri, path) if path.is_dir() else _open_parquet(uri, path)
        return _arrow_rows(uri, table, strict=strict, max_row_bytes=max_row_bytes)
    rows = Rows(uri, raw_lines={})
    for i, raw, value, error in _jsonl_lines(path, max_row_bytes):
        if raw is not None:
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


BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
SKIP_CHUNK = 1 << 20


def _lines(path: Path, max_row_bytes: int | None) -> Iterator[tuple[int, bytes | None, int]]:
    """(row, line bytes or None if too large, size without the line ending) per line.

    With a limit, at most ``max_row_bytes`` + 2 bytes (room for CRLF) of a line are ever held:
    a longer line is skipped in 1 MiB chunks, so a 200 MB row costs neither 200 MB nor time
    to parse it.
    """
    limit = None if max_row_bytes is None else max_row_bytes + 2
    with path.open("rb") as f:
        i = 0
        while raw := (f.readline() if limit is None else f.readline(limit)):
            i += 1
            size = len(raw.rstrip(b"\r\n"))
            if limit is not None and not raw.endswith(b"\n") and len(raw) == limit:
                while (chunk := f.readline(SKIP_CHUNK)):  # the rest of an oversized line
                    size += len(chunk.rstrip(b"\r\n"))
                    if chunk.endswith(b"\n"):
                        break
                raw = None
            elif max_row_bytes is not None and size > max_row_bytes:
                raw = None
            yield i, raw, size


def _jsonl_lines(path: Path, max_row_bytes: int | None
                 ) -> Iterator[tuple[int, bytes | None, dict | None, ParseError | None]]:
    """(row, raw bytes, parsed object or None, parse error or None) per non-blank line; raw is
    None for a line over ``max_row_bytes`` (never held whole)."""
    for i, raw, size in _lines(path, max_row_bytes):
        if raw is None:
            yield i, None, None, ParseError(
                i, "max_row_bytes", f"row is {size:,} bytes, over max_row_bytes "
                                    f"({max_row_bytes:,}); not read")
            continue
        if not raw.strip():
            continue
        text = raw[len(BOM):] if i == 1 and raw.startswith(BOM) else raw
        try:
            value = json.loads(text.decode("utf-8"))
        except UnicodeDecodeError as e:
            utf16 = i == 1 and raw.startswith(UTF16_BOMS)
            yield i, raw, None, ParseError(
                i, "utf8", "the file is UTF-16 (byte-order mark), not UTF-8: save it as UTF-8"
                if utf16 else f"not valid UTF-8 ({e.reason} at byte {e.start}): latin-1 or "
                              f"cp1252 text in a UTF-8 file?")
            continue
        except json.JSONDecodeError as e:
            yield i, raw, None, ParseError(
                i, "json", "starts with a byte-order mark (U+FEFF), which only the first line "
                           "may: files concatenated from several exports?"
                if e.msg.startswith("Unexpected UTF-8 BOM")
                else f"not valid JSON ({e.msg}, column {e.colno})")
            continue
        if not isinstance(value, dict):
            yield i, raw, None, ParseError(
                i, "json", f"expected a JSON object, got {type(value).__name__}")
            continue
        yield i, raw, value, None


def _open_directory(uri: str, path: Path):
    """The Arrow table of a ``datasets`` save_to_disk directory (its train split)."""
    import datasets
    import pyarrow as pa

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        # Whatever `datasets` raises for a directory it cannot load is about the user's files:
        # FileNotFoundError for a folder it did not write, Arrow errors for a truncated .arrow
        # file, IndexError for a dataset saved with no rows (datasets 5.2 writes no shard
        # then and cannot load it back: that one is an empty dataset, refused by min_rows).
        if _saved_without_shards(path):
            return pa.table({})
        raise DataError(uri, f"not a readable `datasets` save_to_disk directory "
                             f"({type(e).__name__}: {_first_line(e)})",
                        rule="file_format") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(uri, f"a DatasetDict needs a 'train' split, found {sorted(ds)}",
                            rule="dataset_split")
        ds = ds["train"]
    return ds.with_format("arrow")[:]  # the rows as one Arrow table (memory-mapped)


def _saved_without_shards(path: Path) -> bool:
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def _open_parquet(uri: str, path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(uri, f"not a readable Parquet file ({_first_line(e)})",
                        rule="file_format") from None
    # pandas' to_parquet may store a non-default index as columns: they are not data.
    index = (table.schema.pandas_metadata or {}).get("index_columns", [])
    return table.drop_columns([c for c in index if isinstance(c, str) and c in table.column_names])


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _arrow_rows(uri: str, table, *, strict: bool, max_row_bytes: int | None) -> Rows:
    """Records of an Arrow table, leaving out (as errors) rows too large or not UTF-8.

    Both are found on the Arrow buffers, before ``to_pylist``: a 200 MB row is then never
    copied into a Python string, and a string column with invalid UTF-8 (Arrow does not check
    it when reading Parquet) does not end in a UnicodeDecodeError half-way through.
    """
    import numpy as np

    errors: dict[int, ParseError] = {}
    if max_row_bytes is not None and table.num_rows:
        sizes = sum(_value_bytes(table.column(j).combine_chunks())
                    for j in range(table.num_columns))
        for i in np.flatnonzero(sizes > max_row_bytes).tolist():
            errors[i] = ParseError(i + 1, "max_row_bytes",
                                   f"row is {int(sizes[i]):,} bytes, over max_row_bytes "
                                   f"({max_row_bytes:,}); not read")
    for name in table.column_names:
        for i in _invalid_utf8_rows(table.column(name)):
            errors.setdefault(i, ParseError(i + 1, "utf8",
                                            f"column {name!r} holds bytes that are not valid UTF-8"))
    if strict and errors:
        first = errors[min(errors)]
        raise DataError(uri, first.message, rule=first.rule, row=first.row)
    keep = [i for i in range(table.num_rows) if i not in errors]
    if errors:
        import pyarrow as pa

        table = table.take(pa.array(keep, pa.int64()))
    return Rows(uri, table.to_pylist(), [i + 1 for i in keep],
                [errors[i] for i in sorted(errors)])


def _value_bytes(arr) -> "np.ndarray":
    """Bytes of each element of an Arrow array: string and binary payloads, fixed-width
    values, summed through lists and structs (offsets and validity bitmaps not counted)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    t = arr.type
    if pa.types.is_dictionary(t):
        arr, t = arr.dictionary_decode(), t.value_type
    if (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t)):
        return pc.binary_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) \
            or pa.types.is_map(t):
        parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        child = _value_bytes(arr.flatten())
        return np.bincount(parents, weights=child, minlength=len(arr)).astype(np.int64)
    if pa.types.is_struct(t):
        return sum((_value_bytes(f) for f in arr.flatten()), np.zeros(len(arr), np.int64))
    width = getattr(t, "bit_width", 8) // 8 if pa.types.is_primitive(t) else 0
    return np.full(len(arr), max(width, 0), dtype=np.int64)


def _invalid_utf8_rows(column) -> list[int]:
    """0-based rows of a column whose strings are not valid UTF-8 (Arrow's full validation
    checks every string, nested ones too; only a failing column is searched row by row)."""
    import pyarrow as pa

    try:
        column.validate(full=True)
        return []
    except pa.ArrowInvalid:
        pass
    bad = []
    for i in range(len(column)):
        try:
            column.slice(i, 1).validate(full=True)
        except pa.ArrowInvalid:
            bad.append(i)
    return bad
