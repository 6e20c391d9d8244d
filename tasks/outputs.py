"""Where a pipeline's stage outputs live: a local folder, or S3 with a local scratch copy.

``output_dir: runs`` (local): stages write into ``runs/<name>/<stage>-<key>/`` and Prefect
keeps each finished stage's record (``result.json``) there, as before.

``output_dir: s3://bucket/prefix``: a stage still works in a local folder, the same
``<stage>-<key>`` under the scratch root ``$RLHF_CACHE_DIR/outputs/<bucket>/<prefix>/<name>``
(training libraries write local files; an interrupted PPO stage on the same machine resumes
from its checkpoint there). When it returns, ``publish`` uploads what its typed result points
at to ``s3://bucket/prefix/<name>/...`` (same relative names) and rewrites those paths to the
``s3://`` URIs; Prefect then writes the record through ``S3ResultStorage`` into the same S3
folder. The record is written last, after every upload, so a half-uploaded stage has no record
and is run again, never taken as finished. A re-run, here or on another machine, finds the
record on S3 by its key and reuses the stage without training.

Consumers get ``s3://`` URIs and open them through ``dataio`` (``localize``: downloaded once
into the ETag-keyed cache, ``dataio.s3``). Credentials are boto3's (the AWS environment or a
profile); nothing here reads or logs them.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect.filesystems import WritableFileSystem
from pydantic import BaseModel

from dataio import openable, s3


class S3ResultStorage(WritableFileSystem):
    """Prefect result storage on S3 through ``dataio.s3`` (boto3): the stage records of an
    ``s3://`` output_dir sit beside the stage folders they describe.

    Not prefect-aws's ``S3Bucket`` or fsspec's ``RemoteFileSystem``: both need s3fs or
    prefect-aws (which pin boto3 back a minor version, /work/shared/STACK.md) for two calls,
    and ``dataio.s3`` already turns S3 errors into ones that name the URI only."""

    _block_type_name = "RLHF S3 Result Storage"

    basepath: str
    """``s3://bucket/prefix``: record keys are relative to it."""

    def _resolve_path(self, path: str) -> str:
        # Prefect asks for this to turn a record key into the path it stores and reads.
        if path.startswith(s3.SCHEME):
            return path
        base = self.basepath.rstrip("/")
        return f"{base}/{path}" if path else base

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        return s3.get_bytes(self._resolve_path(path))

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        uri = self._resolve_path(path)
        s3.put_bytes(uri, content)
        return uri

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self.write_path(path, content)


def saved_storage(remote: str) -> S3ResultStorage:
    """The S3 result storage block for ``remote``, saved on the Prefect server: Prefect 3.9
    refuses a block that is not (``Task.__init__``: "Result storage configuration must be
    persisted server-side"). The block holds the base URI only, never credentials; its name
    is derived from the URI, so every run of a pipeline overwrites the same document."""
    digest = hashlib.sha256(remote.encode()).hexdigest()[:12]
    storage = S3ResultStorage(basepath=remote)
    storage.save(f"rlhf-outputs-{digest}", overwrite=True)
    return storage


def scratch_base() -> Path:
    """``$RLHF_CACHE_DIR/outputs``, else ``~/.cache/rlhf-pipeline/outputs`` (beside
    ``dataio.s3``'s download cache)."""
    return s3.cache_root().parent / "outputs"


@dataclass(frozen=True)
class OutputRoot:
    """A pipeline's output folder: where stages write (``local``) and, for an S3 output_dir,
    where finished stages are published (``remote``)."""

    local: Path
    """Where stages write: ``<output_dir>/<name>``, or the scratch root for S3."""
    remote: str | None = None
    """``s3://bucket/prefix/<name>`` for an S3 output_dir, else None."""

    @classmethod
    def of(cls, output_dir: str, name: str) -> OutputRoot:
        if not output_dir.startswith(s3.SCHEME):
            return cls(local=Path(output_dir) / name)
        bucket, prefix = s3.split(output_dir)
        prefix = prefix.strip("/")
        remote = f"{s3.SCHEME}{bucket}/{prefix + '/' if prefix else ''}{name}"
        return cls(local=scratch_base() / bucket / prefix / name, remote=remote)

    def result_storage(self) -> Path | S3ResultStorage:
        """Prefect ``result_storage`` for the stage records: the output folder itself."""
        return saved_storage(self.remote) if self.remote else self.local.resolve()

    def uri(self, relative: str | Path) -> str:
        """Where ``relative`` (a path under the output folder) lives once published."""
        if self.remote is None:
            return str(self.local / relative)
        return f"{self.remote}/{Path(relative).as_posix()}"

    def publish_folder(self, relative: str | Path) -> str:
        """Upload ``local/relative`` (a folder of finished files) to its URI; -> that URI."""
        uri = self.uri(relative)
        if self.remote:
            s3.upload(self.local / relative, uri)
        return uri

    def publish(self, result: Any, folder: str | Path) -> Any:
        """Upload the stage folder and every other local output its result names (e.g. the
        reward stage's ``<folder>-heldout``), then return the result with those paths as
        ``s3://`` URIs. A local output root: the result unchanged."""
        if self.remote is None or not isinstance(result, BaseModel):
            return result
        folder = Path(folder)
        s3.upload(folder, self.uri(folder.relative_to(self.local)))
        updates = {}
        for field, value in result:
            published = self._published(value, folder)
            if published is not value:
                updates[field] = published
        return result.model_copy(update=updates)

    def _published(self, value: Any, folder: Path) -> Any:
        if isinstance(value, dict):
            new = {k: self._published(v, folder) for k, v in value.items()}
            return value if all(new[k] is value[k] for k in value) else new
        if not isinstance(value, str) or "://" in value:
            return value
        path = Path(value)
        try:
            relative = path.resolve().relative_to(self.local.resolve())
        except (ValueError, OSError):
            return value  # not ours: an input dataset, a hub id
        if not path.exists():
            return value
        if not path.resolve().is_relative_to(folder.resolve()):
            s3.upload(path, self.uri(relative))
        return self.uri(relative)

    def localize(self, value: Any) -> Any:
        """``value`` with this pipeline's published ``s3://`` outputs (upstream models, files;
        also inside a dict) replaced by their cached local copies, so stages and
        ``from_pretrained`` open local paths; anything else (a user's ``s3://`` dataset, read
        by ``dataio`` itself) as given."""
        if self.remote is None:
            return value
        if isinstance(value, str) and value.startswith(self.remote + "/"):
            return openable(value)
        if isinstance(value, dict):
            return {k: self.localize(v) for k, v in value.items()}
        return value

    def publishing(self, fn: Callable[..., Any], folder: str | Path) -> Callable[..., Any]:
        """``fn`` (a stage task's function) with its S3 inputs localized and its outputs
        published. Inside the task, so Prefect persists the published result, and persists
        it only after every upload has finished: the record is the completion marker."""
        @functools.wraps(fn)  # the same signature: Prefect binds parameters through it
        def run_and_publish(*args: Any, **kwargs: Any) -> Any:
            args = tuple(self.localize(a) for a in args)
            kwargs = {k: self.localize(v) for k, v in kwargs.items()}
            return self.publish(fn(*args, **kwargs), folder)

        return run_and_publish
