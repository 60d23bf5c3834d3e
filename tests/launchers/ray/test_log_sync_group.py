"""On two Ray ranks: self.log(sync_dist_group=...) reduces over that process group, rank_zero_only values are
logged from rank 0 alone without a collective (no hang, also in validation), a mean across ranks is weighted by
batch size, EarlyStopping's stopping_reason reaches the driver, and ModelCheckpoint(save_on_exception=True) writes
from rank 0's exception path."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl
from raytrainer.callbacks.early_stopping import EarlyStoppingReason
from raytrainer.launchers.ray.group import RankError


def loader(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


class GroupLogger(pl.LightningModule):
    """Each rank logs its rank + 1, reduced over every rank, over a group of both ranks and over a group of
    rank 0 alone; rank 0 also logs a rank_zero_only value the other rank never logs."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.both = self.solo = None

    def setup(self, stage: str) -> None:
        # every rank creates the groups, in the same order (torch.distributed's rule)
        self.both = dist.new_group([0, 1])
        self.solo = dist.new_group([0])

    def _log_all(self, prefix: str) -> None:
        r = float(self.global_rank + 1)
        kw = dict(on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True)
        self.log(f"{prefix}world", r, **kw)
        self.log(f"{prefix}both", r, sync_dist_group=self.both, **kw)
        self.log(f"{prefix}solo", r, sync_dist_group=self.solo, **kw)
        # rank 0: value 1 on batches of 1, rank 1: value 2 on batches of 3 -> (1 + 6) / 4
        self.log(f"{prefix}wmean", r, on_step=False, on_epoch=True, sync_dist=True, batch_size=2 * r - 1)
        if self.global_rank == 0:
            self.log(f"{prefix}r0", 7.0, rank_zero_only=True, sync_dist=True, on_step=False, on_epoch=True)

    def training_step(self, batch, batch_idx):
        self._log_all("")
        return (self.layer(batch[0]) - batch[1]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self._log_all("val_")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class FailsOnRankZero(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        if self.global_rank == 0 and self.global_step == 3:
            raise ValueError("deliberate failure on rank 0 at step 3")
        return (self.layer(batch[0]) - batch[1]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.slow
def test_sync_dist_group_and_rank_zero_only_on_two_ranks(local_ray, tmp_path):
    es = pl.EarlyStopping(monitor="val_world", mode="max", stopping_threshold=2.5)
    trainer = pl.Trainer(num_processes=2, max_epochs=3, enable_progress_bar=False, enable_model_summary=False,
                         logger=False, enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[es],
                         default_root_dir=str(tmp_path))
    trainer.fit(GroupLogger(), loader(), loader(8))
    got = {k: round(float(v), 5) for k, v in trainer.callback_metrics.items()}
    per_epoch = 2  # batches each rank sees per epoch, summed by reduce_fx="sum"
    for prefix, n in (("", per_epoch), ("val_", 1)):
        assert got[f"{prefix}world"] == 3.0 * n        # (1 + 2) per batch, over every rank
        assert got[f"{prefix}both"] == 3.0 * n         # a group of both ranks: the same
        assert got[f"{prefix}solo"] == 1.0 * n         # a group of rank 0 alone: rank 0's own sum
        assert got[f"{prefix}wmean"] == 1.75           # weighted by batch size, as Lightning
        assert got[f"{prefix}r0"] == 7.0               # rank 0's value, with no collective
    # EarlyStopping ran on the ranks; its reason reached the driver's copy
    assert trainer.current_epoch == 1
    assert es.stopping_reason is EarlyStoppingReason.STOPPING_THRESHOLD
    assert es.stopping_reason_message.startswith("Stopping threshold reached: val_world = ")


@pytest.mark.slow
def test_save_on_exception_writes_from_rank_zero(local_ray, tmp_path):
    dirpath = tmp_path / "ckpt"
    cb = pl.ModelCheckpoint(dirpath=str(dirpath), save_on_exception=True)
    trainer = pl.Trainer(num_processes=2, max_epochs=3, enable_progress_bar=False, enable_model_summary=False,
                         logger=False, callbacks=[cb], default_root_dir=str(tmp_path))
    with pytest.raises(RankError, match="deliberate failure on rank 0") as info:
        trainer.fit(FailsOnRankZero(), loader(32))
    assert info.value.rank == 0 and isinstance(info.value.exception, ValueError)
    # 32 samples on 2 ranks in batches of 4: 4 steps an epoch; step 3 is mid-epoch 0, nothing saved before it
    files = sorted(f for f in os.listdir(dirpath) if not f.endswith(".manifest.json"))
    assert files == ["epoch=0-step=3.ckpt"]
    ckpt = torch.load(dirpath / files[0], map_location="cpu", weights_only=False)
    assert (ckpt["global_step"], ckpt["epoch"]) == (3, 0)
