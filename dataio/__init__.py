"""One data layer: where datasets live (URIs), how they are read, and TRL's dataset formats.

``tasks/`` (the stages) and ``data_checks/`` (validation) both read data through this package
and nothing else, so a format or a storage scheme is learnt once. It imports neither of them,
nor ``flows/`` or ``models/``: the arrows point here, never out.

- ``dataio.uri``: URIs -> local paths, ``DataError``, ``content_hash``, ``openable`` (a model
  location for ``from_pretrained``); ``credentials_in`` and ``redact`` (no secret in a config
  URI or in anything written).
- ``dataio.s3``: ``s3://`` through boto3: a local cache keyed by ETag for reading, one PUT for
  writing; endpoint and credentials from the usual AWS environment, never logged.
- ``dataio.read``: one reader for JSONL, Parquet and ``datasets`` directories, strict (stages)
  or tolerant (validation).
- ``dataio.write``: JSONL written atomically (temporary file, then rename).
- ``dataio.trl_format``: TRL's formats (https://huggingface.co/docs/trl/dataset_formats):
  conversational or standard, explicit or implicit prompt.
"""

from dataio.read import Rows, read_records, read_rows
from dataio.trl_format import (PREFERENCE_COLUMNS, explicit_prompts, is_conversational,
                               preference_rows, render_prompt, split_prompt)
from dataio.uri import (DataError, content_hash, credentials_in, local_path, openable, redact,
                        redact_tree)
from dataio.write import jsonl_bytes, write_jsonl_atomic

__all__ = ["DataError", "PREFERENCE_COLUMNS", "Rows", "content_hash", "credentials_in",
           "explicit_prompts", "is_conversational", "jsonl_bytes", "local_path", "openable",
           "preference_rows", "read_records", "read_rows", "redact", "redact_tree",
           "render_prompt", "split_prompt", "write_jsonl_atomic"]
