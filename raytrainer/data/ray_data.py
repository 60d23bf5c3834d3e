"""Ray Data input: a ``ray.data.Dataset`` as a loader of training or evaluation batches.

On a Ray run the driver gives every start of the ranks a fresh ``Dataset.streaming_split(world, equal=True)``
(as Ray Train's ``get_dataset_shard`` does); each rank reads its own split with ``iter_torch_batches``, and the
dataset's preprocessing (``map_batches`` and the like) runs as Ray tasks on the cluster's CPUs, not on the ranks.

What is guaranteed, per epoch:

* Without a failure: every row once over all ranks, except that ``equal=True`` gives every rank the same number
  of rows by dropping the last ``rows % world`` rows of the epoch's stream (which rows depends on block order).
* A failure or a resize in the middle of an epoch: Ray Data cannot resume an iterator at a position. The run
  resumes from its snapshot or checkpoint at batch ``b`` of the epoch and starts a *fresh pass* over a new split
  of the whole dataset, counting ``batch_idx`` on from ``b``. No row of that epoch is lost; the rows trained
  before the resume point in that epoch (``b`` batches on each rank) are trained again (at-least-once for the
  interrupted epoch), so that epoch has ``b`` more batches per rank than the others. Later epochs are whole.
  With ``limit_train_batches`` the resumed epoch still stops at the limit, so it trains the fresh pass's first
  ``limit - b`` batches only.
"""
from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["RayDataLoader", "is_ray_dataset", "wrap_ray_datasets", "holds_ray_data", "split_ray_data",
           "close_splits", "check_room_for_data", "DATA_HEADROOM_CPUS"]

DATA_HEADROOM_CPUS = 2  # logical CPUs a local Ray instance gets beyond the ranks', for Ray Data's read/map tasks


def is_ray_dataset(obj: Any) -> bool:
    """Whether ``obj`` is a ``ray.data.Dataset`` (without importing Ray Data when nothing imported it yet)."""
    if "ray.data" not in sys.modules:
        return False
    from ray.data import Dataset

    return isinstance(obj, Dataset)


class RayDataLoader:
    """Batches of a ``ray.data.Dataset`` for ``trainer.fit/validate/test/predict``; each rank reads its own split.

    Yields what ``iter_torch_batches`` yields: a dict of column name -> tensor (on the CPU; the Trainer moves
    batches to the rank's device), or ``collate_fn``'s output. It has no length: an epoch ends when the split
    runs out. ``trainer.fit(model, ds)`` wraps a plain Dataset in one with the defaults; build it yourself to
    choose ``batch_size`` and the rest. See the module docstring for what is guaranteed across failures.
    """

    fresh_pass_on_resume = True  # a resumed epoch starts a new pass instead of reading and dropping batches

    def __init__(self, dataset: Any, batch_size: int = 256, drop_last: bool = False,
                 local_shuffle_buffer_size: int | None = None, local_shuffle_seed: int | None = None,
                 dtypes: Any = None, collate_fn: Callable[..., Any] | None = None, prefetch_batches: int = 1) -> None:
        if not is_ray_dataset(dataset):
            raise TypeError(f"RayDataLoader needs a ray.data.Dataset, got {type(dataset).__name__}. Build one with "
                            "ray.data.read_parquet(...), ray.data.range(...), ds.map_batches(...), etc.")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"RayDataLoader(batch_size={batch_size!r}): give an integer >= 1 (rows per batch).")
        if not isinstance(prefetch_batches, int) or prefetch_batches < 0:
            raise ValueError(f"RayDataLoader(prefetch_batches={prefetch_batches!r}): give an integer >= 0.")
        if local_shuffle_buffer_size is not None and local_shuffle_buffer_size < 1:
            raise ValueError(f"RayDataLoader(local_shuffle_buffer_size={local_shuffle_buffer_size!r}): give an "
                             "integer >= 1, or None for no local shuffle.")
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.local_shuffle_buffer_size = local_shuffle_buffer_size
        self.local_shuffle_seed = local_shuffle_seed
        self.dtypes = dtypes
        self.collate_fn = collate_fn
        self.prefetch_batches = prefetch_batches
        self.epoch = 0
        self._splits: list[Any] | None = None  # streaming_split iterators, one per rank (driver side: split())
        self._bound: Any = None                # this rank's iterator (rank side: bind())
        self._rank: int | None = None

    # ------------------------------------------------------------------ driver side
    def split(self, world: int, exclude: dict[str, float] | None = None,
              locality_hints: list[str] | None = None) -> RayDataLoader:
        """A copy holding ``world`` streaming splits of the dataset, one per rank (every rank receives all).

        ``exclude`` (e.g. the ranks' ``{"CPU": 2}``) is left out of what Ray Data plans to use, so its budget
        counts only what the ranks do not hold; ``locality_hints`` (each rank's Ray node id) lets Ray Data hand
        a rank blocks that are already on its node. Each call starts a new split coordinator (a new execution).
        """
        if not isinstance(world, int) or world < 1:
            raise ValueError(f"split(world={world!r}): give the number of ranks, an integer >= 1.")
        if self.dataset is None:
            raise RuntimeError("this RayDataLoader is already a split (it holds no dataset); split the original.")
        ds = _with_excluded(self.dataset, exclude)
        out = copy.copy(self)
        out.dataset = None  # the ranks need only their iterators
        hints = list(locality_hints) if locality_hints and len(locality_hints) == world else None
        out._splits = list(ds.streaming_split(world, equal=True, locality_hints=hints))
        out._bound, out._rank = None, None
        return out

    def close(self) -> None:
        """Stop this split's coordinator actor (and the execution it runs); a no-op for an unsplit loader."""
        splits, self._splits = self._splits, None
        actor = getattr(splits[0], "_coord_actor", None) if splits else None
        if actor is None:
            return
        import ray

        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone (its job ended, Ray shut down)
            pass

    # ------------------------------------------------------------------ rank side
    def bind(self, rank: int, world: int) -> None:
        """Select this rank's split; a clear error when the splits were made for another world, or when a
        multi-rank run got an unsplit loader (one built on the ranks, e.g. returned from a data hook)."""
        if self._splits is None and self.dataset is None:
            raise RuntimeError("this RayDataLoader split was closed (its run ended); split the original again.")
        if self._splits is None:
            if world > 1:
                raise RuntimeError(
                    f"rank {rank} of {world} got a Ray Dataset that the driver did not split across the ranks (it "
                    "came from train_dataloader()/val_dataloader()/... of the module or datamodule, or was built on "
                    "the ranks). Each rank would read the whole dataset. Pass it to the Trainer instead: "
                    "trainer.fit(model, train_dataloaders=ds, val_dataloaders=val_ds), or "
                    "trainer.validate/test/predict(model, dataloaders=ds); a RayDataLoader(ds, batch_size=...) "
                    "passed there works too.")
            self._bound, self._rank = None, rank  # one rank in this process: read the dataset itself
            return
        if len(self._splits) != world:
            raise RuntimeError(f"this RayDataLoader was split for {len(self._splits)} rank(s) but rank {rank} runs in "
                               f"a world of {world}; the driver splits it again for every start of the ranks, so "
                               "pass the Ray Dataset (or its RayDataLoader) to the Trainer, not a split of it.")
        if not 0 <= rank < world:
            raise ValueError(f"bind(rank={rank}, world={world}): rank must be in [0, {world}).")
        self._bound, self._rank = self._splits[rank], rank

    def set_epoch(self, epoch: int) -> None:
        """The training epoch, so a seeded local shuffle differs from epoch to epoch (seed + epoch)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Any]:
        source = self._bound
        if source is None:
            if self._splits is not None and len(self._splits) == 1:
                source = self._splits[0]
            elif self._splits is not None:
                raise RuntimeError(f"this RayDataLoader holds {len(self._splits)} splits but was not bound to a "
                                   "rank; call bind(rank, world) first.")
            elif self.dataset is None:
                raise RuntimeError("this RayDataLoader split was closed (its run ended); split the original again.")
            else:
                source = self.dataset
        seed = self.local_shuffle_seed
        if seed is not None and self.local_shuffle_buffer_size is not None:
            seed += self.epoch
        return iter(source.iter_torch_batches(
            batch_size=self.batch_size, dtypes=self.dtypes, device="cpu", collate_fn=self.collate_fn,
            drop_last=self.drop_last, local_shuffle_buffer_size=self.local_shuffle_buffer_size,
            local_shuffle_seed=seed, prefetch_batches=self.prefetch_batches))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_bound"] = None  # a rank binds its own copy
        return state

    def __repr__(self) -> str:
        where = f"{len(self._splits)} splits" if self._splits is not None else \
            "unsplit" if self.dataset is not None else "closed"
        if self._rank is not None:
            where += f", rank {self._rank}"
        return f"RayDataLoader(batch_size={self.batch_size}, {where})"


def _with_excluded(dataset: Any, exclude: dict[str, float] | None) -> Any:
    """``dataset`` with ``exclude`` left out of Ray Data's resource budget, on a copy (the user's is untouched)."""
    if not exclude:
        return dataset
    from ray.data import Dataset, ExecutionResources

    try:
        # deprecated in favour of label selectors (which need labelled nodes); copying a context warns about its
        # deprecated fields too
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = Dataset.copy(dataset, _deep_copy=True)  # its own DataContext, which the split coordinator takes
            options = ds.context.execution_options
            extra = ExecutionResources(cpu=exclude.get("CPU", 0.0), gpu=exclude.get("GPU", 0.0))
            options.exclude_resources = options.exclude_resources.add(extra)
        return ds
    except Exception as err:  # noqa: BLE001 - Ray's API moved: the budget is only a planning hint
        from raytrainer.utilities import log

        log.debug("could not exclude the ranks' resources from Ray Data's budget: %s", err)
        return dataset


# ---------------------------------------------------------------------- finding loaders in call arguments
def _map(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``obj`` with ``fn`` applied to every leaf of its lists, tuples, dicts and CombinedLoaders (a new container
    only where something changed)."""
    from raytrainer.utilities.combined_loader import CombinedLoader

    if isinstance(obj, CombinedLoader):
        flat = [_map(x, fn) for x in obj.flattened]
        if all(a is b for a, b in zip(flat, obj.flattened)):
            return obj
        out = copy.copy(obj)
        out.flattened = flat
        return out
    if isinstance(obj, (list, tuple)):
        items = [_map(x, fn) for x in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
    if isinstance(obj, dict):
        new = {k: _map(v, fn) for k, v in obj.items()}
        if all(new[k] is obj[k] for k in obj):
            return obj
        return type(obj)(new) if type(obj) is not dict else new
    return fn(obj)


def wrap_ray_datasets(obj: Any) -> Any:
    """Loader arguments with every plain ``ray.data.Dataset`` (also inside lists and dicts) as a RayDataLoader."""
    if "ray.data" not in sys.modules:
        return obj
    return _map(obj, lambda x: RayDataLoader(x) if is_ray_dataset(x) else x)


def _leaves(obj: Any) -> Iterator[Any]:
    """The leaves ``_map`` visits."""
    from raytrainer.utilities.combined_loader import CombinedLoader

    if isinstance(obj, CombinedLoader):
        obj = obj.flattened
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _leaves(x)
    else:
        yield obj


def holds_ray_data(obj: Any) -> bool:
    """Whether call arguments hold a RayDataLoader or a Ray Dataset anywhere the driver splits them."""
    return any(isinstance(x, RayDataLoader) or is_ray_dataset(x) for x in _leaves(obj))


def split_ray_data(obj: Any, world: int, exclude: dict[str, float] | None = None,
                   locality_hints: list[str] | None = None) -> tuple[Any, list[RayDataLoader]]:
    """(driver) Call arguments with every unsplit RayDataLoader replaced by a fresh ``split(world)``; also the
    new splits, for ``close_splits`` when the ranks are done with them."""
    made: list[RayDataLoader] = []

    def one(x: Any) -> Any:
        if isinstance(x, RayDataLoader) and x.dataset is not None:
            made.append(x.split(world, exclude, locality_hints))
            return made[-1]
        return x

    return _map(obj, one), made


def close_splits(splits: list[RayDataLoader]) -> None:
    """Stop the coordinators of splits the ranks no longer read (a restart makes new ones)."""
    for loader in splits:
        loader.close()


def check_room_for_data(reserved_cpus: float, world: int) -> None:
    """Raise when the ranks' reservation leaves no CPU in the Ray cluster for Ray Data's tasks.

    Read and map tasks need at least one CPU each (Ray Data's default); with none left they never run and each
    rank would wait forever for its first batch.
    """
    import ray

    total = float(ray.cluster_resources().get("CPU", 0.0))
    if total - reserved_cpus >= 1:
        return
    raise RuntimeError(
        f"the Ray cluster has {total:g} logical CPU(s) and the {world} rank(s) reserve {reserved_cpus:g}, so no CPU "
        "is left for the Ray Dataset's read and map tasks: every rank would wait forever for its first batch. "
        "Give Ray more logical CPUs than the ranks use (they may exceed the cores): call "
        f"ray.init(num_cpus={int(reserved_cpus) + DATA_HEADROOM_CPUS}) before building the dataset (ray.data "
        "starts a Ray instance the size of the machine otherwise), add a CPU node to the cluster, or run fewer "
        "ranks.")
