"""A second thread for work that can run beside the main thread's on CPU cores.

PPO's critic learns from the rollout alone: its forward, loss and backward share nothing with
the policy's when the two have separate weights. On a CPU the two can then run at once, each
on its share of the intra-op threads, and torch releases the GIL inside its ops. On two cores
this beat one model after the other on both cores: a policy and a critic step of the CPU
benchmark's demo model (16 episodes, forward and backward) took 20 ms against 23 ms, because
the small ops of a 0.5 M-parameter model spend much of their time starting and joining
threads (bench/README.md, PPO section). A GPU runs one kernel stream: nothing to gain there.

Imports torch only.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any, Callable, Iterator

import torch


class SideThread:
    """One daemon thread that runs submitted calls in order, with ``threads`` intra-op threads
    of its own (torch's count is kept per calling thread). ``submit`` returns at once;
    ``result`` waits for the oldest call not yet collected and returns what it returned, or
    raises what it raised."""

    def __init__(self, threads: int, name: str = "side"):
        self.threads = threads
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        while (job := self._jobs.get()) is not None:
            fn, args, kwargs = job
            try:
                self._done.put((fn(*args, **kwargs), None))
            except BaseException as e:  # handed to the caller of result()
                self._done.put((None, e))

    def submit(self, fn: Callable[..., Any], *args, **kwargs) -> None:
        self._jobs.put((fn, args, kwargs))

    def result(self) -> Any:
        out, err = self._done.get()
        if err is not None:
            raise err
        return out

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


def half_threads(total: int) -> int:
    """Intra-op threads for each of two threads sharing ``total``. Equal shares: torch's
    setting also sets process-wide ones (MKL's), which then suit both threads."""
    return max(1, total // 2)


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count ``n`` for the calling thread within the block, restored
    after (two threads sharing the cores each take ``half_threads``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
