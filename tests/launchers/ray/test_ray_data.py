"""Ray Data input: a ray.data.Dataset as fit/validate/predict data, one streaming split per rank, on a local Ray.

Every module records the row ids it trained on (per rank, epoch and step), so the tests count exactly which rows
each epoch saw: once each without a failure, and at-least-once (with a measured number of repeats) across a
killed rank.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import time

import pytest
import torch
from ft_models import SignalAt, events
from torch import nn

import raytrainer as pl
from raytrainer.data.ray_data import RayDataLoader, split_ray_data

pytestmark = [pytest.mark.timeout(300)]

BATCH = 16


def _dataset(n: int, blocks: int = 4):
    """``ray.data.range(n)`` with a row id column and features made by a map_batches step (run as Ray tasks)."""
    import numpy as np
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False

    def featurize(batch):  # a closure: pickled by value for Ray's workers
        i = batch["id"].astype(np.float32)
        x = np.stack([i / 100.0, np.sin(i), np.cos(i), np.ones_like(i)], axis=1).astype(np.float32)
        return {"id": batch["id"], "x": x, "y": x.sum(axis=1, keepdims=True)}

    return ray.data.range(n, override_num_blocks=blocks).map_batches(featurize, batch_format="numpy")


class IdModel(pl.LightningModule):
    """Linear regression that appends the row ids of every batch it sees to ``<ids_path>.rank<r>``."""

    def __init__(self, ids_path: str, sleep_s: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.ids_path, self.sleep_s = ids_path, sleep_s

    def _record(self, kind: str, batch: dict, batch_idx: int) -> None:
        with open(f"{self.ids_path}.rank{self.global_rank}", "a") as f:
            f.write(json.dumps({"kind": kind, "epoch": self.current_epoch, "step": self.global_step,
                                "batch_idx": batch_idx, "sanity": self.trainer.sanity_checking,
                                "ids": batch["id"].tolist(), "rank": self.global_rank, "time": time.time()}) + "\n")

    def training_step(self, batch, batch_idx):
        self._record("train", batch, batch_idx)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        loss = nn.functional.mse_loss(self.net(batch["x"]), batch["y"])
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self._record("val", batch, batch_idx)
        self.log("val_loss", nn.functional.mse_loss(self.net(batch["x"]), batch["y"]))

    def predict_step(self, batch, batch_idx):
        return batch["id"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class HookModel(IdModel):
    """Returns a Ray Dataset from train_dataloader(): built on each rank, so the driver cannot split it."""

    def __init__(self, ids_path: str, wrap: bool) -> None:
        super().__init__(ids_path)
        self.wrap = wrap

    def train_dataloader(self):
        ds = _dataset(64)
        return RayDataLoader(ds, batch_size=BATCH) if self.wrap else ds


def _records(ids_path: str) -> list[dict]:
    return [json.loads(line) for path in sorted(glob.glob(f"{ids_path}.rank*")) for line in open(path)]


def _trainer(root, **kw) -> pl.Trainer:
    base = dict(accelerator="cpu", devices=2, max_epochs=2, default_root_dir=str(root), enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, logger=False)
    base.update(kw)
    return pl.Trainer(**base)


def test_split_hands_each_rank_an_equal_share_and_drops_the_remainder(local_ray):
    """Driver side without a Trainer: split(world) in nested call arguments; rows % world rows are dropped."""
    import ray

    loader = RayDataLoader(ray.data.range(101, override_num_blocks=4), batch_size=BATCH)
    kwargs, made = split_ray_data({"train": loader, "val": [loader, "other"], "ckpt_path": None}, 2)
    try:
        assert len(made) == 2 and kwargs["train"] is made[0] and kwargs["val"][0] is made[1]
        assert kwargs["val"][1] == "other" and loader.dataset is not None, "the original is untouched"

        @ray.remote(num_cpus=0.1)
        def read(split, rank):
            split.bind(rank, 2)
            return [i for batch in split for i in batch["id"].tolist()]

        got = ray.get([read.remote(kwargs["train"], r) for r in range(2)], timeout=120)
        assert len(got[0]) == len(got[1]) == 50, "equal=True: the same number of rows on every rank"
        seen = got[0] + got[1]
        assert len(set(seen)) == 100 and set(seen) <= set(range(101)), "one row (101 % 2) dropped, none repeated"
        with pytest.raises(RuntimeError, match="split for 2 rank"):
            kwargs["train"].bind(0, 3)
        with pytest.raises(RuntimeError, match="did not split"):
            RayDataLoader(ray.data.range(4)).bind(1, 2)
    finally:
        for m in made:
            m.close()


def test_two_ranks_read_every_row_once_per_epoch(local_ray, tmp_path):
    n, n_val = 256, 64
    ids_path = str(tmp_path / "ids")
    trainer = _trainer(tmp_path)
    started = time.perf_counter()
    # 4 validation batches a rank: the sanity check reads 2 of them, then stops in the middle of that split's pass
    trainer.fit(IdModel(ids_path), train_dataloaders=RayDataLoader(_dataset(n), batch_size=BATCH),
                val_dataloaders=RayDataLoader(_dataset(n_val), batch_size=8))
    took = time.perf_counter() - started
    rows = _records(ids_path)
    steps_per_epoch = n // (2 * BATCH)
    assert trainer.global_step == 2 * steps_per_epoch
    for epoch in range(2):
        per_rank = [[i for r in rows if r["kind"] == "train" and r["epoch"] == epoch and r["rank"] == k
                     for i in r["ids"]] for k in range(2)]
        assert len(per_rank[0]) == len(per_rank[1]) == n // 2
        assert sorted(per_rank[0] + per_rank[1]) == list(range(n)), f"epoch {epoch}: not every row exactly once"
        val = [i for r in rows if r["kind"] == "val" and r["epoch"] == epoch and not r["sanity"] for i in r["ids"]]
        assert sorted(val) == list(range(n_val)), f"validation of epoch {epoch}: not every row exactly once"
    assert sum(r["sanity"] for r in rows) == 2 * 2, "the sanity check read 2 batches on each rank"
    print(f"2 ranks x 2 epochs of {n} rows on Ray Data: {took:.1f} s")


@pytest.mark.slow
def test_killed_rank_mid_epoch_repeats_exactly_the_rows_before_the_resume_point(local_ray, tmp_path):
    """At-least-once for the interrupted epoch: rank 1 dies at step 11 (epoch 1, batch 3 of 8); the run resumes
    from the newest snapshot at batch b of epoch 1 and reads a fresh pass. Measured: no row is missing, and the
    repeated rows are exactly the b batches per rank trained before the resume point."""
    n, world = 256, 2
    steps_per_epoch = n // (world * BATCH)
    ids_path = str(tmp_path / "ids")
    trainer = _trainer(tmp_path, max_failures=1, snapshot_every_n_steps=1,
                       callbacks=[SignalAt(11, str(tmp_path / "marker"), rank=1)])
    trainer.fit(IdModel(ids_path, sleep_s=0.02), RayDataLoader(_dataset(n), batch_size=BATCH))
    restart = next(e for e in events(str(tmp_path)) if e["event"] == "restart")
    b = restart["step"] - steps_per_epoch  # batches per rank of epoch 1 trained before the resume point
    assert 0 <= b <= 3, restart
    assert trainer.global_step == 2 * steps_per_epoch + b, "the resumed epoch is a whole pass after b batches"

    # The run's own history: the last record of each (rank, step); a rerun step overwrites the failed attempt's.
    final: dict[tuple[int, int], dict] = {}
    for r in _records(ids_path):
        if r["kind"] == "train":
            final[(r["rank"], r["step"])] = r
    counts = [collections.Counter(i for r in final.values() if r["epoch"] == e for i in r["ids"]) for e in (0, 1)]
    assert sorted(counts[0].elements()) == list(range(n)), "epoch 0 (before the failure): every row once"
    missing = [i for i in range(n) if counts[1][i] == 0]
    repeated = sum(c - 1 for c in counts[1].values())
    print(f"killed rank 1 at step 11; resumed at epoch 1 batch {b}: missing {len(missing)}, repeated {repeated} "
          f"rows (b * world * batch = {b * world * BATCH})")
    assert missing == [], "a row of the interrupted epoch was never trained"
    assert repeated == b * world * BATCH
    assert set(counts[1]) == set(range(n)) and max(counts[1].values()) <= 2


def test_single_device_in_process_fit_validate_predict(local_ray, tmp_path):
    n = 96
    ids_path = str(tmp_path / "ids")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, default_root_dir=str(tmp_path),
                         enable_progress_bar=False, enable_model_summary=False, logger=False,
                         enable_checkpointing=False, num_sanity_val_steps=0)
    model = IdModel(ids_path)
    trainer.fit(model, RayDataLoader(_dataset(n), batch_size=BATCH), val_dataloaders=_dataset(32))
    assert trainer.global_step == 2 * n // BATCH
    rows = _records(ids_path)
    for epoch in range(2):
        seen = [i for r in rows if r["kind"] == "train" and r["epoch"] == epoch for i in r["ids"]]
        assert sorted(seen) == list(range(n))
    out = trainer.validate(model, dataloaders=_dataset(32), verbose=False)
    assert "val_loss" in out[0]
    preds = trainer.predict(model, dataloaders=RayDataLoader(_dataset(40), batch_size=8))
    assert sorted(torch.cat(preds).tolist()) == list(range(40))


def test_single_device_hook_may_return_a_ray_dataset(local_ray, tmp_path):
    """In one process nothing needs splitting: a Ray Dataset from train_dataloader() is read as it is."""
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, default_root_dir=str(tmp_path),
                         enable_progress_bar=False, enable_model_summary=False, logger=False,
                         enable_checkpointing=False)
    trainer.fit(HookModel(str(tmp_path / "ids"), wrap=False))
    seen = [i for r in _records(str(tmp_path / "ids")) if r["kind"] == "train" for i in r["ids"]]
    assert sorted(seen) == list(range(64)) and trainer.global_step == 1, "one batch of the default 256 rows"


@pytest.mark.slow
def test_two_ranks_validate_and_predict(local_ray, tmp_path):
    ids_path = str(tmp_path / "ids")
    trainer = _trainer(tmp_path)
    model = IdModel(ids_path)
    out = trainer.validate(model, dataloaders=_dataset(64), verbose=False)  # a plain Dataset: wrapped, split
    assert "val_loss" in out[0]
    seen = [i for r in _records(ids_path) if r["kind"] == "val" for i in r["ids"]]
    assert sorted(seen) == list(range(64)), "each validation row once over the two ranks"
    preds = trainer.predict(model, dataloaders=RayDataLoader(_dataset(64), batch_size=BATCH))
    assert sorted(torch.cat(preds).tolist()) == list(range(64))


@pytest.mark.parametrize("wrap", [False, True], ids=["dataset", "loader"])
def test_ray_dataset_from_a_hook_on_two_ranks_is_a_clear_error(local_ray, tmp_path, wrap):
    trainer = _trainer(tmp_path, max_epochs=1)
    with pytest.raises(Exception, match=r"did not split.*trainer\.fit\(model, train_dataloaders=ds"):
        trainer.fit(HookModel(str(tmp_path / "ids"), wrap=wrap))
    assert not os.path.exists(f"{tmp_path / 'ids'}.rank0"), "no rank trained on the whole dataset"


@pytest.mark.slow
def test_data_tasks_starved_of_cpus_end_at_the_heartbeat_timeout(local_ray, tmp_path):
    """Another actor holds every CPU the ranks leave: Ray Data's tasks never run, so no batch comes. The rank's
    wait ends: the driver's heartbeat check stops the run with an error that names the likely cause."""
    import ray

    from raytrainer.launchers.ray.policies import FailuresExhausted

    @ray.remote
    class Hog:
        def ready(self) -> bool:
            return True

    free = int(ray.cluster_resources()["CPU"]) - 2  # all but the two ranks'
    hog = Hog.options(num_cpus=free).remote()
    try:
        assert ray.get(hog.ready.remote(), timeout=60)
        trainer = _trainer(tmp_path, max_epochs=1, heartbeat_timeout_s=15)
        started = time.monotonic()
        with pytest.raises(FailuresExhausted, match="waiting for a batch of the Ray Dataset"):
            trainer.fit(IdModel(str(tmp_path / "ids")), RayDataLoader(_dataset(64), batch_size=BATCH))
        assert time.monotonic() - started < 120
    finally:
        ray.kill(hog)


@pytest.mark.slow
def test_no_cpu_left_for_ray_data_is_a_clear_error(tmp_path):
    """On a Ray instance the ranks fill (ray.data started one the size of a 2-core machine), the fit stops with an
    error that says how to make room, instead of waiting forever for a first batch. Own process: its own Ray."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import ray, raytrainer as pl
        from test_ray_data import IdModel, _dataset
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        trainer = pl.Trainer(accelerator="cpu", devices=2, max_epochs=1, default_root_dir={str(tmp_path)!r},
                             enable_progress_bar=False, enable_model_summary=False, logger=False)
        try:
            trainer.fit(IdModel({str(tmp_path / "ids")!r}), _dataset(64))
        except RuntimeError as err:
            print("ERROR:", err)
    """)
    here = os.path.dirname(__file__)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.path.join(here, "..", ".."),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
    assert "ERROR: the Ray cluster has 2 logical CPU(s) and the 2 rank(s) reserve 2" in out.stdout, \
        out.stdout[-2000:] + out.stderr[-3000:]
    assert "ray.init(num_cpus=4)" in out.stdout
