"""The tensor-parallel group a model's layers talk through.

A model never calls ``torch.distributed`` itself: its layers ask the group in their
:class:`~tokenmill.models.interface.ModelContext` for the slice they own and for the two
collectives tensor parallelism needs (a sum after a row-parallel layer, a gather after a
vocab-parallel one). With one rank every collective is the identity, so single-device
models pay nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class TensorParallelGroup:
    """``rank`` of ``size`` ranks; collectives run over the default ``torch.distributed`` group."""

    rank: int = 0
    size: int = 1

    def split(self, total: int, what: str) -> int:
        """``total // size``, or ``ValueError`` naming ``what`` when ``size`` does not divide it."""
        if total % self.size:
            raise ValueError(f"tensor_parallel_size {self.size} does not divide {what} ({total})")
        return total // self.size

    def shard(self, total: int, what: str) -> tuple[int, int]:
        """``(start, size)`` of this rank's even slice of ``total`` rows."""
        size = self.split(total, what)
        return self.rank * size, size

    def all_reduce(self, tensor):
        """Sum ``tensor`` over the ranks, in place; returns it."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def all_gather(self, tensor, dim: int = -1):
        """Concatenate every rank's ``tensor`` along ``dim`` (rank order)."""
        if self.size == 1:
            return tensor
        import torch
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=dim)

    def broadcast(self, tensor, src: int = 0):
        """Rank ``src``'s ``tensor`` on every rank, in place; returns it."""
        if self.size > 1:
            import torch.distributed as dist

            dist.broadcast(tensor, src)
        return tensor

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over the ranks (each rank's KV capacity: the pool is the same everywhere)."""
        if self.size == 1:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


SINGLE = TensorParallelGroup()


def init_group(backend: str, init_method: str, rank: int, size: int, timeout: float) -> TensorParallelGroup:
    """Join the ``torch.distributed`` default group with the platform's ``backend``; bounded by ``timeout``."""
    if size == 1:
        return SINGLE
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=timedelta(seconds=timeout))
    return TensorParallelGroup(rank, size)
