"""``s3://bucket/key`` for the data layer: read through a local cache, written in one PUT.

boto3 finds the endpoint and the credentials the usual AWS ways (``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID`` ..., ``AWS_PROFILE``, instance roles); nothing
here reads or logs them, and errors name the URI only.

Reading downloads the object (or every object under a prefix, for a ``datasets``
save_to_disk directory) into ``$RLHF_CACHE_DIR/s3/<bucket>/<key>@<etag>``: the ETag keys the
copy, so a changed object is fetched again and an unchanged one once per machine, and the
readers, Parquet and ``datasets`` included, open an ordinary local file. Writing is one
``put_object``: S3 makes an object visible whole or not at all, which is the guarantee
``dataio.write`` gives local files by a rename.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from dataio.uri import DataError

SCHEME = "s3://"


def split(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; a URI without a bucket is refused."""
    bucket, _, key = uri[len(SCHEME):].partition("/")
    if not bucket:
        raise DataError(uri, "an S3 URI names a bucket: s3://bucket/key", rule="uri_scheme")
    return bucket, key


def cache_root() -> Path:
    """Where S3 objects are cached: ``$RLHF_CACHE_DIR/s3``, else ``~/.cache/rlhf-pipeline/s3``."""
    base = os.environ.get("RLHF_CACHE_DIR") or Path.home() / ".cache" / "rlhf-pipeline"
    return Path(base) / "s3"


def retry_policy() -> dict[str, int | str]:
    """botocore's retries: ``standard`` mode (throttling such as 503 SlowDown, 500s and
    dropped or refused connections are retried with exponential backoff and jitter, up to
    20 s apart) and 5 attempts in all, unless ``AWS_RETRY_MODE`` / ``AWS_MAX_ATTEMPTS`` say
    otherwise. botocore's own default is ``legacy`` mode, which retries fewer kinds of error
    (https://docs.aws.amazon.com/boto3/latest/guide/retries.html)."""
    # total_max_attempts counts the first try, as AWS_MAX_ATTEMPTS does (botocore's
    # ``max_attempts`` key counts retries only).
    return {"mode": os.environ.get("AWS_RETRY_MODE") or "standard",
            "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or 5)}


def _client():
    import boto3
    from botocore.config import Config

    # boto3 reads AWS_ENDPOINT_URL(_S3), credentials, region and profile from the environment
    # and ~/.aws itself (https://docs.aws.amazon.com/sdkref/latest/guide/feature-ss-endpoints.html).
    # A new session each time: boto3's default session keeps the first credentials it found.
    return boto3.session.Session().client("s3", config=Config(retries=retry_policy()))


def _refuse(uri: str, error: Exception) -> DataError:
    """A boto3 error as a DataError naming the URI (never the credentials or the endpoint)."""
    from botocore.exceptions import (BotoCoreError, ClientError, EndpointConnectionError,
                                     NoCredentialsError, PartialCredentialsError)

    bucket, key = split(uri)
    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return DataError(uri, "no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)", rule="s3_access")
    if isinstance(error, EndpointConnectionError):
        return DataError(uri, "the S3 endpoint cannot be reached (AWS_ENDPOINT_URL?)",
                         rule="s3_access")
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return DataError(uri, f"bucket {bucket!r} does not exist", rule="file_exists")
        if code in ("NoSuchKey", "404"):
            return DataError(uri, f"no object {key!r} in bucket {bucket!r}", rule="file_exists")
        tries = error.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
        return DataError(uri, f"S3 refused the request ({code or 'error'}; {tries} attempt"
                              f"{'s' if tries > 1 else ''})", rule="s3_access")
    if isinstance(error, BotoCoreError):  # a dropped connection, a timeout: retried already
        return DataError(uri, f"S3 request failed ({type(error).__name__}; up to "
                              f"{retry_policy()['total_max_attempts']} attempts)", rule="s3_access")
    raise error


def _listing(uri: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(ETag of the object named ``key``, or None; [(key, ETag)] of the objects under
    ``key/``) in one paginated listing."""
    bucket, key = split(uri)
    prefix = key.rstrip("/")
    exact, under = None, []
    try:
        pages = _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                if obj["Key"] == prefix and not key.endswith("/"):
                    exact = obj["ETag"].strip('"')
                elif obj["Key"].startswith(prefix + "/") or not prefix:
                    under.append((obj["Key"], obj["ETag"].strip('"')))
    except Exception as e:
        raise _refuse(uri, e) from None
    return exact, under


def fetch(uri: str) -> Path:
    """A local copy of the object ``uri`` names, or a directory of the objects under it."""
    bucket, key = split(uri)
    exact, under = _listing(uri)
    prefix = key.rstrip("/")
    if exact is not None:
        name = Path(prefix).name
        target = cache_root() / bucket / f"{prefix}@{exact}" / name
        if not target.exists():
            _download(uri, [(prefix, name)], target.parent)
        return target
    if not under:
        return cache_root() / bucket / f"{prefix}@missing"  # the readers say "file not found"
    listing_hash = hashlib.sha256(repr(sorted(under)).encode()).hexdigest()[:16]
    target = cache_root() / bucket / f"{prefix}@{listing_hash}"
    if not target.exists():
        strip = len(prefix) + 1 if prefix else 0
        _download(uri, [(k, k[strip:]) for k, _ in under], target)
    return target


def _download(uri: str, objects: list[tuple[str, str]], target: Path) -> None:
    """Download (key, relative name) pairs into ``target`` via a temporary sibling folder and
    one rename, so a concurrent reader never sees half a copy."""
    bucket, _ = split(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        client = _client()
        for key, rel in objects:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                client.download_file(bucket, key, str(dest))
            except Exception as e:
                raise _refuse(f"{SCHEME}{bucket}/{key}", e) from None
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same copy first: keep theirs
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def put_bytes(uri: str, data: bytes) -> None:
    """Write one object (S3 shows it whole or not at all)."""
    bucket, key = split(uri)
    if not key or key.endswith("/"):
        raise DataError(uri, "an S3 object URI needs a key: s3://bucket/key", rule="uri_scheme")
    try:
        _client().put_object(Bucket=bucket, Key=key, Body=data)
    except Exception as e:
        raise _refuse(uri, e) from None



def get_bytes(uri: str) -> bytes:
    """One object's bytes, read directly (not through the cache: small records that a re-run
    must see fresh, e.g. a stage's completion record)."""
    bucket, key = split(uri)
    try:
        return _client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as e:
        raise _refuse(uri, e) from None


def upload(local: Path, uri: str) -> list[str]:
    """Upload a file to the object ``uri``, or a directory's files to the objects under
    ``uri/`` (same relative names); -> the keys written. Each object is whole or absent, but
    a directory is not atomic: whoever needs "finished" writes a marker after this returns."""
    bucket, key = split(uri)
    prefix = key.rstrip("/")
    files = ([(local, prefix)] if local.is_file() else
             [(p, f"{prefix}/{p.relative_to(local).as_posix()}".lstrip("/"))
              for p in sorted(local.rglob("*")) if p.is_file()])
    client = _client()
    for path, k in files:
        try:
            client.upload_file(str(path), bucket, k)
        except Exception as e:
            raise _refuse(f"{SCHEME}{bucket}/{k}", e) from None
    return [k for _, k in files]
