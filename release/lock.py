"""One writer at a time per registered model, across the processes of this machine.

Two pipeline runs that finish together would otherwise both read the registry, both plan
their alias moves from that same snapshot and both write: the second's record of the version
it replaced (``rlhf.previous.<alias>``, where a rollback goes) would be stale. Registry
writes (``release.registry.Registry``: register, move, rollback) take this lock, an
``fcntl.flock`` on a file keyed by the tracking URI and the model name, so they run one after
the other while each read-plan-write stays whole. The lock is released by the kernel when its
holder dies, SIGKILL included. Runs on several machines share a tracking server, not this
file: the scheduled flows hold a Prefect global concurrency limit named after the model
(``flows/scheduled.py``) for that.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from pathlib import Path
from typing import Iterator


class RegistryBusy(RuntimeError):
    """Another process held the registered model's lock for longer than the wait allowed."""


def lock_path(tracking_uri: str, name: str) -> Path:
    """``$RLHF_CACHE_DIR/locks/registry-<sha>.lock`` (else ``~/.cache/rlhf-pipeline/...``)."""
    base = Path(os.environ.get("RLHF_CACHE_DIR") or Path.home() / ".cache" / "rlhf-pipeline")
    key = hashlib.sha256(f"{tracking_uri}\n{name}".encode()).hexdigest()[:16]
    return base / "locks" / f"registry-{key}.lock"


@contextlib.contextmanager
def registry_lock(tracking_uri: str, name: str, timeout_s: float = 600.0) -> Iterator[None]:
    """Hold the exclusive lock of ``name`` at ``tracking_uri`` for the block (waits for it up
    to ``timeout_s``, then RegistryBusy naming the model and the lock file)."""
    path = lock_path(tracking_uri, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryBusy(f"registered model {name!r} is being written by another "
                                       f"run for over {timeout_s:.0f} s (lock {path})") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
