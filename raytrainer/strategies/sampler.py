"""Give each rank its shard of a DataLoader, keeping the user's batch size, workers and collate."""
from __future__ import annotations

import math
from typing import Any, Iterator

from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from raytrainer.strategies.base import RankContext


class ContiguousShardSampler(Sampler[int]):
    """Rank r gets one contiguous block of indices, so concatenating ranks restores dataset order."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        per = math.ceil(length / world_size)
        self.start, self.stop = min(rank * per, length), min((rank + 1) * per, length)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def distributed_loader(loader: Any, ctx: RankContext, ordered: bool = False, seed: int = 0) -> Any:
    """Rebuild ``loader`` for this rank: a DistributedSampler (shuffling as the original did), or with
    ordered=True (predict) a contiguous block per rank so outputs can be put back in dataset order."""
    if not isinstance(loader, DataLoader):
        return loader  # plain iterables are the user's responsibility
    if isinstance(loader.sampler, (DistributedSampler, ContiguousShardSampler)):
        return loader
    if not isinstance(loader.sampler, (RandomSampler, SequentialSampler)) or loader.batch_sampler is None:
        raise ValueError("the DataLoader uses a custom sampler, so raytrainer cannot shard it across ranks. "
                         "Pass Trainer(use_distributed_sampler=False) and shard the data yourself.")
    if ordered:
        sampler: Sampler[int] = ContiguousShardSampler(len(loader.dataset), ctx.global_rank, ctx.world_size)
    else:
        sampler = DistributedSampler(loader.dataset, num_replicas=ctx.world_size, rank=ctx.global_rank,
                                     shuffle=isinstance(loader.sampler, RandomSampler), seed=seed, drop_last=False)
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
        prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
    )
