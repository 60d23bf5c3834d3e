"""A rank whose shard of the training data makes no batch: an error that says how to fix it, unless the module
allows uneven ranks (Lightning's allow_zero_length_dataloader_with_multiple_devices)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl


class Tiny(pl.LightningModule):
    def __init__(self, allow: bool = False):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.allow_zero_length_dataloader_with_multiple_devices = allow

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_a_rank_without_batches_stops_fit_unless_uneven_ranks_are_allowed(local_ray, tmp_path):
    # 2 samples on 2 ranks, batch 2 with drop_last: each rank's one sample makes no batch
    data = DataLoader(TensorDataset(torch.zeros(2, 2)), batch_size=2, drop_last=True)
    kw = dict(num_processes=2, max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=str(tmp_path))
    with pytest.raises(Exception, match="training data has no batches.*allow_zero_length_dataloader"):
        pl.Trainer(**kw).fit(Tiny(), data)
    trainer = pl.Trainer(**kw)
    trainer.fit(Tiny(allow=True), data)
    assert trainer.global_step == 0
