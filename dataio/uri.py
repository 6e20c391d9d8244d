"""Dataset locations as URIs, and the error every reader raises.

A local path or a ``file://`` URI today. ``local_path`` is the one function that turns a URI
into something to open: the issue that adds ``s3://`` (ROADMAP.md: datasets on S3 only, past
one machine) extends it and ``content_hash``, and every reader follows.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SUPPORTED = "a local path or a file:// URI"


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


def local_path(uri: str) -> Path:
    """The local file or directory a URI names; any other scheme is refused, naming the URI."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" in uri:
        raise DataError(uri, f"only local paths and file:// URIs are supported so far "
                             f"(expected {SUPPORTED})", rule="uri_scheme")
    return Path(uri)


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
