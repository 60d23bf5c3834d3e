"""In-memory snapshots of a sharded (FSDP) run: each rank's shards as one piece, and a whole snapshot assembled from
every rank's piece onto any new layout.

Under FSDP no rank holds the whole model, so a snapshot is N pieces, one per rank: the rank's checkpoint dict
(``bridge.capture(gather=False)``) whose sharded tensors are copied once into one flat host buffer and replaced by
``LocalShard`` records (offset and shape in the global tensor, where the bytes are); the rest is serialized with
``torch.save``. ``Piece.index`` lists each shard's offset and size in walk order, so a loader knows which pieces it
needs before it reads any.

``ShardedSnapshot`` is the whole snapshot handed to a restarted group: the pieces (in memory, or Ray object refs the
ranks fetch on demand) and rank 0's light state. ``ShardedSnapshot.state()`` is a checkpoint dict whose sharded
tensors are ``ShardSource`` placeholders; ``ShardSource.place_like(target)`` builds the target's block (a DTensor of
this rank's layout, on any world size or mesh) by copying the overlapping regions out of the old pieces, or the
whole tensor for an unsharded target. Imports torch only (Ray when a piece is a ref).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from raytrainer.utilities import apply_to_tensors

__all__ = ["LocalShard", "Piece", "ShardSource", "ShardedSnapshot", "make_piece"]

FETCH_TIMEOUT_S = 120.0  # reading one piece from the object store


@dataclass
class LocalShard:
    """One rank's block of a sharded tensor: it sits at ``offset`` inside a tensor of ``shape``; its data are the
    bytes ``[start, start + size.numel() * itemsize)`` of the piece's flat buffer."""

    shape: tuple[int, ...]
    offset: tuple[int, ...]
    size: tuple[int, ...]
    dtype: torch.dtype
    start: int

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        n = math.prod(self.size) * self.dtype.itemsize
        return flat[self.start:self.start + n].view(self.dtype).view(self.size)


@dataclass
class Piece:
    """One rank's part of a snapshot: the light state (serialized, shards replaced by LocalShard records), one flat
    byte buffer holding every shard, and per shard in walk order (offset, local size)."""

    owner: int                  # the rank that took it
    step: int                   # global step of the boundary it was taken at
    epoch: int
    data: Any                   # bytes (torch.save of the light state), or a Ray ObjectRef to them
    index: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    flat: Any = None            # a uint8 tensor with every shard's bytes, or a Ray ObjectRef to it


_ALIGN = 64  # each shard starts on a multiple of this many bytes, so its bytes view as any dtype


def _local_block(t: Any) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A DTensor's local block and its offset in the global tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = t.to_local()
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(local.shape) != tuple(shape):
        raise RuntimeError(f"a sharded tensor's local block has shape {tuple(local.shape)}, but its placement gives "
                           f"{tuple(shape)}: this layout cannot be snapshotted; set snapshot_every_n_steps=0.")
    return local, tuple(offset)


def make_piece(state: dict[str, Any], owner: int, step: int, epoch: int) -> Piece:
    """This rank's checkpoint dict (sharded tensors as DTensors) as a Piece: the shards copied once into one flat
    host buffer, everything else copied and serialized."""
    from torch.distributed.tensor import DTensor

    index: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    blocks: list[tuple[LocalShard, torch.Tensor]] = []
    end = 0

    def leaf(t: torch.Tensor) -> Any:
        nonlocal end
        if isinstance(t, DTensor):
            local, offset = _local_block(t)
            record = LocalShard(tuple(t.shape), offset, tuple(local.shape), local.dtype, end)
            end += -(-local.numel() * local.element_size() // _ALIGN) * _ALIGN
            index.append((offset, tuple(local.shape)))
            blocks.append((record, local))
            return record
        return t.detach().to("cpu", copy=True)

    light = apply_to_tensors(state, leaf)
    flat = torch.empty(end, dtype=torch.uint8)
    for record, local in blocks:
        record.view(flat).copy_(local.detach())
    buf = io.BytesIO()
    torch.save(light, buf)
    return Piece(owner, step, epoch, buf.getvalue(), index, flat)


def _get(value: Any) -> Any:
    """A Piece field: the value itself, or what a Ray ObjectRef points to."""
    if isinstance(value, (bytes, bytearray, torch.Tensor)):
        return value
    import ray

    return ray.get(value, timeout=FETCH_TIMEOUT_S)


def _read(data: Any) -> Any:
    return torch.load(io.BytesIO(_get(data)), weights_only=False, map_location="cpu")


class ShardSource:
    """Placeholder for the ``i``-th sharded tensor of a ShardedSnapshot (in walk order) of global ``shape``."""

    def __init__(self, snapshot: ShardedSnapshot, i: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.snapshot, self.i, self.shape, self.dtype = snapshot, i, tuple(shape), dtype

    def region(self, offset: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
        """The block at ``offset`` of ``size``, copied out of every old piece that overlaps it."""
        out = torch.empty(size, dtype=self.dtype)
        for rank, piece in enumerate(self.snapshot.pieces):
            p_off, p_size = piece.index[self.i]
            lo = [max(a, b) for a, b in zip(offset, p_off)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offset, size, p_off, p_size)]
            if any(h <= low for low, h in zip(lo, hi)) and len(size):
                continue
            src = self.snapshot.shard(rank, self.i)
            dst = out
            for d, (low, h) in enumerate(zip(lo, hi)):
                src = src.narrow(d, low - p_off[d], h - low)
                dst = dst.narrow(d, low - offset[d], h - low)
            dst.copy_(src)
        return out

    def place_like(self, target: Any) -> torch.Tensor:
        """This tensor laid out as ``target``: a DTensor of the target's mesh and placements (this rank's block
        only), or the whole tensor when the target is not sharded."""
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if not isinstance(target, DTensor):
            whole = self.region((0,) * len(self.shape), self.shape)
            return whole if target is None else whole.to(device=target.device, dtype=target.dtype)
        if tuple(target.shape) != self.shape:
            raise ValueError(f"the snapshot's tensor has shape {self.shape} but the module's has "
                             f"{tuple(target.shape)}: resume with the same model.")
        size, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
        local = self.region(tuple(offset), tuple(size)).to(device=target.device, dtype=target.dtype)
        return DTensor.from_local(local, target.device_mesh, target.placements, run_check=False,
                                  shape=target.shape, stride=target.stride())


class ShardedSnapshot(dict):
    """A whole sharded snapshot: every rank's Piece of one step. It is a dict (``epoch``, ``global_step``) so it
    travels wherever a snapshot dict does; ``state()`` gives the checkpoint dict to restore from."""

    def __init__(self, pieces: list[Piece]) -> None:
        steps = {p.step for p in pieces}
        if len(steps) != 1 or sorted(p.owner for p in pieces) != list(range(len(pieces))):
            raise ValueError(f"a sharded snapshot needs one piece per rank of one step, got owners "
                             f"{sorted(p.owner for p in pieces)} at steps {sorted(steps)}")
        pieces = sorted(pieces, key=lambda p: p.owner)
        super().__init__(epoch=pieces[0].epoch, global_step=pieces[0].step)
        self.pieces = pieces
        self._cache: dict[int, tuple[list[LocalShard], torch.Tensor]] = {}

    @property
    def step(self) -> int:
        return self.pieces[0].step

    @property
    def world_size(self) -> int:
        return len(self.pieces)

    def to_object_store(self) -> ShardedSnapshot:
        """The same snapshot with each piece's bytes put in the Ray object store once, so a group receives refs
        and each rank reads only the pieces its new blocks overlap."""
        import ray

        def put(value: Any) -> Any:
            return ray.put(value) if isinstance(value, (bytes, bytearray, torch.Tensor)) else value
        return ShardedSnapshot([Piece(p.owner, p.step, p.epoch, put(p.data), p.index, put(p.flat))
                                for p in self.pieces])

    def shard(self, rank: int, i: int) -> torch.Tensor:
        """The data of the ``i``-th sharded tensor of rank ``rank``'s piece (the piece read once, then cached)."""
        cached = self._cache.get(rank)
        if cached is None:
            found: list[LocalShard] = []
            apply_to_tensors(_read(self.pieces[rank].data), lambda t: t, leaf=lambda v: found.append(v)
                             if isinstance(v, LocalShard) else v)
            cached = self._cache[rank] = (found, _get(self.pieces[rank].flat))
        records, flat = cached
        return records[i].view(flat)

    def state(self) -> dict[str, Any]:
        """Rank 0's checkpoint dict with every sharded tensor a ShardSource (placed later with ``place_like``)."""
        light = _read(self.pieces[0].data)
        count = [0]

        def leaf(v: Any) -> Any:
            if not isinstance(v, LocalShard):
                return v
            count[0] += 1
            return ShardSource(self, count[0] - 1, v.shape, v.dtype)
        return apply_to_tensors(light, lambda t: t, leaf=leaf)

    def release(self) -> None:
        """Drop the pieces read so far (after the restore)."""
        self._cache.clear()
