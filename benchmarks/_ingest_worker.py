"""One measurement of benchmarks/ingest.py, run in a fresh process: ``python _ingest_worker.py '<json spec>'``.

A fresh process per measurement keeps the loaders from sharing warm state, and makes its peak RSS (ru_maxrss)
that loader's own. The process prints one ``RESULT {json}`` line. The spec's ``kind`` picks what is measured:

- ``parquet``: raytrainer's ParquetDataset, ``bind(rank, world)``, iterated once;
- ``memory``: the table read into memory with pyarrow first (timed apart), then a torch DataLoader over it whose
  dataset batch-indexes columns (``__getitems__``), so collate runs once per batch, not per row;
- ``raw``: the floor: ``pyarrow.parquet.ParquetFile.read_row_group`` over this rank's row groups, no torch, no work;
- ``raw_batches``: ``ParquetFile.iter_batches(batch_size=...)`` over them, no torch, no work;
- ``raw_work``: a minimal inline loader: each row group read, handed to torch zero-copy, sliced into batches, and
  the per-batch work below (what any loader must at least do);
- ``raydata``: ``ray.data.read_parquet(...).iter_torch_batches`` (``splits`` 2: ``streaming_split(2)`` consumed by
  two Ray tasks at once, inside this one process's Ray instance);
- ``resume_write`` / ``resume_time``: write checkpoints at given steps of an in-process fit, or time a resumed fit
  from the call to ``fit(ckpt_path=...)`` to its first training_step.

Every reader but Ray Data and ParquetDataset (which shard themselves) takes row groups ``rank::world`` of the files
in sorted order. ``work`` is the same on every loader: stack the feature columns and sum them (one small op that
touches every feature value, so the batches are really used).
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import pyarrow as pa  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, IterableDataset  # noqa: E402

from raytrainer.io.storage import resolve  # noqa: E402 - imported here, not inside a timed window

FEATURES = [f"f{i}" for i in range(16)]
COLUMNS = ["row_id", *FEATURES, "label"]
ROW_BYTES = 8 + 4 * len(FEATURES) + 8  # uncompressed bytes of one row


def work(batch: dict[str, torch.Tensor]) -> int:
    """The per-batch work every loader gets, small and touching every feature value: their sum; returns rows."""
    torch.stack([batch[c] for c in FEATURES]).sum()
    return len(batch["row_id"])


def resolve_files(files: list[str]) -> tuple[pafs.FileSystem, list[str]]:
    """The pyarrow filesystem and paths inside it for local paths or s3:// URIs (raytrainer's own resolution)."""
    resolved = [resolve(f) for f in files]
    return resolved[0][0], [p for _, p in resolved]


def my_row_groups(files: list[str], rank: int, world: int) -> Iterator[tuple[pq.ParquetFile, list[int]]]:
    """This rank's row groups (``rank::world`` over all files' row groups in order), one open file at a time (an open
    file keeps its pre-buffered column chunks until closed, so files are opened only as they are read)."""
    fs, paths = resolve_files(files)
    if world == 1:  # everything: no need to read the footers up front
        for path in paths:
            with fs.open_input_file(path) as raw, pq.ParquetFile(raw) as f:
                yield f, list(range(f.metadata.num_row_groups))
        return
    counts = [pq.read_metadata(p, filesystem=fs).num_row_groups for p in paths]
    pairs = [(i, g) for i, n in enumerate(counts) for g in range(n)][rank::world]
    for i, path in enumerate(paths):
        groups = [g for j, g in pairs if j == i]
        if groups:
            with fs.open_input_file(path) as raw, pq.ParquetFile(raw) as f:
                yield f, groups


def to_torch(rb: pa.RecordBatch) -> dict[str, torch.Tensor]:
    """A record batch's columns as tensors, zero-copy (numeric columns without nulls)."""
    return {name: torch.from_numpy(col.to_numpy(zero_copy_only=True))
            for name, col in zip(rb.schema.names, rb.columns)}


class InMemoryColumns(Dataset):
    """Map-style dataset over columns held in memory; ``__getitems__`` returns a whole batch of tensors at once."""

    def __init__(self, files: list[str], rank: int = 0, world: int = 1) -> None:
        tables = [f.read_row_groups(groups, columns=COLUMNS) for f, groups in my_row_groups(files, rank, world)]
        table = pa.concat_tables(tables)
        del tables
        self.columns = {c: torch.from_numpy(table.column(c).to_numpy()) for c in COLUMNS}  # one copy per column
        self.rows = table.num_rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {c: v[i] for c, v in self.columns.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices)
        return {c: v[idx] for c, v in self.columns.items()}


def whole_batch(batch: Any) -> Any:
    """collate_fn for InMemoryColumns: the dataset already returns the batch."""
    return batch


class PlainParquetIterable(IterableDataset):
    """What a loader looked like before resume support: streams batches with pyarrow, keeps no position."""

    def __init__(self, files: list[str], batch_size: int) -> None:
        self.files, self.batch_size = files, batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for f, groups in my_row_groups(self.files, 0, 1):
            for rb in f.iter_batches(batch_size=self.batch_size, row_groups=groups, columns=COLUMNS):
                yield to_torch(rb)


def rss_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line (Linux only)")


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so the peak is the measurement's own, not the imports'."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def barrier(spec: dict[str, Any]) -> None:
    """Start together with the other ranks of this measurement (files in spec['barrier']; 300 s timeout)."""
    if spec.get("world", 1) == 1 or not spec.get("barrier"):
        return
    d = Path(spec["barrier"])
    (d / f"ready.{spec['rank']}").touch()
    deadline = time.monotonic() + 300
    while len(list(d.glob("ready.*"))) < spec["world"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other ranks of this measurement did not start within 300 s ({d})")
        time.sleep(0.002)


# ------------------------------------------------------------------------------------------- throughput kinds
def run_parquet(spec: dict[str, Any]) -> dict[str, Any]:
    from raytrainer.data import ParquetDataset

    src = spec["files"] if spec.get("path") is None else spec["path"]
    ds = ParquetDataset(src, columns=COLUMNS, batch_size=spec["batch_size"], **spec.get("options", {}))
    ds.bind(spec["rank"], spec["world"])
    barrier(spec)
    rows, t0 = 0, time.perf_counter()
    for batch in ds:
        rows += work(batch)
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def run_memory(spec: dict[str, Any]) -> dict[str, Any]:
    barrier(spec)
    t0 = time.perf_counter()
    ds = InMemoryColumns(spec["files"], spec["rank"], spec["world"])
    load = time.perf_counter() - t0
    loader = DataLoader(ds, batch_size=spec["batch_size"], collate_fn=whole_batch)
    rows, t1 = 0, time.perf_counter()
    for batch in loader:
        rows += work(batch)
    return {"rows": rows, "seconds": time.perf_counter() - t1, "load_s": load}


def run_raw(spec: dict[str, Any]) -> dict[str, Any]:
    """The floor: decode this rank's row groups whole with ``ParquetFile.read_row_group``; no batches, no torch."""
    barrier(spec)
    rows, t0 = 0, time.perf_counter()
    for f, groups in my_row_groups(spec["files"], spec["rank"], spec["world"]):
        for g in groups:
            rows += f.read_row_group(g, columns=COLUMNS).num_rows
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def run_raw_batches(spec: dict[str, Any]) -> dict[str, Any]:
    """``ParquetFile.iter_batches(batch_size=...)``: pyarrow cutting the batches itself; no torch, no work."""
    barrier(spec)
    rows, t0 = 0, time.perf_counter()
    for f, groups in my_row_groups(spec["files"], spec["rank"], spec["world"]):
        for rb in f.iter_batches(batch_size=spec["batch_size"], row_groups=groups, columns=COLUMNS):
            rows += rb.num_rows
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def run_raw_work(spec: dict[str, Any]) -> dict[str, Any]:
    """The least a loader must do, inline in one thread: read a row group, its columns to torch zero-copy,
    slice batches of batch_size rows (the last one of a row group may be short), and the per-batch work."""
    barrier(spec)
    bs = spec["batch_size"]
    rows, t0 = 0, time.perf_counter()
    for f, groups in my_row_groups(spec["files"], spec["rank"], spec["world"]):
        for g in groups:
            cols = to_torch(f.read_row_group(g, columns=COLUMNS).combine_chunks().to_batches()[0])
            n = len(cols["row_id"])
            for start in range(0, n, bs):
                rows += work({c: v[start:start + bs] for c, v in cols.items()})
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def run_raydata(spec: dict[str, Any]) -> dict[str, Any]:
    import logging

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray.data.range(8).materialize()  # start Ray's worker processes before timing
        batch_size = spec["batch_size"]
        ds = ray.data.read_parquet(spec["files"], columns=COLUMNS)
        if spec.get("splits", 1) == 1:
            rows, t0 = 0, time.perf_counter()
            for batch in ds.iter_torch_batches(batch_size=batch_size):
                rows += work(batch)
            return {"rows": rows, "seconds": time.perf_counter() - t0}

        @ray.remote(num_cpus=0)  # the consumers take no CPU slot, so Ray Data's read tasks get them all
        def consume(split: Any) -> dict[str, Any]:
            torch.set_num_threads(1)
            n, start = 0, time.perf_counter()
            for b in split.iter_torch_batches(batch_size=batch_size):
                n += work(b)
            return {"rows": n, "seconds": time.perf_counter() - start}

        ranks = ray.get([consume.remote(s) for s in ds.streaming_split(spec["splits"], equal=True)], timeout=1800)
        return {"rows": sum(r["rows"] for r in ranks) / len(ranks),
                "seconds": sum(r["seconds"] for r in ranks) / len(ranks),
                "per_rank_rows_per_s": [r["rows"] / r["seconds"] for r in ranks]}
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------------- resume kinds
def make_loader(kind: str, files: list[str], batch_size: int) -> tuple[Any, float]:
    """The training loader of a resume measurement, and how long building it took (the in-memory load)."""
    t0 = time.perf_counter()
    if kind in ("parquet", "parquet_shuffle"):
        from raytrainer.data import ParquetDataset

        loader: Any = ParquetDataset(files, columns=COLUMNS, batch_size=batch_size, shuffle=kind == "parquet_shuffle",
                                     seed=0)
    elif kind == "map":
        loader = DataLoader(InMemoryColumns(files), batch_size=batch_size, collate_fn=whole_batch)
    elif kind == "iterable":
        loader = DataLoader(PlainParquetIterable(files, batch_size), batch_size=None)
    else:
        raise ValueError(f"unknown resume loader {kind!r}: use parquet, parquet_shuffle, map or iterable")
    return loader, time.perf_counter() - t0


def resume_trainer(max_steps: int, callbacks: list[Any]) -> Any:
    import raytrainer as rt

    return rt.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, callbacks=callbacks)


def classifier() -> Any:
    """A linear classifier over the features that notes when (and on which rows) its first step ran."""
    import raytrainer as rt

    class Classifier(rt.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Linear(len(FEATURES), 10)
            self.first_step_at: float | None = None
            self.first_row: int | None = None

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            if self.first_step_at is None:
                self.first_step_at = time.perf_counter()
                self.first_row = int(batch["row_id"][0])
            x = torch.stack([batch[c] for c in FEATURES], 1)
            return torch.nn.functional.cross_entropy(self.net(x), batch["label"])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Classifier()


def run_resume_write(spec: dict[str, Any]) -> dict[str, Any]:
    """One fit up to the last of spec['save_at'] steps, saving a checkpoint at each of them."""
    import raytrainer as rt

    save_at, out = set(spec["save_at"]), spec["ckpt_dir"]
    os.makedirs(out, exist_ok=True)

    class SaveAt(rt.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
            if trainer.global_step in save_at:
                trainer.save_checkpoint(os.path.join(out, f"step={trainer.global_step}.ckpt"))

    loader, _ = make_loader(spec["loader"], spec["files"], spec["batch_size"])
    t0 = time.perf_counter()
    resume_trainer(max(save_at), [SaveAt()]).fit(classifier(), train_dataloaders=loader)
    return {"seconds": time.perf_counter() - t0,
            "ckpts": {s: os.path.join(out, f"step={s}.ckpt") for s in sorted(save_at)}}


def run_resume_time(spec: dict[str, Any]) -> dict[str, Any]:
    """Seconds from fit(ckpt_path=...) to the first training_step of the resumed fit, which trains one batch; a
    one-step fit on a dummy batch first pays what any first fit in a process pays (imports, set-up), the same at
    every resume point, so the timing is the resume's own."""
    warm = {c: torch.zeros(8, dtype=torch.int64 if c in ("row_id", "label") else torch.float32) for c in COLUMNS}
    # the process's one-time start-up costs:
    resume_trainer(1, []).fit(classifier(), train_dataloaders=DataLoader([warm], batch_size=None))
    loader, build = make_loader(spec["loader"], spec["files"], spec["batch_size"])
    model = classifier()
    trainer = resume_trainer(spec["step"] + 1, [])
    t0 = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader, ckpt_path=spec["ckpt"])
    if model.first_step_at is None:
        raise RuntimeError(f"the resumed fit from {spec['ckpt']} trained no batch (global_step {trainer.global_step})")
    return {"seconds": model.first_step_at - t0, "first_row": model.first_row, "build_s": build}


KINDS = {"parquet": run_parquet, "memory": run_memory, "raw": run_raw, "raw_batches": run_raw_batches,
         "raw_work": run_raw_work, "raydata": run_raydata, "resume_write": run_resume_write,
         "resume_time": run_resume_time}


def main() -> None:
    spec = json.loads(sys.argv[1])
    spec.setdefault("rank", 0)
    spec.setdefault("world", 1)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # one rank per core, as a training rank would run; pyarrow keeps its own threads
    reset_peak_rss()
    rss0, cpu0 = rss_kib("VmRSS"), time.process_time()
    result = KINDS[spec["kind"]](spec)
    result["peak_rss_growth"] = (rss_kib("VmHWM") - rss0) * 1024
    result["cpu_s"] = time.process_time() - cpu0  # all of this process's threads (not Ray's workers), set-up included
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
