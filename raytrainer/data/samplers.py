"""Give each rank its shard of a DataLoader, keeping the user's batch size, workers and collate."""
from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

if TYPE_CHECKING:
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


def rebuild(loader: DataLoader, **how: Any) -> DataLoader:
    """A new DataLoader over ``loader``'s dataset with its workers, collate and pinning, drawing indices as
    ``how`` says (batch_size/sampler/shuffle/drop_last, or a batch_sampler)."""
    workers = loader.num_workers > 0
    return DataLoader(
        loader.dataset, num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context if workers else None,
        persistent_workers=loader.persistent_workers if workers else False,
        prefetch_factor=loader.prefetch_factor if workers else None, **how,
    )


def data_source(loader: Any) -> Any:
    """The object that keeps a loader's data position (a ParquetDataset, a Ray Data loader), or None: the
    loader itself, or the dataset a DataLoader wraps."""
    for obj in (loader, getattr(loader, "dataset", None) if isinstance(loader, DataLoader) else None):
        if hasattr(obj, "bind"):
            return obj
    return None


class SkipFirstBatches(Sampler[list[int]]):
    """A batch sampler that leaves out the first ``skip`` batches of ``inner``, for one resumed epoch: it skips
    at the index level instead of loading and dropping batches. Its order is drawn on the first batch, or earlier
    through ``prime``, so the draw can come where the original loader's came (after or before the DataLoader's
    own base seed)."""

    def __init__(self, inner: Any, skip: int) -> None:
        self.inner, self.skip = inner, skip
        self._live: Iterator[list[int]] | None = None

    def prime(self) -> None:
        """Draw the order and skip now (the RNG that orders this epoch is still in place)."""
        if self._live is None:
            self._live = iter(self.inner)
            for _ in itertools.islice(self._live, self.skip):
                pass

    def __iter__(self) -> Iterator[list[int]]:
        return self._Lazy(self)  # one epoch only: a primed order is kept

    class _Lazy:
        def __init__(self, owner: SkipFirstBatches) -> None:
            self.owner = owner

        def __iter__(self) -> Any:
            return self

        def __next__(self) -> list[int]:
            self.owner.prime()
            assert self.owner._live is not None
            return next(self.owner._live)

    def __len__(self) -> int:
        return max(len(self.inner) - self.skip, 0)


def skip_at_sampler(loader: Any, skip: int) -> tuple[Any, Callable[[], None]] | None:
    """``loader`` rebuilt to start at batch ``skip`` without loading the batches before, and the call that draws
    its order; None when it cannot (an iterable dataset, a loader without a batch sampler)."""
    if type(loader) is not DataLoader or loader.batch_sampler is None or isinstance(loader.dataset, IterableDataset):
        return None
    sampler = SkipFirstBatches(loader.batch_sampler, skip)
    return rebuild(loader, batch_sampler=sampler, generator=loader.generator), sampler.prime


def sequential_loader(loader: Any, prefix: str, warn: bool = True) -> Any:
    """``loader`` without shuffling, for overfit_batches (the same first batches every epoch), as Lightning does;
    warns when it had to turn shuffling off."""
    if not isinstance(loader, DataLoader) or isinstance(loader.sampler, SequentialSampler):
        return loader
    if type(loader.batch_sampler) is not BatchSampler:
        raise ValueError(f"overfit_batches needs the same {prefix} batches every epoch, but this {prefix} DataLoader "
                         f"draws them with a custom batch_sampler ({type(loader.batch_sampler).__name__}) that "
                         "raytrainer cannot make sequential. Give it a sequential order yourself, or drop "
                         "overfit_batches.")
    if warn:
        warnings.warn(f"You requested to overfit but enabled {prefix} dataloader shuffling. We are turning off the "
                      f"{prefix} dataloader shuffling for you.", UserWarning, stacklevel=2)
    return rebuild(loader, batch_size=loader.batch_size, shuffle=False, drop_last=loader.drop_last,
                   generator=loader.generator)


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
    return rebuild(loader, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last)


class ElasticBatchSampler(Sampler[list[int]]):
    """Batches for one rank of an elastic run: every sample of an epoch exactly once across resizes.

    The epoch's order is a permutation fixed by (seed, epoch). ``segments`` lists, for this epoch,
    each earlier world size and how many batches each of its ranks finished; those samples are
    removed, and the rest is dealt out to the current ranks. Every rank gets the same number of
    batches (DDP needs that): a final partial round is spread as one extra sample over the last
    batches, so nothing is dropped or repeated.
    """

    def __init__(self, length: int, rank: int, world_size: int, batch_size: int, shuffle: bool, seed: int = 0,
                 drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.length, self.rank, self.world, self.batch_size = length, rank, world_size, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.segments: list[tuple[int, int, int]] = []  # (world, batches per rank, batch size) already done

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.segments = []
        self.epoch = epoch

    def resume_from(self, segments: list[tuple[int, int, int]]) -> None:
        """Skip what earlier worlds consumed in this epoch."""
        self.segments = [tuple(s) for s in segments]  # type: ignore[misc]

    def _order(self) -> list[int]:
        import torch

        if not self.shuffle:
            return list(range(self.length))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.length, generator=g).tolist()

    def _plan(self, order: list[int], world: int, batch: int) -> list[list[list[int]]]:
        """Batches per rank for ``order`` dealt to ``world`` ranks (same count for every rank)."""
        per_round = world * batch
        rounds = len(order) // per_round
        plan = [[order[r * per_round + k * batch:r * per_round + (k + 1) * batch] for r in range(rounds)]
                for k in range(world)]
        tail = order[rounds * per_round:]
        if not tail or self.drop_last:
            return plan
        if len(tail) >= world or rounds == 0:  # one more, smaller batch for every rank
            for k in range(world):
                plan[k].append(tail[k::world])
        else:  # fewer leftovers than ranks: one more sample in some ranks' last batch
            for i, idx in enumerate(tail):
                plan[i % world][-1].append(idx)
        return plan

    def _remaining(self) -> list[int]:
        order = self._order()
        for world, done, batch in self.segments:
            plan = self._plan(order, world, batch)
            used = {i for rank_batches in plan for b in rank_batches[:done] for i in b}
            order = [i for i in order if i not in used]
        return order

    def __iter__(self) -> Iterator[list[int]]:
        plan = self._plan(self._remaining(), self.world, self.batch_size)
        return iter([b for b in plan[self.rank] if b])

    def __len__(self) -> int:
        remaining = self._remaining()
        if not remaining:
            return 0
        return len(self._plan(remaining, self.world, self.batch_size)[self.rank])


def elastic_loader(loader: Any, ctx: RankContext, batch_size: int | None = None, seed: int = 0) -> Any:
    """Rebuild ``loader`` for an elastic run (see ElasticBatchSampler); batch_size overrides the per-rank size."""
    if not isinstance(loader, DataLoader):
        return loader
    if not isinstance(loader.sampler, (RandomSampler, SequentialSampler)) or loader.batch_size is None:
        raise ValueError("elastic runs re-shard the data themselves and need a DataLoader with a batch_size and the "
                         "default sampler (shuffle=True or False).")
    batch_sampler = ElasticBatchSampler(len(loader.dataset), ctx.global_rank, ctx.world_size,
                                        batch_size or loader.batch_size, isinstance(loader.sampler, RandomSampler),
                                        seed=seed, drop_last=loader.drop_last)
    return rebuild(loader, batch_sampler=batch_sampler)
