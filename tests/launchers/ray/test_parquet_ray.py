"""ParquetDataset on Ray ranks: a killed rank recovers bitwise, and a checkpoint of one world resumes exactly in
another."""
from __future__ import annotations

import pytest
import torch
from ft_models import Regression, SignalAt, events, kept_ids, params

import raytrainer as pl
from raytrainer.data import ParquetDataset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _data(path):
    return ParquetDataset(str(path), batch_size=32, shuffle=True, shuffle_buffer_size=200, columns=["id", "x", "y"])


def _trainer(root, **kw):
    return pl.Trainer(**{**dict(num_processes=2, max_epochs=2, deterministic=True, default_root_dir=str(root),
                                enable_progress_bar=False, enable_model_summary=False), **kw})


def test_killed_rank_recovers_bitwise_and_every_row_once(local_ray, tmp_path, parquet_writer):
    n = parquet_writer(tmp_path / "data", n=1500, files=3, row_group=100)
    pl.seed_everything(0)
    ref = Regression()
    _trainer(tmp_path / "ref").fit(ref, _data(tmp_path / "data"))

    pl.seed_everything(0)
    model = Regression(ids_path=str(tmp_path / "ft" / "ids"))
    trainer = _trainer(tmp_path / "ft", max_failures=2, snapshot_every_n_steps=1,
                       callbacks=[SignalAt(30, str(tmp_path / "marker"), rank=1)])
    trainer.fit(model, _data(tmp_path / "data"))
    assert trainer.global_step == 2 * 24
    assert torch.equal(params(model), params(ref)), "recovery changed the result"
    ev = events(str(tmp_path / "ft"))
    assert any(e["event"] == "failure" for e in ev)
    kept = kept_ids(str(tmp_path / "ft"), ev)
    for epoch in range(2):
        assert sorted(i for r in kept if r["epoch"] == epoch for i in r["ids"]) == list(range(n))


def test_checkpoint_of_two_ranks_resumes_exactly_on_one(local_ray, tmp_path, parquet_writer):
    """Stopped 2/3 into an epoch on 2 ranks, resumed in-process: the rest of the epoch is the rows not trained."""
    n = parquet_writer(tmp_path / "data", n=1500, files=3, row_group=100)
    pl.seed_everything(0)
    first = Regression(ids_path=str(tmp_path / "ids"))
    t1 = _trainer(tmp_path / "run", max_epochs=1, max_steps=16)
    t1.fit(first, _data(tmp_path / "data"))
    second = Regression(ids_path=str(tmp_path / "ids"))
    t2 = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, default_root_dir=str(tmp_path / "run"),
                    enable_progress_bar=False, enable_model_summary=False)
    t2.fit(second, _data(tmp_path / "data"), ckpt_path="last")
    rows = kept_ids(str(tmp_path), [])
    assert sorted(i for r in rows for i in r["ids"]) == list(range(n))
    assert {r["world"] for r in rows} == {1, 2}
