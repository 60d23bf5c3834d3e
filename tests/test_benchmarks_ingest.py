"""benchmarks/ingest.py's loaders, on a tiny dataset it writes: each one yields every row of its share exactly once."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import _ingest_worker
        import ingest

        yield ingest, _ingest_worker
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def tiny(bench, tmp_path_factory):
    ingest, _ = bench
    facts = ingest.ensure_dataset(tmp_path_factory.mktemp("ingest"), 0.001, 2048)  # 13312 rows, 7 row groups
    assert ingest.ensure_dataset(Path(facts["files"][0]).parents[1], 0.001, 2048) == facts  # reused, not rewritten
    return facts


@pytest.mark.parametrize("kind", ["parquet", "memory", "raw", "raw_batches", "raw_work"])
@pytest.mark.parametrize("world", [1, 2])
def test_every_loader_reads_each_row_once_over_the_ranks(bench, tiny, kind, world):
    _, worker = bench
    got = [worker.KINDS[kind]({"kind": kind, "files": tiny["files"], "batch_size": 1000, "rank": r, "world": world})
           for r in range(world)]
    assert sum(g["rows"] for g in got) == tiny["rows"]
    assert all(g["seconds"] > 0 for g in got)


def test_resume_baselines_start_at_the_saved_batch(bench, tiny, tmp_path):
    _, worker = bench
    for loader in ("parquet", "map", "iterable"):
        spec = {"loader": loader, "files": tiny["files"], "batch_size": 1024}  # divides the row groups: the
        # plain iterable cuts batches per row group
        out = worker.run_resume_write({**spec, "save_at": [2, 11], "ckpt_dir": str(tmp_path / loader)})
        for step in (2, 11):
            r = worker.run_resume_time({**spec, "step": step, "ckpt": out["ckpts"][step]})
            assert r["first_row"] == step * 1024, (loader, step, r)
