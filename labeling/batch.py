"""A labeling batch (pairs to label) and its labels file, one row per label.

Batch, a JSONL file, one pair per line::

    {"pair_id": "p1", "prompt": "...", "response_a": "...", "response_b": "..."}

Labels, a JSONL file beside it (``<batch stem>.labels.jsonl`` unless told otherwise)::

    {"pair_id": "p1", "annotator_id": "alice", "preferred": "response_a",
     "a_shown_first": false, "labeled_at": "2026-11-26T06:40:00+00:00"}

``a_shown_first`` records whether ``response_a`` was on the left, so position bias can be
measured: annotators who prefer the left side whatever it shows stand out. Each label is
appended and flushed (and fsynced) before the page is answered, so a crash loses nothing;
undo rewrites the file without the annotator's last label through a temporary file and a
rename, so a crash during undo leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import random
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from dataio import DataError, read_records, read_rows, write_jsonl_atomic

BATCH_FIELDS = ("pair_id", "prompt", "response_a", "response_b")
Preferred = Literal["response_a", "response_b"]


@dataclass(frozen=True)
class Pair:
    pair_id: str
    prompt: str
    response_a: str
    response_b: str


@dataclass(frozen=True)
class Label:
    pair_id: str
    annotator_id: str
    preferred: Preferred
    a_shown_first: bool
    """Whether ``response_a`` was shown on the left."""
    labeled_at: str
    """ISO 8601, UTC."""


def read_batch(uri: str) -> list[Pair]:
    """The pairs of a batch file; ``DataError`` (file, row, rule) at the first bad row."""
    rows = read_rows(uri, strict=True)
    pairs, seen = [], {}
    for row, record in zip(rows.numbers, rows.records):
        missing = [f for f in BATCH_FIELDS if f not in record or record[f] is None]
        if missing:
            raise DataError(uri, f"missing field(s) {', '.join(missing)} (a pair needs "
                                 f"{', '.join(BATCH_FIELDS)})", rule="required_columns", row=row)
        for f in BATCH_FIELDS:
            if not isinstance(record[f], str):
                raise DataError(uri, f"{f} must be a string, got {type(record[f]).__name__}",
                                rule="column_type", row=row)
            if not record[f].strip():
                raise DataError(uri, f"{f} is empty", rule="non_empty_text", row=row)
        pair_id = record["pair_id"]
        if pair_id in seen:
            raise DataError(uri, f"pair_id {pair_id!r} already used on row {seen[pair_id]}",
                            rule="unique_pair_id", row=row)
        seen[pair_id] = row
        pairs.append(Pair(*(record[f] for f in BATCH_FIELDS)))
    if not pairs:
        raise DataError(uri, "the batch has no pairs", rule="min_rows")
    return pairs


def default_labels_path(batch: str | Path) -> Path:
    """``data/batch7.jsonl`` -> ``data/batch7.labels.jsonl``. A batch on S3 has no "beside" to
    write to: labels are appended and fsynced one at a time, which an S3 object cannot do."""
    if str(batch).startswith("s3://"):
        raise DataError(str(batch), "labels of a batch on S3 need a local file: give --out "
                                    "LABELS", rule="uri_scheme")
    batch = Path(batch)
    return batch.with_name(f"{batch.stem}.labels.jsonl")


def a_shown_first(seed: int, pair_id: str) -> bool:
    """Whether ``response_a`` goes on the left: a fair coin per pair, seeded, so the order is
    the same after a restart and across annotators of one batch (string seeds hash stably)."""
    return random.Random(f"{seed}:{pair_id}").random() < 0.5


class AlreadyLabeled(ValueError):
    """A choice for a pair the annotator has labeled already (a double click, two tabs)."""


class LabelStore:
    """The labels file: every row in memory, appends flushed to disk one by one."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.labels: list[Label] = []
        if self.path.exists():
            for record in read_records(str(self.path)):
                try:
                    self.labels.append(Label(**record))
                except TypeError as e:
                    raise DataError(str(self.path), f"not a label row ({e})",
                                    rule="required_columns") from None

    def append(self, label: Label) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(label)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.labels.append(label)

    def undo(self, annotator_id: str) -> Label | None:
        """Remove the annotator's last label (file and memory); None when there is none."""
        for i in range(len(self.labels) - 1, -1, -1):
            if self.labels[i].annotator_id == annotator_id:
                break
        else:
            return None
        kept = self.labels[:i] + self.labels[i + 1:]
        write_jsonl_atomic(str(self.path), [asdict(label) for label in kept])
        removed, self.labels = self.labels[i], kept
        return removed


class LabelingSession:
    """One annotator working through one batch; safe to call from several server threads."""

    def __init__(self, pairs: list[Pair], store: LabelStore, annotator_id: str, seed: int = 0):
        self.pairs, self.store, self.annotator_id, self.seed = pairs, store, annotator_id, seed
        self._by_id = {p.pair_id: p for p in pairs}
        self._lock = threading.Lock()
        for label in store.labels:
            if label.pair_id not in self._by_id:
                raise DataError(str(store.path), f"label for pair_id {label.pair_id!r}, which "
                                                 f"is not in this batch: wrong labels file?",
                                rule="pair_in_batch")

    def _done_ids(self) -> set[str]:
        return {l.pair_id for l in self.store.labels if l.annotator_id == self.annotator_id}

    def progress(self) -> dict[str, int]:
        with self._lock:
            return {"done": len(self._done_ids()), "total": len(self.pairs)}

    def next_pair(self) -> dict | None:
        """The first pair this annotator has not labeled, as shown: left, right and the side
        of ``response_a``; None when the batch is finished."""
        with self._lock:
            done = self._done_ids()
        for pair in self.pairs:
            if pair.pair_id not in done:
                first = a_shown_first(self.seed, pair.pair_id)
                left, right = ((pair.response_a, pair.response_b) if first
                               else (pair.response_b, pair.response_a))
                return {"pair_id": pair.pair_id, "prompt": pair.prompt, "left": left,
                        "right": right, "a_shown_first": first}
        return None

    def choose(self, pair_id: str, side: Literal["left", "right"]) -> Label:
        """Record that the response on ``side`` is better. ``KeyError`` for an unknown pair,
        ``ValueError`` for a bad side, ``AlreadyLabeled`` for a pair labeled already."""
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        if pair_id not in self._by_id:
            raise KeyError(pair_id)
        first = a_shown_first(self.seed, pair_id)
        preferred: Preferred = "response_a" if (side == "left") == first else "response_b"
        with self._lock:
            if pair_id in self._done_ids():
                raise AlreadyLabeled(f"pair {pair_id!r} is already labeled by "
                                     f"{self.annotator_id}")
            label = Label(pair_id, self.annotator_id, preferred, first,
                          datetime.now(timezone.utc).isoformat(timespec="seconds"))
            self.store.append(label)
        return label

    def undo(self) -> Label | None:
        with self._lock:
            return self.store.undo(self.annotator_id)
