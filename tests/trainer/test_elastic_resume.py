"""An elastic run resumed from a snapshot taken at the last batch of an epoch trains the next epochs whole."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl
from raytrainer.checkpoint.bridge import capture
from raytrainer.checkpoint.host_copy import to_host


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SnapshotAtEpochEnd(pl.Callback):
    """Keeps the in-memory state after the last batch of epoch 0, before the epoch-end hooks."""

    def __init__(self, last_batch: int) -> None:
        self.last_batch, self.state = last_batch, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == self.last_batch:
            self.state = to_host(capture(trainer.session))


def _trainer(**kw) -> pl.Trainer:
    t = pl.Trainer(enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, logger=False,
                   **kw)
    t.session.elastic = True  # as on a Ray rank of an elastic run: the data goes through ElasticBatchSampler
    return t


def test_resume_at_last_batch_of_an_epoch_then_full_epochs(tmp_path):
    x = torch.randn(40, 4)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=10, shuffle=True)
    snap = SnapshotAtEpochEnd(last_batch=3)
    first = _trainer(max_epochs=1, default_root_dir=str(tmp_path), callbacks=[snap])
    first.fit(Tiny(), data)
    assert snap.state is not None and snap.state["global_step"] == 4

    second = _trainer(max_epochs=3, default_root_dir=str(tmp_path))
    second.fit(Tiny(), data, ckpt_path=snap.state)
    assert second.current_epoch == 3
    assert second.global_step == 12, "epochs after the resumed one must be whole (4 batches each)"
