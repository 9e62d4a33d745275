"""Which part of a run's work this process does: ``ONE`` (the whole) in a one-process run,
rank r of N in a data-parallel one (``medxfer.classification.workers``).

Every worker walks the same batches in the same order and draws the same random numbers for
each; a shard only says which rows it computes. That is what makes an N-worker run compute
what a one-process run computes, whatever N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    # a worker of a data-parallel run (of one worker or more): trains through
    # DistributedDataParallel with synchronised BatchNorm, as every other worker count does
    distributed: bool = False

    @property
    def primary(self) -> bool:
        """The worker that writes the run folder and trains what is cheap to train."""
        return self.rank == 0

    def positions(self, n: int) -> torch.Tensor:
        """This worker's positions in a batch of ``n`` (contiguous, sizes differing by at
        most one; possibly none)."""
        return torch.arange(n).tensor_split(self.world)[self.rank]

    def batches(self, n: int, batch_size: int) -> list[range]:
        """This worker's batches of a pass over ``n`` rows in batches of ``batch_size``:
        every ``world``-th, starting at its rank."""
        starts = range(self.rank * batch_size, n, self.world * batch_size)
        return [range(s, min(s + batch_size, n)) for s in starts]

    def takes(self, batch: int) -> bool:
        """Whether batch number ``batch`` of a pass is this worker's (as ``batches``)."""
        return batch % self.world == self.rank

    def sync(self) -> None:
        """Wait for every worker (nothing to wait for alone)."""
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the workers of ``tensor`` (in place; itself alone)."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def first_worker_value(self, value):
        """Rank 0's ``value`` on every worker (a picklable object)."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


ONE = Shard()
