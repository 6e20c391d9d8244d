"""Writing JSONL the way a reader may rely on: all of it or none of it.

A file is written to a temporary name beside it, flushed to disk and renamed over the old
one, so a crash or a full disk part-way leaves the previous file intact (a rename within a
directory is atomic on POSIX). Locations are URIs (``dataio.uri``), like everywhere else: an
``s3://`` object is written in one PUT, which S3 shows whole or not at all.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from dataio.uri import local_path


def jsonl_bytes(rows: list[dict]) -> bytes:
    """One JSON object per line, UTF-8, non-ASCII kept as is."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def write_jsonl_atomic(uri: str, rows: list[dict], head: bytes = b"") -> None:
    """Write ``head`` + one JSON row per line to ``uri`` through a temporary file and a rename;
    an existing file keeps its permissions."""
    if uri.startswith("s3://"):
        from dataio import s3

        s3.put_bytes(uri, head + jsonl_bytes(rows))
        return
    path = local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(head + jsonl_bytes(rows))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
