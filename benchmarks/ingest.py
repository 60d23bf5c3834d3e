"""Data ingest: raytrainer's ParquetDataset vs an in-memory DataLoader, Ray Data and pyarrow's raw read, in one command.

Data: a synthetic Parquet dataset the benchmark writes once and keeps (``--data``, default a directory in the temp
dir, reused by later runs of the same shape): an int64 ``row_id``, 16 float32 features ``f0``..``f15`` and an int64
``label`` (80 bytes a row, snappy, ``--row-group`` rows per row group, 2 row groups per file, about ``--gb`` GiB).
The files sit in the page cache after writing, so this measures decoding and handing batches over, not the disk.
Every loader yields dicts of column tensors of ``--batch-size`` rows and gets the same per-batch work (the sum of
all feature values); each measurement runs in a fresh process
(``benchmarks/_ingest_worker.py``), measurements alternate in order across ``--repeats``, and medians are reported.

1. throughput, rows/s per rank, 1 and 2 ranks (2 ranks: two processes at once, each reading its half): ParquetDataset
   (``bind(rank, 2)``); a torch DataLoader over the data read into memory with pyarrow first (rows/s shown both
   without and with that load, the load counted once per epoch); Ray Data ``read_parquet().iter_torch_batches()``
   (2 ranks: ``streaming_split(2)`` consumed by two Ray tasks); and pyarrow on the same row groups: the floor
   ("raw": ``ParquetFile.read_row_group``, whole row groups, no torch, no work), ``iter_batches(batch_size)``
   (pyarrow cutting the batches, no torch, no work), and a minimal inline loader (row group -> torch zero-copy ->
   batch slices -> the same work, one thread). Targets: ParquetDataset >= the best of the others, >= 0.9x raw.
2. peak RSS growth while streaming one epoch (VmHWM, reset after the imports), at ``--gb`` and at a quarter of it
   (the first quarter of the files): ParquetDataset should not grow with the dataset; the in-memory DataLoader does.
3. resume: an in-process ``Trainer(accelerator="cpu", devices=1)`` trains a linear classifier on the quarter-size
   data and saves checkpoints at 10% and 90% of the epoch; then a fresh process times ``fit(ckpt_path=...)`` to its
   first training_step, for ParquetDataset (also with shuffle=True), a map-style DataLoader over the in-memory data
   (its load is done before fit and not counted), and a plain IterableDataset over the files with no resume support
   (the loop reads and discards the trained batches: every loader before this change). Target: ParquetDataset's 90%
   within 1.2x of its 10%.
4. throughput from S3: a local moto server (``ThreadedMotoServer`` in this process) holding the first ``--s3-mb``
   MB of files; ParquetDataset on ``s3://bucket/data`` and raw pyarrow on the same files, 1 rank.

    python benchmarks/ingest.py [--gb 2] [--repeats 3] [--batch-size 1024] [--skip-s3] [--skip-ray-data] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "benchmarks" / "_ingest_worker.py"
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from _ingest_worker import FEATURES, ROW_BYTES  # noqa: E402 - the worker defines the schema and the work

RESUME_LOADERS = ("parquet", "parquet_shuffle", "map", "iterable")
RESUME_LABELS = {"parquet": "ParquetDataset", "parquet_shuffle": "ParquetDataset shuffle=True",
                 "map": "map-style DataLoader (in memory)", "iterable": "plain IterableDataset (before: re-reads)"}


# ------------------------------------------------------------------------------------------- data
def ensure_dataset(root: Path, gb: float, rg_rows: int, rgs_per_file: int = 2) -> dict[str, Any]:
    """Write the synthetic dataset under ``root`` unless a complete copy of the same shape is there; its facts."""
    name = f"gb{gb:g}-rg{rg_rows}x{rgs_per_file}"
    out, done = root / name, root / f"{name}.json"
    if done.exists():
        facts = json.loads(done.read_text())
        if all(os.path.exists(f) for f in facts["files"]):
            return facts
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    total = max(1, round(gb * 2**30 / ROW_BYTES / rg_rows)) * rg_rows
    per_file = rg_rows * rgs_per_file
    rng = np.random.default_rng(0)
    started, files = time.perf_counter(), []
    for i, start in enumerate(range(0, total, per_file)):
        n = min(per_file, total - start)
        features = rng.standard_normal((len(FEATURES), n), dtype=np.float32)
        cols = {"row_id": np.arange(start, start + n, dtype=np.int64),
                **{c: features[j] for j, c in enumerate(FEATURES)},
                "label": rng.integers(0, 10, n, dtype=np.int64)}
        path = out / f"part-{i:05d}.parquet"
        pq.write_table(pa.table(cols), path, row_group_size=rg_rows, compression="snappy")
        files.append(str(path))
    facts = {"files": files, "rows": total, "row_group_rows": rg_rows,
             "bytes": sum(os.path.getsize(f) for f in files), "write_s": time.perf_counter() - started}
    done.write_text(json.dumps(facts))
    return facts


def subset(facts: dict[str, Any], fraction: float) -> dict[str, Any]:
    """The first ``fraction`` of the files (at least one) and their row count."""
    files = facts["files"][:max(1, round(len(facts["files"]) * fraction))]
    return {"files": files, "rows": sum(pq.ParquetFile(f).metadata.num_rows for f in files),
            "bytes": sum(os.path.getsize(f) for f in files)}


# ------------------------------------------------------------------------------------------- S3
def start_s3(files: list[str], max_mb: float) -> tuple[Any, str, list[str]]:
    """A moto S3 server on 127.0.0.1 holding the first files up to ``max_mb`` MB (at least one), with the environment
    set so s3:// URIs resolve to it (as tests/conftest.py does); returns (server, s3://bucket/data, file URIs)."""
    import logging

    import boto3
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    from raytrainer.io.storage import resolve

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({"RAYTRAINER_S3_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"})
    os.environ.pop("AWS_SESSION_TOKEN", None)
    bucket = f"ingest-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    chosen, size = [], 0
    for f in files:
        if chosen and size + os.path.getsize(f) > max_mb * 1e6:
            break
        chosen.append(f)
        size += os.path.getsize(f)
    fs, _ = resolve(f"s3://{bucket}")
    uris = []
    for f in chosen:
        pafs.copy_files(f, f"{bucket}/data/{os.path.basename(f)}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        uris.append(f"s3://{bucket}/data/{os.path.basename(f)}")
    return server, f"s3://{bucket}/data", uris


# ------------------------------------------------------------------------------------------- running workers
def run_ranks(spec: dict[str, Any], world: int, timeout_s: float = 1800) -> dict[str, Any]:
    """Run one measurement on ``world`` worker processes at once; per-rank rows/s (mean over ranks) and the rest."""
    barrier = tempfile.mkdtemp(prefix="rt-ingest-barrier-")
    procs = [subprocess.Popen([sys.executable, str(WORKER), json.dumps({**spec, "rank": r, "world": world,
                                                                         "barrier": barrier})],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout_s)
            line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
            if p.returncode != 0 or line is None:
                raise RuntimeError(f"{spec['kind']} worker failed ({p.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
            results.append(json.loads(line[len("RESULT "):]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(barrier, ignore_errors=True)
    merged = {k: statistics.mean(r[k] for r in results) for k in results[0] if isinstance(results[0][k], (int, float))}
    merged["rows_per_s"] = statistics.mean(r.get("rows", 0) / r["seconds"] for r in results)
    merged["ranks"] = results
    return merged


def med(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def fmt_rate(rows_per_s: float) -> str:
    return f"{rows_per_s / 1e6:.2f} M rows/s ({rows_per_s * ROW_BYTES / 2**20:.0f} MiB/s)"


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=2.0, help="GiB of row data (80 bytes a row)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per measurement (default 3)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--row-group", type=int, default=131072, help="rows per Parquet row group")
    p.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "raytrainer-ingest-bench"),
                   help="where the generated dataset is kept between runs")
    p.add_argument("--s3-mb", type=float, default=256, help="MB of files served from the local S3 server")
    p.add_argument("--skip-s3", action="store_true")
    p.add_argument("--skip-ray-data", action="store_true")
    p.add_argument("--skip-resume", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: a smoke run")
    args = p.parse_args()
    if args.quick:
        args.gb, args.row_group, args.s3_mb = min(args.gb, 0.02), min(args.row_group, 16384), min(args.s3_mb, 4)
        args.repeats = args.repeats or 1
    repeats = args.repeats or 3
    bs = args.batch_size
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    big = ensure_dataset(Path(args.data), args.gb, args.row_group)
    small = subset(big, 0.25)
    print(f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} "
          f"GiB RAM, {platform.platform()}; python {platform.python_version()}, pyarrow {pa.__version__}; "
          f"load average {os.getloadavg()}", flush=True)
    print(f"data: {big['rows']:,} rows in {len(big['files'])} files, {mib(big['bytes'])} on disk, row groups of "
          f"{big['row_group_rows']:,} rows ({Path(big['files'][0]).parent}); quarter: {small['rows']:,} rows in "
          f"{len(small['files'])} files; batch {bs} rows", flush=True)

    s3 = None
    if not args.skip_s3:
        s3 = start_s3(big["files"], args.s3_mb)
        s3_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in big["files"][:len(s3[2])])
        print(f"S3: {s3[1]} on {os.environ['RAYTRAINER_S3_ENDPOINT']} (moto), {len(s3[2])} files, {s3_rows:,} rows",
              flush=True)

    base = {"files": big["files"], "batch_size": bs}
    cases: dict[str, tuple[dict[str, Any], int]] = {}
    for world in (1, 2):
        cases[f"parquet@{world}"] = ({**base, "kind": "parquet"}, world)
        cases[f"memory@{world}"] = ({**base, "kind": "memory"}, world)
        cases[f"raw@{world}"] = ({**base, "kind": "raw"}, world)
        cases[f"raw_batches@{world}"] = ({**base, "kind": "raw_batches"}, world)
        cases[f"raw_work@{world}"] = ({**base, "kind": "raw_work"}, world)
        if not args.skip_ray_data:
            cases[f"raydata@{world}"] = ({**base, "kind": "raydata", "splits": world}, 1)  # one driver, `world` splits
    cases["parquet-small@1"] = ({**base, "kind": "parquet", "files": small["files"]}, 1)
    cases["memory-small@1"] = ({**base, "kind": "memory", "files": small["files"]}, 1)
    if s3 is not None:
        cases["parquet-s3@1"] = ({**base, "kind": "parquet", "files": None, "path": s3[1]}, 1)
        cases["raw-s3@1"] = ({**base, "kind": "raw", "files": s3[2]}, 1)

    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in cases}
    try:
        for i in range(repeats):
            for name in (list(cases) if i % 2 == 0 else list(cases)[::-1]):
                spec, world = cases[name]
                r = run_ranks(spec, world)
                if spec.get("splits", 1) > 1:
                    r["rows_per_s"] = statistics.mean(r["ranks"][0]["per_rank_rows_per_s"])
                if "load_s" in r:  # the in-memory loader, counting its load once per epoch
                    r["rows_per_s_with_load"] = statistics.mean(x["rows"] / (x["seconds"] + x["load_s"])
                                                                for x in r["ranks"])
                runs[name].append(r)
                extra = f", load {r['load_s']:.2f} s" if "load_s" in r else ""
                print(f"  run {i + 1} {name:<16} {fmt_rate(r['rows_per_s'])} per rank, {r['cpu_s']:.2f} CPU-s per "
                      f"rank, peak RSS growth {mib(r['peak_rss_growth'])}{extra}; load average "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
    finally:
        if s3 is not None:
            s3[0].stop()

    resume: dict[str, dict[str, list[dict[str, Any]]]] = {}
    steps: dict[str, int] = {}
    if not args.skip_resume:
        n_batches = -(-small["rows"] // bs)
        steps = {"10%": max(1, round(0.1 * n_batches)), "90%": max(2, round(0.9 * n_batches))}
        ckpt_root = Path(tempfile.mkdtemp(prefix="rt-ingest-ckpt-"))
        try:
            ckpts = {}
            for kind in RESUME_LOADERS:
                d = ckpt_root / kind
                w = run_ranks({"kind": "resume_write", "loader": kind, "files": small["files"], "batch_size": bs,
                               "save_at": list(steps.values()), "ckpt_dir": str(d)}, 1)["ranks"][0]
                ckpts[kind] = w["ckpts"]
                print(f"  {kind}: trained {steps['90%']} of {n_batches} batches in {w['seconds']:.1f} s, "
                      f"checkpoints at steps {list(steps.values())}", flush=True)
            order = [(k, pct) for k in RESUME_LOADERS for pct in steps]
            resume = {k: {pct: [] for pct in steps} for k in RESUME_LOADERS}
            for i in range(repeats):
                for kind, pct in (order if i % 2 == 0 else order[::-1]):
                    step = steps[pct]
                    r = run_ranks({"kind": "resume_time", "loader": kind, "files": small["files"], "batch_size": bs,
                                   "step": step, "ckpt": ckpts[kind][str(step)]}, 1)["ranks"][0]
                    resume[kind][pct].append(r)
                    # the plain iterable cuts batches per row group, so its batch k starts at row k * bs only when
                    # bs divides the row groups
                    checked = kind != "parquet_shuffle" and (kind != "iterable" or args.row_group % bs == 0)
                    check = "" if not checked or r["first_row"] == step * bs else \
                        f" (POSITION WRONG: first row id {r['first_row']}, expected {step * bs})"
                    print(f"  run {i + 1} resume {kind:<16} at {pct:>3} (step {step}): {r['seconds']:.3f} s to the "
                          f"first batch{check}", flush=True)
        finally:
            shutil.rmtree(ckpt_root, ignore_errors=True)

    report(args, repeats, big, small, runs, resume, steps, s3)


def report(args: argparse.Namespace, repeats: int, big: dict[str, Any], small: dict[str, Any],
           runs: dict[str, list[dict[str, Any]]], resume: dict[str, dict[str, list[dict[str, Any]]]],
           steps: dict[str, int], s3: Any) -> None:
    """The markdown table: what, value, ratio (medians of the repeats)."""
    rows: list[tuple[str, str, str]] = []
    summary: dict[str, Any] = {}
    for world in (1, 2):
        pd_ = med(runs[f"parquet@{world}"], "rows_per_s")
        mem = med(runs[f"memory@{world}"], "rows_per_s")
        mem_load = med(runs[f"memory@{world}"], "rows_per_s_with_load")
        raw, raw_work = med(runs[f"raw@{world}"], "rows_per_s"), med(runs[f"raw_work@{world}"], "rows_per_s")
        raw_batches = med(runs[f"raw_batches@{world}"], "rows_per_s")
        ray_key = f"raydata@{world}"
        ray = med(runs[ray_key], "rows_per_s") if ray_key in runs else None
        others_load = {"in-memory DataLoader (load counted)": mem_load, **({"Ray Data": ray} if ray else {})}
        others = {"in-memory DataLoader (load not counted)": mem, **({"Ray Data": ray} if ray else {})}
        best_load, best = max(others_load, key=others_load.get), max(others, key=others.get)
        rk = f"{world} rank{'s' if world > 1 else ''}, per rank"

        def cpu(kind: str) -> str:
            return f"; {med(runs[f'{kind}@{world}'], 'cpu_s'):.2f} CPU-s"
        rows += [
            (f"**ParquetDataset**, {rk}", fmt_rate(pd_) + cpu("parquet"), ""),
            (f"in-memory DataLoader, {rk}, iteration only (load "
             f"{med(runs[f'memory@{world}'], 'load_s'):.2f} s not counted)", fmt_rate(mem), f"{pd_ / mem:.2f}x"),
            (f"in-memory DataLoader, {rk}, load + one epoch", fmt_rate(mem_load), f"{pd_ / mem_load:.2f}x"),
        ]
        if ray:
            rows.append((f"Ray Data iter_torch_batches, {rk}", fmt_rate(ray), f"{pd_ / ray:.2f}x"))
        rows += [
            (f"pyarrow raw read_row_group (floor: no batches, torch or work), {rk}", fmt_rate(raw) + cpu("raw"),
             f"{pd_ / raw:.2f}x"),
            (f"pyarrow iter_batches(batch_size) (no torch or work), {rk}", fmt_rate(raw_batches) + cpu("raw_batches"),
             f"{pd_ / raw_batches:.2f}x"),
            (f"minimal inline loader: row group -> torch -> batch slices + same work, {rk}",
             fmt_rate(raw_work) + cpu("raw_work"),
             f"{pd_ / raw_work:.2f}x"),
            (f"ParquetDataset / best other ({best_load}; target >= 1)", "", f"**{pd_ / others_load[best_load]:.2f}**"),
            (f"ParquetDataset / best other ({best})", "", f"{pd_ / others[best]:.2f}"),
            (f"ParquetDataset / pyarrow raw (target >= 0.9), {rk}", "", f"**{pd_ / raw:.2f}**"),
        ]
        summary[f"world{world}"] = {"parquet": pd_, "memory": mem, "memory_with_load": mem_load, "raydata": ray,
                                    "raw": raw, "raw_batches": raw_batches, "raw_work": raw_work}
    growth = {k: med(runs[k], "peak_rss_growth") for k in ("parquet@1", "parquet-small@1", "memory@1",
                                                           "memory-small@1")}
    rows += [
        (f"peak RSS growth, ParquetDataset, {mib(big['bytes'])} data", mib(growth["parquet@1"]),
         f"{growth['parquet@1'] / max(growth['parquet-small@1'], 1):.2f}x the quarter size (target ~1)"),
        (f"peak RSS growth, ParquetDataset, {mib(small['bytes'])} data", mib(growth["parquet-small@1"]), ""),
        (f"peak RSS growth, in-memory DataLoader, {mib(big['bytes'])} data", mib(growth["memory@1"]),
         f"{growth['memory@1'] / max(growth['memory-small@1'], 1):.2f}x the quarter size"),
        (f"peak RSS growth, in-memory DataLoader, {mib(small['bytes'])} data", mib(growth["memory-small@1"]), ""),
    ]
    summary["peak_rss_growth"] = growth
    if resume:
        summary["resume"] = {}
        for kind in RESUME_LOADERS:
            t = {pct: med(resume[kind][pct], "seconds") for pct in steps}
            target = " (target <= 1.2)" if kind == "parquet" else ""
            rows += [(f"resume to first batch, {RESUME_LABELS[kind]}, at {pct} (step {steps[pct]})", f"{t[pct]:.3f} s",
                      "" if pct == "10%" else f"**{t['90%'] / t['10%']:.2f}x** the 10% time{target}") for pct in steps]
            summary["resume"][kind] = t
        build = med(resume["map"]["10%"], "build_s")
        rows.append(("  (in-memory load before that fit, not counted above)", f"{build:.2f} s", ""))
    if s3 is not None:
        pd_s3, raw_s3 = med(runs["parquet-s3@1"], "rows_per_s"), med(runs["raw-s3@1"], "rows_per_s")
        rows += [(f"S3 (local moto, {len(s3[2])} files): ParquetDataset, 1 rank", fmt_rate(pd_s3),
                  f"**{pd_s3 / raw_s3:.2f}x** raw"),
                 ("S3 (local moto): pyarrow raw read_row_group, 1 rank", fmt_rate(raw_s3), "")]
        summary["s3"] = {"parquet": pd_s3, "raw": raw_s3}

    print(f"\nmedians of {repeats} interleaved runs; {os.cpu_count()} cores; load average {os.getloadavg()}; "
          f"{big['rows']:,} rows ({mib(big['bytes'])}), batch {args.batch_size}; resume on the quarter "
          f"({small['rows']:,} rows)\n")
    print("CPU-s: this process's CPU time per rank over the epoch, all its threads (less sensitive than rows/s to "
          "what else runs on the machine)\n")
    print("| what | value | ratio (ParquetDataset / this, unless said) |")
    print("|---|---|---|")
    for what, value, ratio in rows:
        print(f"| {what} | {value} | {ratio} |")
    print("\nRESULT " + json.dumps(summary))


if __name__ == "__main__":
    main()
