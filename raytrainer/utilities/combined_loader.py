"""CombinedLoader: several iterables (DataLoaders) walked together in one of Lightning's four modes.

``max_size_cycle`` (the training default) runs as long as the longest iterable and restarts the
shorter ones; ``min_size`` stops with the shortest; ``max_size`` runs as long as the longest and
gives ``None`` for the exhausted ones; ``sequential`` (the evaluation default) walks them one after
the other. Iterating yields ``(batch, batch_idx, dataloader_idx)`` as Lightning's does; ``batch``
has the structure of the collection (dict, list, tuple) except in ``sequential`` mode.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

MODES = ("min_size", "max_size_cycle", "max_size", "sequential")

# ------------------------------------------------------------------------------ flatten / unflatten
Spec = tuple  # ("leaf",) | ("dict", keys, children) | ("seq", type, children)


def _is_leaf(value: Any) -> bool:
    """Not a dict/list/tuple, or one that holds only numbers and strings (a list of ints is one iterable)."""
    if isinstance(value, dict):
        children: Iterable[Any] = value.values()
    elif isinstance(value, (list, tuple)):
        children = value
    else:
        return True
    return all(isinstance(c, (int, float, str)) for c in children)


def tree_flatten(tree: Any) -> tuple[list[Any], Spec]:
    """The leaves of a nested dict/list/tuple collection, in order, and the structure to rebuild it."""
    if _is_leaf(tree):
        return [tree], ("leaf",)
    leaves: list[Any] = []
    specs: list[Spec] = []
    values = list(tree.values()) if isinstance(tree, dict) else list(tree)
    for child in values:
        flat, spec = tree_flatten(child)
        leaves += flat
        specs.append(spec)
    if isinstance(tree, dict):
        return leaves, ("dict", type(tree), list(tree.keys()), specs)
    return leaves, ("seq", type(tree), None, specs)


def _count(spec: Spec) -> int:
    return 1 if spec[0] == "leaf" else sum(_count(s) for s in spec[3])


def tree_unflatten(values: list[Any], spec: Spec) -> Any:
    """Rebuild the collection described by ``spec`` with ``values`` as its leaves."""
    if spec[0] == "leaf":
        return values[0]
    _, kind, keys, children = spec
    out: list[Any] = []
    start = 0
    for child in children:
        n = _count(child)
        out.append(tree_unflatten(values[start:start + n], child))
        start += n
    if keys is not None:
        return kind(zip(keys, out))
    if kind is tuple or kind is list:
        return kind(out)
    return kind(*out) if hasattr(kind, "_fields") else kind(out)  # namedtuple


def sized_len(iterable: Any) -> int | None:
    """len(iterable), or None when it has no length (an IterableDataset's loader, a generator)."""
    try:
        return len(iterable)
    except (TypeError, NotImplementedError):
        return None


def _lengths(iterables: list[Any]) -> list[int | float]:
    out: list[int | float] = []
    for it in iterables:
        n = sized_len(it)
        out.append(float("inf") if n is None else n)
    return out


# ------------------------------------------------------------------------------------------- modes
class _ModeIterator(Iterator[tuple[Any, int, int]]):
    """One pass over the iterables in one mode; a cycled iterable restarts inside ``restart_context(i)``."""

    def __init__(self, iterables: list[Any], limits: list[int | float] | None) -> None:
        self.iterables = iterables
        self.limits = limits
        self.iterators: list[Iterator[Any]] = []
        self.idx = 0
        self.restart_context: Callable[[int], AbstractContextManager[Any]] | None = None

    def __iter__(self) -> _ModeIterator:
        self.iterators = [iter(it) for it in self.iterables]
        self.idx = 0
        return self

    def __next__(self) -> tuple[Any, int, int]:
        raise NotImplementedError  # each mode defines it

    def length(self) -> int | float:
        raise NotImplementedError  # each mode defines it


class _MaxSizeCycle(_ModeIterator):
    def __iter__(self) -> _MaxSizeCycle:
        super().__iter__()
        self.exhausted = [False] * len(self.iterables)
        return self

    def __next__(self) -> tuple[Any, int, int]:
        out = []
        for i, it in enumerate(self.iterators):
            try:
                out.append(next(it))
            except StopIteration:
                self.exhausted[i] = True
                if all(self.exhausted):
                    raise
                with self.restart_context(i) if self.restart_context is not None else nullcontext():
                    self.iterators[i] = iter(self.iterables[i])
                    out.append(next(self.iterators[i]))
        self.idx += 1
        return out, self.idx - 1, 0

    def length(self) -> int | float:
        lengths = _lengths(self.iterables)
        if self.limits is not None:
            lengths = [min(n, lim) for n, lim in zip(lengths, self.limits)]
        return max(lengths) if lengths else 0


class _MinSize(_ModeIterator):
    def __next__(self) -> tuple[Any, int, int]:
        if not self.iterators:
            raise StopIteration
        out = [next(it) for it in self.iterators]
        self.idx += 1
        return out, self.idx - 1, 0

    def length(self) -> int | float:
        lengths = _lengths(self.iterables) + list(self.limits or [])
        return min(lengths) if lengths else 0


class _MaxSize(_ModeIterator):
    def __next__(self) -> tuple[Any, int, int]:
        out: list[Any] = []
        alive = False
        for it in self.iterators:
            try:
                out.append(next(it))
                alive = True
            except StopIteration:
                out.append(None)
        if not alive:
            raise StopIteration
        self.idx += 1
        return out, self.idx - 1, 0

    def length(self) -> int | float:
        return _MaxSizeCycle.length(self)  # type: ignore[arg-type]


class _Sequential(_ModeIterator):
    """One iterable after the other (only the running one has an iterator, so only its workers start)."""

    def __iter__(self) -> _Sequential:
        self.loader_idx = 0
        self.idx = 0
        self.iterators = [iter(self.iterables[0])] if self.iterables else []
        return self

    def _advance(self) -> None:
        self.loader_idx += 1
        self.idx = 0
        self.iterators = [iter(self.iterables[self.loader_idx])] if self.loader_idx < len(self.iterables) else []

    def __next__(self) -> tuple[Any, int, int]:
        while self.loader_idx < len(self.iterables):
            if self.limits is not None and self.idx >= self.limits[self.loader_idx]:
                self._advance()
                continue
            try:
                batch = next(self.iterators[0])
            except StopIteration:
                self._advance()
                continue
            self.idx += 1
            return batch, self.idx - 1, self.loader_idx
        raise StopIteration

    def length(self) -> int | float:
        lengths = _lengths(self.iterables)
        if self.limits is not None:
            lengths = [min(n, lim) for n, lim in zip(lengths, self.limits)]
        return sum(lengths)


_ITERATORS: dict[str, type[_ModeIterator]] = {"min_size": _MinSize, "max_size_cycle": _MaxSizeCycle,
                                               "max_size": _MaxSize, "sequential": _Sequential}


# ---------------------------------------------------------------------------------- CombinedLoader
class CombinedLoader(Iterable[tuple[Any, int, int]]):
    """Lightning's CombinedLoader: iterate a collection (dict, list, tuple, nested) of iterables in one mode.

    Yields ``(batch, batch_idx, dataloader_idx)``. ``len()`` is the number of batches in the mode, with
    ``limits`` (one per iterable) applied as Lightning applies ``limit_*_batches``.
    """

    def __init__(self, iterables: Any, mode: str = "min_size") -> None:
        if mode not in _ITERATORS:
            raise ValueError(f"Unsupported mode {mode!r}, please select one of: {list(MODES)}.")
        self._iterables = iterables
        self._flattened, self._spec = tree_flatten(iterables)
        self._mode = mode
        self._iterator: _ModeIterator | None = None
        self._limits: list[int | float] | None = None

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def iterables(self) -> Any:
        """The collection of iterables as given (after a ``flattened`` update, with the new ones in place)."""
        return self._iterables

    @property
    def flattened(self) -> list[Any]:
        """The iterables as a flat list, in the collection's order."""
        return self._flattened

    @flattened.setter
    def flattened(self, flattened: list[Any]) -> None:
        if len(flattened) != len(self._flattened):
            raise ValueError(f"Mismatch in flattened length ({len(flattened)}) and existing length "
                             f"({len(self._flattened)})")
        self._flattened = list(flattened)
        self._iterables = tree_unflatten(self._flattened, self._spec)

    @property
    def sampler(self) -> Any:
        """Each iterable's ``sampler`` (None where it has none), in the collection's structure."""
        return tree_unflatten([getattr(x, "sampler", None) for x in self._flattened], self._spec)

    @property
    def batch_sampler(self) -> Any:
        """Each iterable's ``batch_sampler`` (None where it has none), in the collection's structure."""
        return tree_unflatten([getattr(x, "batch_sampler", None) for x in self._flattened], self._spec)

    @property
    def limits(self) -> list[int | float] | None:
        """Batches to take from each iterable (None: all)."""
        return self._limits

    @limits.setter
    def limits(self, limits: int | float | list[int | float] | None) -> None:
        if isinstance(limits, (int, float)):
            limits = [limits] * len(self._flattened)
        elif isinstance(limits, list) and len(limits) != len(self._flattened):
            raise ValueError(f"Mismatch in number of limits ({len(limits)}) and number of iterables "
                             f"({len(self._flattened)})")
        self._limits = limits

    def _make_iterator(self) -> _ModeIterator:
        return _ITERATORS[self._mode](self._flattened, self._limits)

    def __iter__(self) -> CombinedLoader:
        self._iterator = iter(self._make_iterator())
        return self

    def __next__(self) -> tuple[Any, int, int]:
        if self._iterator is None:
            raise RuntimeError("Call iter(combined_loader) before next().")
        out = next(self._iterator)
        if self._mode == "sequential":
            return out
        batch, batch_idx, dataloader_idx = out
        return tree_unflatten(batch, self._spec), batch_idx, dataloader_idx

    def __len__(self) -> int:
        """Batches in this mode (limits applied). Unlike Lightning's, it also works before ``iter()``."""
        n = self._make_iterator().length()
        if isinstance(n, float) and math.isinf(n):
            raise TypeError("this CombinedLoader has no length: one of its iterables has none (an "
                            "IterableDataset's loader or a generator).")
        return int(n)

    def batches(self, restart_context: Callable[[int], AbstractContextManager[Any]] | None = None) -> Iterator[Any]:
        """The batches alone (training's view: no batch_idx / dataloader_idx); in ``max_size_cycle`` mode
        iterable ``i`` restarts inside ``restart_context(i)`` when one is given."""
        iterator = self._make_iterator()
        iterator.restart_context = restart_context
        self._iterator = iter(iterator)
        spec = self._spec
        if self._mode == "sequential":
            for batch, _, _ in iterator:
                yield batch
            return
        for batch, _, _ in iterator:
            yield tree_unflatten(batch, spec)

    def reset(self) -> None:
        """Drop the running iterators (and shut down DataLoader workers they started)."""
        self._iterator = None
        for it in self._flattened:
            inner = getattr(it, "_iterator", None)
            shutdown = getattr(inner, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            if inner is not None:
                it._iterator = None
