"""Data parallelism for our own PPO loop: which process this is, and the collectives it needs.

Under ``accelerate launch`` (torchrun underneath) every process runs the whole stage on its own
share of each batch; ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in the environment say which.
Outside a launch there is one process and every method here is the identity, so the
single-process path runs exactly the code it ran before.

What the PPO loop needs is what DDP does (https://pytorch.org/docs/stable/notes/ddp.html):
identical weights at the start (``broadcast_``), gradients averaged over processes before each
optimiser step (``average_grads_``), plus batch statistics (whitening, metrics, the KL
controller's input) taken over the whole batch rather than one process's share. We do it by
hand instead of wrapping the models in ``DistributedDataParallel`` because one PPO step runs
the policy's trunk twice (policy and shared-trunk critic), generates with it under
``no_grad`` and switches LoRA adapters off for the reference: patterns DDP's reducer refuses
or needs ``static_graph`` for.

Imports torch and accelerate only (no Prefect, no MLflow): it runs wherever the trainer runs.
Both are imported where they are used: the SFT and reward stages ask ``is_main_process``,
and importing a stage module (as the config does) must not cost torch's import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable


def process_index() -> int:
    """This process's rank in a launch (0 outside one)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """The process that saves models and logs to MLflow: rank 0, or the only process."""
    return process_index() == 0


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def sharded_weights() -> bool:
    """True in an FSDP or ZeRO-3 launch: no process holds the whole model while training."""
    return _flag("ACCELERATE_USE_FSDP") or (
        _flag("ACCELERATE_USE_DEEPSPEED")
        and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")


def refuse_sharded_lora(lora) -> None:
    """LoRA with sharded weights would save adapters alone, which our stages do not merge."""
    if lora is not None and sharded_weights():
        raise ValueError("LoRA under an FSDP or ZeRO-3 launch is not supported: use "
                         "deploy/accelerate/ddp.yaml or deepspeed_zero2.yaml, or no LoRA")


def trained_model(trainer, scratch: str, load: Callable[[str], Any]):
    """A HF trainer's model with whole weights in the main process; None in the others.

    Every process must call it: gathering sharded weights is a collective. DDP and ZeRO-1/2
    keep whole weights in every process, so that is ``trainer.model``. FSDP and ZeRO-3 shard
    them: ``trainer.save_model`` gathers them onto the main process (a full state dict) and
    the main process loads them back with ``load(scratch)``.
    """
    if not sharded_weights():
        return trainer.model if is_main_process() else None
    trainer.save_model(scratch)
    return load(scratch) if is_main_process() else None


@dataclass(frozen=True)
class DataParallel:
    """One process of a data-parallel group (or the only process: ``world_size == 1``)."""

    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def setup(cls) -> DataParallel:
        """Join the process group ``accelerate launch`` prepared (nccl on GPUs, one GPU per
        process; gloo on CPU when ``ACCELERATE_USE_CPU`` is set), or stay a single process."""
        import torch

        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        from accelerate import PartialState

        # Same state object the HF trainers use, so a process that ran SFT first would share it.
        state = PartialState(cpu=_flag("ACCELERATE_USE_CPU"))
        return cls(state.process_index, state.num_processes, state.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, items: list, what: str = "items") -> list:
        """This process's contiguous slice of ``items`` (len divisible by world_size)."""
        if len(items) % self.world_size:
            raise ValueError(f"{len(items)} {what} do not split evenly over "
                             f"{self.world_size} processes")
        n = len(items) // self.world_size
        return items[self.rank * n:(self.rank + 1) * n]

    # --- collectives (identity for one process) -------------------------------------------

    def _reduce(self, x: torch.Tensor, op=None) -> torch.Tensor:
        import torch.distributed as dist

        x = x.to(self.device)
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
        return x

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x.clone()) if self.distributed else x

    def mean_stats(self, stats: dict[str, float], max_keys: tuple[str, ...] = ()) -> dict[str, float]:
        """Average per-process statistics (each process's share is equally large, so the mean
        of the shares' means is the whole batch's mean); ``max_keys`` take the maximum."""
        if not self.distributed or not stats:
            return stats
        import torch
        import torch.distributed as dist

        keys = sorted(stats)  # the same order on every process
        means = [k for k in keys if k not in max_keys]
        maxes = [k for k in keys if k in max_keys]
        out = {}
        if means:
            t = self._reduce(torch.tensor([stats[k] for k in means], dtype=torch.float64))
            out.update({k: float(v) / self.world_size for k, v in zip(means, t.tolist())})
        if maxes:
            t = self._reduce(torch.tensor([stats[k] for k in maxes], dtype=torch.float64),
                             dist.ReduceOp.MAX)
            out.update(zip(maxes, t.tolist()))
        return out

    def masked_whiten(self, x: torch.Tensor, mask: torch.Tensor,
                      shift_mean: bool = True) -> torch.Tensor:
        """``models.ppo.masked_whiten`` with the mean and (unbiased) variance of the whole
        batch, all processes' shares together: whitening each share on its own would give
        every process its own advantage scale."""
        import torch

        from models.ppo import masked_whiten

        if not self.distributed:
            return masked_whiten(x, mask, shift_mean)
        s = self._reduce(torch.stack([(x * mask).sum(), mask.sum()]).double())  # two passes,
        mean = (s[0] / s[1].clamp(min=1)).to(x.dtype)                          # as masked_var
        n = s[1]
        sq = self._reduce((((x - mean) ** 2) * mask).sum().double().reshape(1))[0]
        var = sq / n.clamp(min=1)
        if n > 1:
            var = var * n / (n - 1)  # Bessel's correction, as models.ppo.masked_var
        whitened = (x - mean) * torch.rsqrt(var.to(x.dtype) + 1e-8)
        if not shift_mean:
            whitened = whitened + mean
        return whitened * mask

    def broadcast_(self, params: list[torch.Tensor]) -> None:
        """Copy rank 0's values into every process's ``params`` (DDP does this at wrap time)."""
        if not self.distributed:
            return
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def average_grads_(self, params: list[torch.nn.Parameter],
                       bucket_numel: int = 2 ** 24) -> None:
        """Average ``params``' gradients over processes, in flat buckets (one all-reduce per
        ~64 MB of fp32 rather than one per tensor, as DDP buckets them). A parameter without a
        gradient counts as zeros, so every process reduces the same buckets."""
        if not self.distributed:
            return
        import torch
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for p in params + [None]:
            if p is not None:
                bucket.append(p)
                size += p.numel()
            if bucket and (p is None or size >= bucket_numel):
                flat = torch.cat([q.grad.reshape(-1) for q in bucket])
                dist.all_reduce(flat)
                flat /= self.world_size
                offset = 0
                for q in bucket:
                    q.grad.copy_(flat[offset:offset + q.numel()].view_as(q.grad))
                    offset += q.numel()
                bucket, size = [], 0

    def gather_object(self, obj) -> list:
        """Every process's ``obj``, in rank order (pickled; for small things like RNG states)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()
