"""Reading datasets in TRL's standard formats from JSONL, Parquet or `datasets` directories.

Formats (https://huggingface.co/docs/trl/dataset_formats):
- prompt/completion: ``{"prompt": str, "completion": str}`` (SFT demonstrations)
- preference: ``{"prompt": str, "chosen": str, "rejected": str}`` (reward model, DPO)
- prompt-only: ``{"prompt": str}`` (PPO/GRPO/RLOO prompts, evaluation prompts)
- conversational variants of each, where the text fields are lists of
  ``{"role": ..., "content": ...}`` messages, rendered with the tokenizer's chat template.

Locations are URIs: a local path or ``file://`` today; the loader is the one place that will
learn ``s3://`` (see ROADMAP.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

TEXT_FIELDS = ("prompt", "completion", "chosen", "rejected")


class DataError(ValueError):
    """A dataset that cannot be read: the message names file, row and rule."""


def local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" in uri:
        raise DataError(f"{uri}: only local paths and file:// URIs are supported so far")
    return Path(uri)


def read_records(uri: str) -> list[dict[str, Any]]:
    """Rows of a JSONL file, a Parquet file or a `datasets` save_to_disk directory."""
    path = local_path(uri)
    if not path.exists():
        raise DataError(f"{uri}: file not found")
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{uri}: DatasetDict without a 'train' split")
            ds = ds["train"]
        return ds.to_list()
    if path.suffix == ".parquet":
        import pandas as pd

        # Parquet list columns come back as numpy arrays; TRL formats expect lists (of dicts).
        return [{k: _plain(v) for k, v in row.items()}
                for row in pd.read_parquet(path).to_dict("records")]
    rows = []
    with path.open("rb") as f:
        for i, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{uri}: row {i}: rule utf8: not valid UTF-8 ({e.reason})") from e
            except json.JSONDecodeError as e:
                raise DataError(f"{uri}: row {i}: rule json: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataError(f"{uri}: row {i}: rule json: expected an object per line")
            rows.append(row)
    return rows


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def content_hash(uri: str) -> str:
    """sha256 of a file's bytes, or of a directory's files (names and bytes, sorted)."""
    path = local_path(uri)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def is_conversational(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def render_prompt(prompt: Any, tokenizer) -> str:
    """Prompt text for generation: plain strings as they are, messages via the chat template."""
    if is_conversational(prompt):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return str(prompt)

