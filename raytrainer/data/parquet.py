"""Streaming Parquet for training: each rank reads only its row groups, in a background thread, and a resumed
or resized run starts reading where the last one stopped.

How an epoch is laid out (everything below is a pure function of the dataset's row groups, ``seed``, the epoch
and the "segments" of the epoch, so every rank computes the same plan without talking to the others):

* The *stream*: the row groups of all files, in file order, or permuted by ``(seed, epoch)`` when ``shuffle``.
* The rows still due this epoch are a list of stream intervals (all of them at the start of an epoch).
* A world of W ranks splits them into W contiguous chunks of equal batch counts; a rank reads its chunk in
  *windows* of ``shuffle_buffer_size`` rows, each permuted by ``(seed, epoch, segment, rank, window)``.
* A *segment* ``[world, batches per rank, batch size]`` records what one world consumed. A resume in the same
  world continues its plan at the saved batch; a resume in another world (elastic resize, a restart on fewer
  ranks) removes exactly the rows every earlier segment consumed and splits the rest over the new world, so
  every row is trained exactly once per epoch.
"""
from __future__ import annotations

import bisect
import hashlib
import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from raytrainer.io import storage

Intervals = list[tuple[int, int]]  # sorted, disjoint [start, end) ranges of stream positions
_DONE = object()
_PUT_POLL_S = 0.2
READ_TIMEOUT_S = float(os.environ.get("RAYTRAINER_PARQUET_READ_TIMEOUT_S", "600"))


@dataclass(frozen=True)
class _RowGroup:
    file: int  # index into ParquetDataset.files
    index: int  # row group inside the file
    rows: int


def _split(rows: int, world: int, batch: int, drop_last: bool) -> tuple[list[int], int]:
    """Rows per rank and the batches every rank yields, for ``rows`` rows over ``world`` ranks.

    All ranks yield the same number of batches (DDP needs it). Without drop_last nothing is dropped: a last
    round too small for a batch per rank becomes one smaller batch on every rank, or, with fewer leftover rows
    than ranks, one extra row in some ranks' last batch. Fewer rows than ranks cannot be split: none are given.
    """
    per_round = world * batch
    rounds, tail = divmod(rows, per_round)
    if drop_last or tail == 0:
        return [rounds * batch] * world, rounds
    if rounds == 0 and tail < world:
        return [0] * world, 0
    if tail >= world or rounds == 0:
        return [rounds * batch + tail // world + (k < tail % world) for k in range(world)], rounds + 1
    return [rounds * batch + (k < tail) for k in range(world)], rounds


def _consumed(size: int, batches: int, batch: int, done: int) -> int:
    """Rows of a chunk of ``size`` rows consumed after ``done`` of its ``batches`` batches."""
    return size if done >= batches else done * batch


def _take(intervals: Intervals, start: int, count: int) -> Intervals:
    """The stream intervals at positions [start, start + count) of the sequence ``intervals`` describes."""
    out: Intervals = []
    pos = 0
    for a, b in intervals:
        n = b - a
        if count <= 0:
            break
        if pos + n > start:
            lo = a + max(0, start - pos)
            hi = min(b, lo + count)
            out.append((lo, hi))
            count -= hi - lo
            start = pos + n
        pos += n
    return out


def _runs(sorted_positions: np.ndarray) -> Intervals:
    """Sorted distinct integers as [start, end) runs."""
    if sorted_positions.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_positions) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [sorted_positions.size]))
    return [(int(sorted_positions[s]), int(sorted_positions[e - 1]) + 1) for s, e in zip(starts, ends)]


def _merge(intervals: Intervals) -> Intervals:
    out: Intervals = []
    for a, b in sorted(intervals):
        if b <= a:
            continue
        if out and out[-1][1] >= a:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _total(intervals: Intervals) -> int:
    return sum(b - a for a, b in intervals)


@dataclass
class _Plan:
    """This rank's part of the epoch: its chunk of stream intervals, its batches, and how far it is."""

    segment: int
    chunk: Intervals
    size: int
    batches: int


class ParquetDataset(IterableDataset):
    """Batches from Parquet files on a local path or any pyarrow filesystem URI (``s3://``, ``gs://``, ...).

    Reads only ``columns``, by row group, ahead of the training loop in a background thread (``read_ahead``
    windows of ``shuffle_buffer_size`` rows), and yields dicts of column name -> tensor (numeric columns
    without a copy where Arrow allows; fixed-size lists as 2-D tensors; other types as Python lists), or what
    ``transform`` returns for such a dict. With ``shuffle``, the row group order and the rows inside each window
    are permuted from ``seed`` and the epoch. Pass it to ``Trainer.fit`` as a loader (or wrap it in
    ``DataLoader(ds, batch_size=None)``): raytrainer gives each rank its share and saves its position in
    checkpoints, so a resumed run reads on from there, and a resized one splits what is left of the epoch.
    """

    def __init__(self, path_or_uri: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                 columns: Sequence[str] | None = None, batch_size: int = 256, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, transform: Callable[[dict[str, Any]], Any] | None = None,
                 shuffle_buffer_size: int = 65536, read_ahead: int = 2,
                 filesystem: pafs.FileSystem | None = None) -> None:
        super().__init__()
        paths = [path_or_uri] if isinstance(path_or_uri, (str, os.PathLike)) else list(path_or_uri)
        if not paths:
            raise ValueError("ParquetDataset needs a path, a URI or a list of files; got an empty list.")
        for name, value, low in (("batch_size", batch_size, 1), ("shuffle_buffer_size", shuffle_buffer_size, 1),
                                 ("read_ahead", read_ahead, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"ParquetDataset({name}={value!r}): expected an int >= {low}.")
        if transform is not None and not callable(transform):
            raise TypeError(f"ParquetDataset(transform=...) must be callable, got {type(transform).__name__}.")
        self.paths = [os.fspath(p) for p in paths]
        self.columns = list(columns) if columns is not None else None
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, bool(shuffle), int(seed), drop_last
        self.transform, self.window, self.read_ahead = transform, shuffle_buffer_size, read_ahead
        self.filesystem = filesystem
        self.rank, self.world = 0, 1
        self.epoch = 0
        self._prior: list[list[int]] = []  # segments of earlier worlds in this epoch
        self._first = 0                    # the batch of this world's plan the next pass starts at
        self.files: list[str] | None = None
        self._groups: list[_RowGroup] | None = None
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ metadata
    def _fs(self) -> tuple[pafs.FileSystem, list[str]]:
        resolved = [storage.resolve(p, self.filesystem) for p in self.paths]
        return resolved[0][0], [p for _, p in resolved]

    def _discover(self) -> None:
        """List the files and their row groups (footers only), once; checks the asked columns exist."""
        if self._groups is not None:
            return
        fs, paths = self._fs()
        try:
            files = sorted(pads.dataset(paths if len(paths) > 1 else paths[0], filesystem=fs, format="parquet").files)
        except (FileNotFoundError, OSError, pa.ArrowInvalid) as err:
            raise FileNotFoundError(f"ParquetDataset: cannot list Parquet files at {self.paths}: {err}") from err
        if not files:
            raise FileNotFoundError(f"ParquetDataset: no Parquet files at {self.paths}.")

        def footer(path: str) -> pq.FileMetaData:
            with fs.open_input_file(path) as f:
                return pq.ParquetFile(f).metadata

        with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
            metas = list(pool.map(footer, files))
        names = metas[0].schema.to_arrow_schema().names
        missing = [c for c in self.columns or [] if c not in names]
        if missing:
            raise ValueError(f"ParquetDataset(columns=...): {missing} not in the files at {self.paths}; their "
                             f"columns are {names}.")
        self.files = files
        self._groups = [_RowGroup(i, g, meta.row_group(g).num_rows)
                        for i, meta in enumerate(metas) for g in range(meta.num_row_groups)
                        if meta.row_group(g).num_rows > 0]

    @property
    def num_rows(self) -> int:
        """Rows in the whole dataset (all ranks, one epoch)."""
        self._discover()
        assert self._groups is not None
        return sum(g.rows for g in self._groups)

    def fingerprint(self) -> str:
        """Identifies the data and the options that fix an epoch's order; a resume checks it is unchanged."""
        if self._fingerprint is None:  # once: every checkpoint and snapshot records it
            self._discover()
            assert self._groups is not None and self.files is not None
            key = repr((self.files, [(g.file, g.index, g.rows) for g in self._groups], self.shuffle, self.seed,
                        self.window, self.drop_last))
            self._fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self._fingerprint

    # ------------------------------------------------------------------ position (called by the loops)
    def bind(self, rank: int, world: int) -> None:
        """Make this copy rank ``rank`` of ``world``: it reads only its share."""
        if not 0 <= rank < world:
            raise ValueError(f"ParquetDataset.bind: rank {rank} is not in a world of {world}.")
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (its order comes from ``seed`` and ``epoch``)."""
        self.epoch, self._prior, self._first = int(epoch), [], 0

    def start_at(self, segments: Sequence[Sequence[int]]) -> int:
        """Continue this epoch after ``segments`` (what each world consumed so far, the last one possibly this
        world's). Returns the batch this world continues at: the saved one when the last segment was this world
        with this batch size, else 0 with the remaining rows split anew."""
        segs = [[int(x) for x in s] for s in segments]
        if segs and segs[-1][0] == self.world and segs[-1][2] == self.batch_size:
            self._prior, self._first = segs[:-1], segs[-1][1]
        else:
            self._prior, self._first = segs, 0
        return self._first

    def segments_at(self, done: int) -> list[list[int]]:
        """The segments to save after this world trained ``done`` batches of its plan this epoch."""
        return [list(s) for s in self._prior] + [[self.world, int(done), self.batch_size]]

    # ------------------------------------------------------------------ the plan
    def _stream(self) -> tuple[list[_RowGroup], list[int]]:
        """The row groups in this epoch's order and the stream position each starts at."""
        self._discover()
        groups = list(self._groups or [])
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(groups))
            groups = [groups[i] for i in order]
        starts = np.concatenate(([0], np.cumsum([g.rows for g in groups])[:-1])).astype(np.int64).tolist()
        return groups, starts

    def _perm(self, segment: int, rank: int, window: int, n: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epoch, segment, rank, window, 7]).permutation(n)

    def _unconsumed(self, chunk: Intervals, size: int, used: int, segment: int, rank: int) -> Intervals:
        """Stream intervals of ``chunk`` (``size`` rows) not among the first ``used`` rows in read order."""
        if used >= size:
            return []
        m = used // self.window
        lo, hi = m * self.window, min((m + 1) * self.window, size)
        left = lo + np.sort(self._perm(segment, rank, m, hi - lo)[used - lo:])
        out: Intervals = []
        for a, b in _runs(left):
            out.extend(_take(chunk, a, b - a))
        out.extend(_take(chunk, hi, size - hi))
        return out

    def _plan(self) -> _Plan:
        """This rank's plan for the current epoch after the earlier worlds' segments."""
        self._discover()
        remaining: Intervals = [(0, self.num_rows)]
        for seg, (world, done, batch) in enumerate(self._prior):
            sizes, batches = _split(_total(remaining), world, batch, self.drop_last)
            kept: Intervals = []
            off = 0
            for k, size in enumerate(sizes):
                chunk = _take(remaining, off, size)
                kept.extend(self._unconsumed(chunk, size, _consumed(size, batches, batch, done), seg, k))
                off += size
            kept.extend(_take(remaining, off, _total(remaining) - off))  # rows no rank of that world got
            remaining = _merge(kept)
        total = _total(remaining)
        sizes, batches = _split(total, self.world, self.batch_size, self.drop_last)
        if batches == 0 and total and not self.drop_last:
            warnings.warn(f"ParquetDataset: {total} row(s) left in epoch {self.epoch} cannot be split over "
                          f"{self.world} ranks (fewer rows than ranks); they are skipped this epoch.", stacklevel=3)
        start = sum(sizes[:self.rank])
        return _Plan(len(self._prior), _take(remaining, start, sizes[self.rank]), sizes[self.rank], batches)

    def __len__(self) -> int:
        """Batches this rank yields this epoch (from its current start, counted from the plan's beginning)."""
        return self._plan().batches

    # ------------------------------------------------------------------ reading
    def _read_window(self, plan: _Plan, m: int, groups: list[_RowGroup], starts: list[int],
                     files: dict[int, pq.ParquetFile], cache: dict[str, Any]) -> dict[str, Any]:
        """Window ``m`` of this rank's chunk as column -> tensor/list, rows in read (permuted) order."""
        lo, hi = m * self.window, min((m + 1) * self.window, plan.size)
        pieces = []
        for a, b in _take(plan.chunk, lo, hi - lo):
            while a < b:
                g = bisect.bisect_right(starts, a) - 1
                group = groups[g]
                if cache.get("key") != (group.file, group.index):
                    if group.file not in files:
                        for old in list(files)[:-1]:  # keep at most 2 files open: an open file holds its buffers
                            files.pop(old).close()
                        assert self.files is not None
                        files[group.file] = pq.ParquetFile(cache["fs"].open_input_file(self.files[group.file]))
                    cache["table"] = None  # let the last row group go before the next one is read
                    cache["table"] = self._read_group(files[group.file], group)
                    cache["key"] = (group.file, group.index)
                end = min(b, starts[g] + group.rows)
                pieces.append(cache["table"].slice(a - starts[g], end - a))
                a = end
        table = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
        perm = self._perm(plan.segment, self.rank, m, hi - lo) if self.shuffle else None
        return {name: _column(table.column(name), perm) for name in table.column_names}

    def _read_group(self, file: pq.ParquetFile, group: _RowGroup) -> pa.Table:
        """One row group, only the asked columns (the unit of reading: a resume reads at most one before its
        position, plus the rows of its shuffle window already trained)."""
        return file.read_row_group(group.index, columns=self.columns, use_threads=False)

    def _reader(self, plan: _Plan, first_window: int, out: queue.Queue, stop: threading.Event) -> None:
        """Background thread: read windows in order into ``out`` (bounded), then _DONE; errors go in too."""
        try:
            groups, starts = self._stream()
            files: dict[int, pq.ParquetFile] = {}
            cache: dict[str, Any] = {"fs": self._fs()[0]}
            n_windows = -(-plan.size // self.window)
            for m in range(first_window, n_windows):
                item = self._read_window(plan, m, groups, starts, files, cache)
                while not stop.is_set():
                    try:
                        out.put(item, timeout=_PUT_POLL_S)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            item = _DONE
        except BaseException as err:  # noqa: BLE001 -- handed to the training thread, which raises it
            item = err
        while not stop.is_set():
            try:
                out.put(item, timeout=_PUT_POLL_S)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ValueError(f"ParquetDataset in a DataLoader with num_workers={info.num_workers}: every worker "
                             "would read the same rows. It reads ahead in its own thread; use num_workers=0 (or 1) "
                             "and batch_size=None, or pass the dataset itself to the Trainer.")
        plan = self._plan()
        first = min(self._first, plan.batches)
        pos = _consumed(plan.size, plan.batches, self.batch_size, first)
        q: queue.Queue = queue.Queue(maxsize=self.read_ahead)
        stop = threading.Event()
        thread = threading.Thread(target=self._reader, args=(plan, pos // self.window, q, stop), daemon=True,
                                  name="raytrainer-parquet-reader")
        thread.start()
        try:
            yield from self._batches(plan, first, pos - (pos // self.window) * self.window, q, thread)
        finally:
            stop.set()

    def _next_window(self, q: queue.Queue, thread: threading.Thread) -> dict[str, Any]:
        waited = 0.0
        while True:
            try:
                item = q.get(timeout=1.0)
                break
            except queue.Empty:
                waited += 1.0
                if not thread.is_alive() and q.empty():
                    raise RuntimeError("ParquetDataset: the reader thread ended without a result.") from None
                if waited >= READ_TIMEOUT_S:
                    raise TimeoutError(f"ParquetDataset: no data from {self.paths} in {READ_TIMEOUT_S:.0f} s (set "
                                       "RAYTRAINER_PARQUET_READ_TIMEOUT_S to wait longer).") from None
        if isinstance(item, BaseException):
            raise item
        if item is _DONE:
            raise RuntimeError("ParquetDataset: the reader ended before the plan's last row.")
        return item

    def _batches(self, plan: _Plan, first: int, skip: int, q: queue.Queue,
                 thread: threading.Thread) -> Iterator[Any]:
        window: dict[str, Any] | None = None
        offset = rows = 0
        for j in range(first, plan.batches):
            need = (_consumed(plan.size, plan.batches, self.batch_size, j + 1)
                    - _consumed(plan.size, plan.batches, self.batch_size, j))
            parts: list[dict[str, Any]] = []
            while need:
                if window is None or offset == rows:
                    window = self._next_window(q, thread)
                    rows = len(next(iter(window.values())))
                    offset, skip = min(skip, rows), 0
                n = min(need, rows - offset)
                parts.append({k: v[offset:offset + n] for k, v in window.items()})  # numpy views: cheap
                offset += n
                need -= n
            batch = parts[0] if len(parts) == 1 else {k: _concat([p[k] for p in parts]) for k in parts[0]}
            with warnings.catch_warnings():  # Arrow's buffers are read-only; batches are handed out, not written to
                warnings.simplefilter("ignore", UserWarning)
                batch = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
            yield self.transform(batch) if self.transform is not None else batch


def _concat(values: list[Any]) -> Any:
    if isinstance(values[0], np.ndarray):
        return np.concatenate(values)
    return [x for v in values for x in v]


def _column(col: pa.ChunkedArray, perm: np.ndarray | None) -> Any:
    """One column as a numpy array (numeric, bool, fixed-size lists of numbers; batches become tensors) or a list,
    rows in ``perm`` order."""
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    kind = arr.type
    if pa.types.is_fixed_size_list(kind) and (pa.types.is_integer(kind.value_type)
                                              or pa.types.is_floating(kind.value_type)):
        values = arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), kind.list_size)
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        values = arr.to_numpy(zero_copy_only=False)
    else:
        items = arr.to_pylist()
        return items if perm is None else [items[i] for i in perm]
    return values[perm] if perm is not None else values
