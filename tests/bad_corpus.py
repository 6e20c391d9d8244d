"""The bad-input corpus's raw material: a valid dataset per data role, written in any supported
format (JSONL, Parquet, a ``datasets`` save_to_disk directory) from the same rows.

A case edits the valid rows (or, for JSONL only, the bytes of a line) and writes them in one
format; ``test_bad_inputs*.py`` assert how the validation stage and the CLI refuse it. A cell
that must hold bytes that are not UTF-8 is a ``RawBytes``: written as those very bytes into a
JSON string or an Arrow string column, as a broken export would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

TOKENIZER = str(Path(__file__).resolve().parents[1] / "demo" / "base_model")  # no chat template
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
N = 40  # rows per dataset; above the default min_rows (16)
ANNOTATORS = ("a0", "a1", "a2")
ROLES = ("sft", "preferences", "preference_labels", "rl_prompts", "eval_prompts", "eval_pairs")
FORMATS = ("jsonl", "parquet", "datasets")
# Which other files a dataset's rules read: leakage needs training prompts, labels need pairs.
# A case validates only its dataset and these (GX costs ~25 ms per expectation, ~0.6 s per
# suite, whatever the data size; the valid base is tested whole once per format).
NEEDS = {"eval_prompts": ("rl_prompts",), "eval_pairs": ("rl_prompts",),
         "preference_labels": ("preferences",)}


class RawBytes(bytes):
    """A string cell written as these bytes exactly (latin-1 or CESU-8 text in a UTF-8 file)."""


def base_rows() -> dict[str, list[dict[str, Any]]]:
    """A small dataset set that passes every rule (train and eval prompts disjoint)."""
    train = [f"Tell me about movie number {i}" for i in range(N)]
    held_out = [f"Describe held out show {i}" for i in range(N)]

    def pair(i: int, prefix: str, prompt: str) -> dict[str, Any]:
        # Alternate which text sorts first, so agreement has both values to work with.
        good, bad = (f" answer A{i} is fine.", f" answer Z{i} is poor.")
        chosen, rejected = (good, bad) if i % 2 else (bad.replace("poor", "ok"), good)
        return {"pair_id": f"{prefix}{i:03d}", "prompt": prompt, "chosen": chosen,
                "rejected": rejected, "chosen_votes": 3, "num_votes": 3}

    prefs = [pair(i, "p", p) for i, p in enumerate(train)]
    # Unanimous except one dissent per annotator, so alpha is high but not degenerate.
    labels = [{"pair_id": p["pair_id"], "annotator_id": a,
               "preferred": "rejected" if i == 5 * k + 1 else "chosen",
               "chosen_shown_first": i % 2 == 0}
              for i, p in enumerate(prefs) for k, a in enumerate(ANNOTATORS)]
    return {
        "sft": [{"prompt": p, "completion": f" it was good, part {i}."} for i, p in enumerate(train)],
        "preferences": prefs,
        "preference_labels": labels,
        "rl_prompts": [{"prompt": p} for p in train],
        "eval_prompts": [{"prompt": p} for p in held_out],
        "eval_pairs": [pair(i, "e", p) for i, p in enumerate(held_out)],
    }


# --- writers: the same rows as JSONL, Parquet or a `datasets` directory ---------------------

def jsonl_line(row: dict[str, Any]) -> bytes:
    """One JSONL line; ``RawBytes`` values go in as they are (json.dumps would escape them)."""
    raws: dict[str, bytes] = {}

    def mark(v: Any) -> Any:
        if isinstance(v, RawBytes):
            raws[key := f"@@raw{len(raws)}@@"] = bytes(v)
            return key
        return v

    line = json.dumps({k: mark(v) for k, v in row.items()}).encode("utf-8")
    for key, raw in raws.items():
        line = line.replace(key.encode(), raw)
    return line + b"\n"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_bytes(b"".join(jsonl_line(r) for r in rows))


def arrow_table(rows: list[dict[str, Any]], like: list[dict[str, Any]]):
    """An Arrow table of ``rows``; a key missing from a row is null there, as a Parquet writer
    would make it. Raises pyarrow's ArrowInvalid/ArrowTypeError when a column's values have no
    common type (an int among strings): such a file cannot exist in Parquet. ``like`` gives
    the columns and types of an empty table."""
    import pyarrow as pa

    if not rows:
        return arrow_table(like[:1], like).slice(0, 0)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    columns = {}
    for k in keys:
        values = [r.get(k) for r in rows]
        if any(isinstance(v, RawBytes) for v in values):
            # A string column holding bytes that are not UTF-8: Arrow does not check the bytes
            # behind a view, and a Parquet writer elsewhere may not have either.
            data = [v if isinstance(v, (bytes, type(None))) else str(v).encode() for v in values]
            columns[k] = pa.array(data, pa.binary()).view(pa.string())
        else:
            columns[k] = pa.array(values)
    return pa.table(columns)


def write_dataset(directory: Path, name: str, rows: list[dict[str, Any]], fmt: str) -> str:
    """Write ``rows`` of dataset ``name`` in format ``fmt``; returns the URI to configure."""
    if fmt == "jsonl":
        path = directory / f"{name}.jsonl"
        write_jsonl(path, rows)
        return str(path)
    table = arrow_table(rows, base_rows()[name])
    if fmt == "parquet":
        import pyarrow.parquet as pq

        path = directory / f"{name}.parquet"
        pq.write_table(table, path)
        return str(path)
    if fmt == "datasets":
        import datasets

        path = directory / name
        datasets.Dataset(table).save_to_disk(str(path))
        return str(path)
    raise ValueError(f"unknown format {fmt!r}")


def representable(dataset: str, rows: list[dict[str, Any]]) -> bool:
    """Whether rows can be written as Parquet or a `datasets` directory (one type per column;
    no lone surrogates, which Arrow's UTF-8 strings cannot hold)."""
    import pyarrow as pa

    try:
        arrow_table(rows, base_rows()[dataset])
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeEncodeError):
        return False
    return True


# --- cases built from the base: an edit of the rows, or of a JSONL file's bytes ------------

def build_case(tmp_path: Path, dataset: str, edit: Callable, fmt: str = "jsonl"
               ) -> dict[str, str]:
    """The files of one case: ``dataset`` (edited) and the files its rules need (valid).

    ``edit(rows, data)`` changes the rows in place; it may return ``(name, fn)`` to change the
    bytes of a JSONL file after writing it (encodings, truncation), or repoint ``data``.
    """
    rows = base_rows()
    rows = {n: rows[n] for n in (dataset, *NEEDS.get(dataset, ()))}
    suffix = {"jsonl": ".jsonl", "parquet": ".parquet", "datasets": ""}[fmt]
    data = {name: str(tmp_path / f"{name}{suffix}") for name in rows}
    raw = edit(rows, data)
    if raw and fmt != "jsonl":
        raise ValueError("byte edits apply to JSONL files only")
    for name, rs in rows.items():
        write_dataset(tmp_path, name, rs, fmt)
    if raw:
        name, fn = raw
        path = Path(data[name])
        path.write_bytes(fn(path.read_bytes()))
    return data


def case_rows(dataset: str, edit: Callable) -> tuple[list[dict[str, Any]], bool]:
    """The edited rows of ``dataset`` and whether the edit was a byte edit (JSONL only)."""
    rows = base_rows()
    rows = {n: rows[n] for n in (dataset, *NEEDS.get(dataset, ()))}
    data = {name: f"{name}.jsonl" for name in rows}
    raw = edit(rows, data)
    return rows[dataset], bool(raw) or data[dataset] != f"{dataset}.jsonl"


def formats_of(dataset: str, edit: Callable) -> tuple[str, ...]:
    """The formats a case can be written in: all three, unless it edits bytes, repoints a
    file, or gives a column values of two types (which only JSONL can hold)."""
    rows, jsonl_only = case_rows(dataset, edit)
    return ("jsonl",) if jsonl_only or not representable(dataset, rows) else FORMATS
