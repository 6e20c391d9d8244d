"""Dataset locations as URIs, and the error every reader raises.

A local path, a ``file://`` URI or an ``s3://bucket/key`` URI. ``local_path`` is the one
function that turns a URI into something to open (an S3 object is downloaded into a cache
keyed by its ETag first, ``dataio.s3``), so every reader, ``content_hash`` included, reads
S3 the way it reads a local file: a dataset copied to S3 keeps its content hash.

Credentials live here too: ``credentials_in`` (a config URI may carry none) and ``redact``,
the one redaction everything the pipeline writes goes through.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Mapping

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


# -- credentials: never in a config, never in anything written -----------------------------

MASK = "***"
"""What a redacted secret reads as."""

# Environment variables whose values are secrets: AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID,
# AWS_SESSION_TOKEN, HF_TOKEN, MLFLOW_TRACKING_PASSWORD / _TOKEN, PREFECT_API_KEY,
# PREFECT_API_AUTH_STRING, LABEL_STUDIO_API_KEY, RLHF_SERVE_TOKEN, ...
_SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|"
                         r"CREDENTIAL|AUTH_STRING", re.IGNORECASE)
# Shorter values ("1", "true", a port) would mask ordinary text everywhere they occur.
_MIN_SECRET_LEN = 8
# scheme://userinfo@host. A password (user:password@) is a secret on any scheme; a bare user
# name is one only on http(s), where https://TOKEN@host is how tokens ride (a database URI's
# postgresql://mlflow@db names a user, whose password comes from the server's environment).
_USERINFO = re.compile(r"(?P<scheme>\b(?P<name>[a-zA-Z][a-zA-Z0-9+.-]*)://)"
                       r"(?P<user>[^/?#@\s:]*)(?P<password>:[^/?#@\s]*)?@")
# A query parameter whose name says it carries a secret (?token=, &X-Amz-Signature=, &sig=).
_SECRET_QUERY = re.compile(r"(?P<key>[?&;][^=&#\s]*?(?:token|signature|sig|secret|password|"
                           r"passwd|key|credential)[^=&#\s]*=)(?P<value>[^&#\s]+)",
                           re.IGNORECASE)


def _secret_userinfo(m: re.Match) -> bool:
    return bool(m["password"]) or m["name"].lower() in ("http", "https")


def _mask_userinfo(m: re.Match) -> str:
    if not _secret_userinfo(m):
        return m[0]
    # Keep a user name beside a password (who connected is useful, and not a secret).
    return f"{m['scheme']}{m['user']}:{MASK}@" if m["password"] else f"{m['scheme']}{MASK}@"


def environ_snapshot() -> dict[str, str]:
    """A copy of ``os.environ`` read while other threads may set and unset variables.

    ``os.environ`` is read key by key, so a variable unset by another thread between the two
    steps raises ``KeyError`` (MLflow's telemetry thread does this with
    ``_MLFLOW_TELEMETRY_SESSION_ID`` while a stage redacts its params: a pipeline run died of
    it), and one set meanwhile raises ``RuntimeError``. Read again until one read is whole."""
    for _ in range(1000):
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    return dict(os.environ)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment variables named like secrets, longest first (so a secret that
    contains another is masked whole)."""
    env = environ_snapshot() if environ is None else environ
    values = {v for k, v in env.items() if _SECRET_ENV.search(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with every credential masked: URL userinfo (``https://u:p@h`` ->
    ``https://***@h``), secret-named query values (``?token=abc`` -> ``?token=***``) and the
    value of every secret-named environment variable, wherever it appears.

    The one redaction everything written by the pipeline goes through (params, config dumps,
    tags, reports, error messages): a secret can reach text by routes no config check sees,
    e.g. an exception that quotes a URL or a header.
    """
    out = _USERINFO.sub(_mask_userinfo, text)
    out = _SECRET_QUERY.sub(lambda m: f"{m['key']}{MASK}", out)
    for value in secret_values(environ):
        out = out.replace(value, MASK)
    return out


def redact_tree(obj: Any, environ: Mapping[str, str] | None = None) -> Any:
    """``redact`` applied to every string of a JSON-like tree (a config dump), keys included."""
    if isinstance(obj, str):
        return redact(obj, environ)
    if isinstance(obj, dict):
        return {redact_tree(k, environ): redact_tree(v, environ) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_tree(v, environ) for v in obj]
    return obj


def credentials_in(uri: str) -> str | None:
    """Why ``uri`` carries a credential (None if it does not): a config is logged as params,
    stored as a Prefect flow parameter and dumped by ``rlhf config``, so credentials come from
    the environment (``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``, ``AWS_*``, ``HF_TOKEN``),
    never from a URI in it. The reason never quotes the secret."""
    if any(_secret_userinfo(m) for m in _USERINFO.finditer(uri)):
        return "has user:password@ (or a token as the user name) in it"
    if m := _SECRET_QUERY.search(uri):
        return f"has a secret in its query ({m['key'][1:-1]}=...)"
    return None
