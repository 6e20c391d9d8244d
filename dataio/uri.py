"""Dataset locations as URIs, and the error every reader raises.

A local path, a ``file://`` URI or an ``s3://bucket/key`` URI. ``local_path`` is the one
function that turns a URI into something to open (an S3 object is downloaded into a cache
keyed by its ETag first, ``dataio.s3``), so every reader, ``content_hash`` included, reads
S3 the way it reads a local file: a dataset copied to S3 keeps its content hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SUPPORTED = "a local path, a file:// URI or an s3://bucket/key URI"


class DataError(ValueError):
    """A dataset that cannot be used; ``str(e)`` names the file, the row and the rule.

    ``rule`` uses the validation report's rule names (``data_checks/report.py``: ``RULES``)
    where one applies, so a stage's refusal reads like the validation stage's.
    """

    def __init__(self, uri: str, message: str, *, rule: str | None = None,
                 row: int | None = None):
        self.uri, self.message, self.rule, self.row = uri, message, rule, row
        where = f"row {row}: " if row is not None else ""
        why = f"rule {rule}: " if rule else ""
        super().__init__(f"{uri}: {where}{why}{message}")

    def __reduce__(self):  # picklable (Prefect may store a failed state's exception)
        return _data_error, (type(self), self.uri, self.message, self.rule, self.row)


def _data_error(cls: type[DataError], uri: str, message: str, rule: str | None,
                row: int | None) -> DataError:
    return cls(uri, message, rule=rule, row=row)


def local_path(uri: str) -> Path:
    """The local file or directory a URI names (an ``s3://`` object or prefix: its cached
    copy, downloaded if new); any other scheme is refused, naming the URI."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if uri.startswith("s3://"):
        from dataio import s3

        return s3.fetch(uri)
    if "://" in uri:
        raise DataError(uri, f"unsupported URI scheme (expected {SUPPORTED})", rule="uri_scheme")
    return Path(uri)


def openable(location: str) -> str:
    """What a library that opens locations itself (``from_pretrained``) should get: an
    ``s3://`` model directory's cached local copy; anything else (a local path, a hub id) as
    given."""
    return str(local_path(location)) if location.startswith("s3://") else location


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
