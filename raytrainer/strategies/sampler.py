"""Give each rank its shard of a DataLoader (DistributedSampler), keeping the user's settings."""
from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from raytrainer.strategies.base import RankContext


def distributed_loader(loader: Any, ctx: RankContext, ordered: bool = False, seed: int = 0) -> Any:
    """Rebuild ``loader`` with a DistributedSampler; shuffling follows the original sampler."""
    if not isinstance(loader, DataLoader):
        return loader  # plain iterables are the user's responsibility
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    if not isinstance(loader.sampler, (RandomSampler, SequentialSampler)) or loader.batch_sampler is None:
        raise ValueError("the DataLoader uses a custom sampler, so raytrainer cannot shard it across ranks. "
                         "Pass Trainer(use_distributed_sampler=False) and shard the data yourself.")
    shuffle = isinstance(loader.sampler, RandomSampler) and not ordered
    sampler = DistributedSampler(loader.dataset, num_replicas=ctx.world_size, rank=ctx.global_rank,
                                 shuffle=shuffle, seed=seed, drop_last=False)
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
        prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
    )
