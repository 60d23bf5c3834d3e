"""Callbacks batch 1 on Ray (2 ranks): Timer's elapsed time across a SIGKILL and snapshot restore,
OnExceptionCheckpoint written by rank 0, and BasePredictionWriter shards that cover the dataset once."""
from __future__ import annotations

import json
import os

import pytest
import torch
from batch1_models import Indexed, KillAt, Reg, ShardWriter, TimerLog, loader
from torch.utils.data import DataLoader

import raytrainer as rt
from raytrainer.callbacks import OnExceptionCheckpoint, Timer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _kw(root, **kw):
    base = dict(num_processes=2, enable_progress_bar=False, enable_model_summary=False, logger=False,
                enable_checkpointing=False, deterministic=True, default_root_dir=str(root))
    base.update(kw)
    return base


def test_timer_counts_time_before_a_killed_rank(local_ray, tmp_path):
    log = tmp_path / "timer.jsonl"
    timer = Timer(duration="00:01:00:00", verbose=False)  # a budget that is never reached: the check still runs
    trainer = rt.Trainer(max_epochs=2, max_failures=1, snapshot_every_n_steps=1,
                         callbacks=[timer, TimerLog(str(log)), KillAt(5, str(tmp_path / "marker"))], **_kw(tmp_path))
    trainer.fit(Reg(), loader(n=64, batch_size=8))  # 4 steps per rank and epoch
    assert os.path.exists(tmp_path / "marker"), "the rank was never killed"
    assert "recovering" in [p.value for p in trainer.last_run.history]
    assert trainer.global_step == 8
    rows = [json.loads(line) for line in open(log)]
    starts = [i for i, r in enumerate(rows) if r.get("start")]
    assert len(starts) == 2, rows
    first, second = rows[:starts[1]], rows[starts[1]:]
    resumed = second[0]
    assert first[0]["offset"] == 0 and 1 <= resumed["step"] <= 5
    before = {r["step"]: r["elapsed"] for r in first if "elapsed" in r}
    # the snapshot of step S was taken after step S's batch end: its elapsed time lies between those of S and S+1
    assert 0 < before[resumed["step"]] <= resumed["offset"] < before.get(resumed["step"] + 1, float("inf"))
    after = [r["elapsed"] for r in second if "elapsed" in r]
    assert after[0] > resumed["offset"] and after == sorted(after)


def test_on_exception_checkpoint_on_rank_zero(local_ray, tmp_path):
    cb = OnExceptionCheckpoint(tmp_path / "exc")
    trainer = rt.Trainer(max_epochs=2, max_failures=0, callbacks=[cb], **_kw(tmp_path))
    with pytest.raises(Exception, match="injected failure"):
        trainer.fit(Reg(fail_at=3, fail_rank=0), loader(n=64, batch_size=8))
    ckpt = torch.load(cb.ckpt_path, weights_only=True)
    assert ckpt["global_step"] == 3
    # it resumes (in process here: the checkpoint is an ordinary one)
    resumed = rt.Trainer(max_epochs=2, callbacks=[], enable_progress_bar=False, enable_model_summary=False,
                         logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    resumed.fit(Reg(), loader(n=64, batch_size=8), ckpt_path=cb.ckpt_path)
    # 3 steps of 2 ranks were 6 batches: one rank goes on at batch 6 of epoch 0, then trains a whole epoch
    assert resumed.global_step == 3 + (8 - 6) + 8


def test_prediction_writer_shards_cover_the_dataset_once(local_ray, tmp_path):
    writer = ShardWriter(str(tmp_path), "batch_and_epoch")
    trainer = rt.Trainer(callbacks=[writer], **_kw(tmp_path))
    trainer.predict(Reg(), DataLoader(Indexed(11), batch_size=3), return_predictions=False)
    written = []
    for rank in (0, 1):
        batches = [json.loads(line) for line in open(tmp_path / f"rank{rank}.batch.json")]
        (epoch,) = [json.loads(line) for line in open(tmp_path / f"rank{rank}.epoch.json")]
        assert all(b["indices"] == [int(v) for v in b["inputs"]] for b in batches), "indices name the samples"
        assert epoch["indices"] == [[b["indices"] for b in batches]] and epoch["n_predictions"] == len(batches)
        written += [i for b in batches for i in b["indices"]]
    assert sorted(written) == list(range(11))
