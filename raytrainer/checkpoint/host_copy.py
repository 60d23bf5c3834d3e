"""Training state in host memory: copies that later training cannot change, and live references whose writes show.

Three ways to hold a nested structure of tensors (dicts, lists, tuples, namedtuples, other leaves):

* ``to_host(obj)``: a deep copy with every tensor copied to CPU memory, now.
* ``LiveRefs``: tensors kept by reference with the in-place version counters they had when recorded
  (and, optionally, a count of optimizer steps); ``changed()`` tells what wrote to them since, and
  ``copy(obj)`` is ``to_host(obj)`` only while nothing did. ``keep(obj)`` copies everything else of a
  structure and keeps these tensors as they are: a snapshot that costs almost nothing until copied.
* ``HostCopy``: ``to_host`` in two parts; chosen tensors get a (pinned, reusable) host buffer now
  and are copied later by ``finish()``, which reports any of them written to in between.

Tensors that view the same memory (tied weights: a parameter and its ``state_dict`` entry, one
parameter in two modules) have the same ``view_key``; each structure copies them once and its copy
holds one tensor where the original held views of the same memory. Imports torch and the standard
library only.
"""
from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import torch

__all__ = ["HostCopy", "LiveRefs", "to_host", "view_key"]

# Leaves returned as they are without a look inside (immutable, and by far the most common leaves).
_ATOMS = frozenset({int, float, complex, str, bool, bytes, type(None)})


def view_key(t: torch.Tensor) -> tuple:
    """Identity of the memory a tensor views: (storage address, device, offset, shape, stride, dtype).

    A parameter and its detached ``state_dict`` entry, or one weight tied into two modules, have the
    same key. Tensors without addressable storage (empty, sparse, some device layouts) are told apart
    by object identity instead: ``("id", id(t))``.
    """
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        ptr = 0
    if ptr == 0:
        return ("id", id(t))
    return (ptr, t.device, t.storage_offset(), t.shape, t.stride(), t.dtype)  # torch.Size hashes as a tuple


def _walk(obj: Any, leaf: Callable[[torch.Tensor, tuple, str | None], torch.Tensor], memo: dict,
          where: str | None, live: LiveRefs | None = None) -> Any:
    """Rebuild ``obj``'s containers, replacing each tensor by ``leaf(tensor, view_key, where)`` once per view.

    ``where`` is the path of ``obj`` (e.g. ``checkpoint['state_dict']['w']``) when the caller names
    tensors, else None (no paths are built). Tensors held by ``live`` (the same object, or a view of
    the same memory) are kept as they are. numpy arrays and sets are copied, tuples that hold
    nothing to replace are returned as they are, other leaves are shared.
    """
    if isinstance(obj, torch.Tensor):
        if live is not None:
            if id(obj) in live._ids:  # optimizer state: the very tensors held (the cheap test first)
                return obj
            key = view_key(obj)
            if key in live._keys:  # e.g. a state_dict entry: a detached view of a held parameter
                return obj
        else:
            key = view_key(obj)
        out = memo.get(key)
        if out is None:
            out = memo[key] = leaf(obj, key, where)
        return out
    if isinstance(obj, dict):
        new = obj.copy() if type(obj) is dict else copy.copy(obj)  # copy.copy keeps a state_dict's _metadata
        for k, v in obj.items():
            if type(v) not in _ATOMS:
                new[k] = _walk(v, leaf, memo, None if where is None else f"{where}[{k!r}]", live)
        return new
    if isinstance(obj, list):
        if where is None:
            return [v if type(v) in _ATOMS else _walk(v, leaf, memo, None, live) for v in obj]
        return [v if type(v) in _ATOMS else _walk(v, leaf, memo, f"{where}[{i}]", live) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        if all(type(v) in _ATOMS for v in obj):
            return obj  # e.g. torch.Size, or Python's RNG state (625 ints)
        items = [v if type(v) in _ATOMS else _walk(v, leaf, memo, None if where is None else f"{where}[{i}]", live)
                 for i, v in enumerate(obj)]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj  # immutable and nothing inside changed
        if hasattr(obj, "_fields"):
            return type(obj)(*items)  # namedtuple
        return tuple(items) if type(obj) is tuple else type(obj)(items)
    if isinstance(obj, set):
        return copy.deepcopy(obj)
    np = sys.modules.get("numpy")  # no numpy imported: no array can be here
    if np is not None and isinstance(obj, np.ndarray):
        return obj.copy()
    return obj


def _to_cpu(t: torch.Tensor, key: tuple, where: str | None) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def _clone(t: torch.Tensor, key: tuple, where: str | None) -> torch.Tensor:
    return t.detach().clone()


def to_host(obj: Any, memo: dict | None = None) -> Any:
    """A deep copy of nested dicts/lists/tuples with every tensor copied to CPU memory, detached.

    CPU tensors are cloned too, so later in-place updates (optimizer steps) do not reach the copy.
    Tensors that view the same memory (``view_key``) become one tensor in the copy. Containers are
    rebuilt with their types (OrderedDict and a ``state_dict``'s ``_metadata``, namedtuples,
    ``torch.Size``); numpy arrays and sets are copied; other leaves are shared by reference.
    ``memo`` (view key -> copy) carries tied tensors across several calls; the tensors seen by
    earlier calls must still be alive (a key holds a memory address).
    """
    return _walk(obj, _to_cpu, {} if memo is None else memo, None)


class LiveRefs:
    """Tensors kept by reference, with the in-place version counters they had when recorded.

    Every in-place write through a tensor or a view of it (``p.add_``, an optimizer's ``step``,
    ``copy_``) increments the version counter the views share. Writes through ``p.data`` do not:
    pass ``steps``, a counter of completed optimizer steps (e.g. incremented by
    ``optimizer.register_step_post_hook``), to catch optimizers written that way. ``p.data = x``
    moves ``p`` to new memory; a structure that holds the old memory (a ``state_dict`` entry taken
    before) still holds the recorded values.
    """

    __slots__ = ("_ids", "_keys", "_names", "_steps", "_steps_at", "_tensors", "_versions")

    def __init__(self, tensors: Iterable[torch.Tensor] = (), names: Iterable[str] | None = None, *,
                 steps: Callable[[], int] | None = None) -> None:
        """Record ``tensors`` (named by ``names`` in ``changed()``) and, with ``steps``, its count now."""
        self._tensors = tuple(tensors)
        self._names = tuple(names) if names is not None else None
        if self._names is not None and len(self._names) != len(self._tensors):
            raise ValueError(f"LiveRefs: {len(self._names)} names for {len(self._tensors)} tensors")
        self._keys: frozenset[tuple] | None = None  # computed when first needed (``_index``)
        self._ids: frozenset[int] | None = None
        self._steps = steps
        self._record()

    def _index(self) -> LiveRefs:
        """Compute the view keys and object ids that ``keep`` and ``in`` look tensors up by (once)."""
        if self._keys is None:
            self._keys = frozenset(view_key(t) for t in self._tensors)
            self._ids = frozenset(id(t) for t in self._tensors)  # valid while held: no other object gets these ids
        return self

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the index: object ids and memory addresses mean nothing in another process."""
        state = {name: getattr(self, name) for name in self.__slots__}
        state["_keys"] = state["_ids"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def _record(self) -> None:
        self._versions = [t._version for t in self._tensors]
        self._steps_at = self._steps() if self._steps is not None else 0

    def record(self) -> LiveRefs:
        """The same tensors with the versions (and step count) they have now, e.g. at the next step boundary.

        Cheaper than a new ``LiveRefs``: the view keys are shared, not recomputed.
        """
        self._index()
        new = LiveRefs.__new__(LiveRefs)
        new._tensors, new._names, new._keys, new._ids = self._tensors, self._names, self._keys, self._ids
        new._steps = self._steps
        new._record()
        return new

    @property
    def keys(self) -> frozenset[tuple]:
        """The view keys of the tensors held."""
        return self._index()._keys

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, t: object) -> bool:
        """True when ``t`` views the same memory as one of the tensors held (a detached view counts)."""
        return isinstance(t, torch.Tensor) and view_key(t) in self.keys

    def changed(self) -> list[str]:
        """What wrote to the tensors since they were recorded: their names, and optimizer steps counted.

        Empty while they still hold the recorded values (as far as version counters and ``steps``
        tell); tensors without names are called ``tensor <i>``.
        """
        out = []
        if self._steps is not None:
            moved = self._steps() - self._steps_at
            if moved:
                out.append(f"{moved} optimizer step(s)")
        for i, (t, v) in enumerate(zip(self._tensors, self._versions, strict=True)):
            if t._version != v:
                out.append(self._names[i] if self._names is not None else f"tensor {i}")
        return out

    def unchanged(self) -> bool:
        """``not changed()``, without building the list (stops at the first change)."""
        if self._steps is not None and self._steps() != self._steps_at:
            return False
        return all(t._version == v for t, v in zip(self._tensors, self._versions, strict=True))

    def keep(self, obj: Any, memo: dict | None = None) -> Any:
        """A copy of ``obj`` that keeps the tensors viewing these references as they are (not copied).

        Other tensors are cloned where they are (a GPU tensor stays on its GPU: no transfer, no
        wait); containers are rebuilt as in ``to_host``. The result costs little to make and equals
        ``obj`` at this moment for as long as ``unchanged()``; ``copy`` turns it into a host copy.
        """
        return _walk(obj, _clone, {} if memo is None else memo, None, self._index())

    def copy(self, obj: Any, memo: dict | None = None) -> Any | None:
        """``to_host(obj)`` if nothing wrote to these tensors since they were recorded, else None.

        Checked before and after copying, so a write that begins during the copy also gives None.
        """
        if not self.unchanged():
            return None
        out = to_host(obj, memo)
        return out if self.unchanged() else None


class HostCopy:
    """``to_host(obj)`` in two parts, so some tensors can be copied while training goes on.

    Tensors whose ``view_key`` is in ``defer`` (dense, not requiring grad) get a host buffer now,
    pinned when they live on a GPU and taken from ``pool`` (a previous ``HostCopy.pool``) when it
    has one of that key, and are copied into it by ``finish``; every other tensor is copied at once.
    ``result`` is the copied structure (its deferred tensors hold garbage until ``finish``).
    ``finish`` may run on another thread; for GPU tensors it copies on a side stream that first waits
    for the work queued when the ``HostCopy`` was made (e.g. the optimizer step that produced them).
    ``pending`` records the deferred tensors, named by their path from ``name``, and their versions.
    """

    def __init__(self, obj: Any, defer: Collection[tuple] = frozenset(),
                 pool: Mapping[tuple, torch.Tensor] | None = None, name: str = "obj") -> None:
        """Copy what is not deferred; allocate (or reuse) the buffers of what is."""
        self.pool: dict[tuple, torch.Tensor] = {}
        sources: list[torch.Tensor] = []
        names: list[str] = []
        self._buffers: list[torch.Tensor] = []

        def leaf(t: torch.Tensor, key: tuple, where: str | None) -> torch.Tensor:
            if key in defer and key[0] != "id" and t.layout == torch.strided and not t.requires_grad:
                buf = pool.get(key) if pool is not None else None
                if buf is None:
                    buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda and torch.cuda.is_available())
                self.pool[key] = buf
                self._buffers.append(buf)
                sources.append(t)
                names.append(where or name)
                return buf
            return t.detach().to("cpu", copy=True)

        self.result = _walk(obj, leaf, {}, name)
        self.pending = LiveRefs(sources, names)
        cuda = next((t.device for t in sources if t.is_cuda), None)
        self._ready = None
        if cuda is not None:  # the deferred copy must not start before the work queued so far
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(cuda))
            self._device = cuda

    def finish(self) -> list[str]:
        """Copy the deferred tensors into their buffers; return the names of those written to meanwhile.

        A non-empty answer means ``result`` mixes two states (the write may have raced the copy).
        References to the live tensors are dropped afterwards; call it once.
        """
        sources = self.pending._tensors
        try:
            if self._ready is None:
                for buf, src in zip(self._buffers, sources, strict=True):
                    buf.copy_(src)
            else:
                stream = torch.cuda.Stream(device=self._device)
                stream.wait_event(self._ready)
                with torch.cuda.stream(stream):
                    for buf, src in zip(self._buffers, sources, strict=True):
                        buf.copy_(src, non_blocking=src.is_cuda)  # into pinned host memory
                stream.synchronize()
            return self.pending.changed()
        finally:
            self._buffers = []
            self.pending = LiveRefs()
