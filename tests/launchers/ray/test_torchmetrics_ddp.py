"""torchmetrics under DDP on Ray ranks: the logged epoch value is the metric over the whole dataset
(the metric's own compute() gathers every rank's state), not rank 0's share."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl

torchmetrics = pytest.importorskip("torchmetrics")


def dataset(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, :3].argmax(1) + (x[:, 3] > 0.5).long()) % 3)


class Frozen(pl.LightningModule):
    """Evaluates a fixed classifier, so the expected accuracy over the dataset is known up front."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(6, 3)
        self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.acc(self.net(x), y)
        self.log("val_acc", self.acc)


@pytest.mark.slow
def test_validate_on_two_ranks_logs_the_accuracy_over_the_whole_dataset(local_ray, tmp_path):
    data = dataset()
    model = Frozen()
    with torch.no_grad():
        x, y = data.tensors
        expected = float(torchmetrics.functional.classification.multiclass_accuracy(model.net(x), y, num_classes=3))
        # rank 0's share (DistributedSampler: every other sample) gives another value, so the test can tell
        # a global value from a local one
        half = float(torchmetrics.functional.classification.multiclass_accuracy(model.net(x[0::2]), y[0::2],
                                                                                num_classes=3))
    assert abs(half - expected) > 0.05
    trainer = pl.Trainer(num_processes=2, enable_progress_bar=False, enable_model_summary=False, logger=False,
                         default_root_dir=str(tmp_path))
    out = trainer.validate(model, DataLoader(data, batch_size=8))
    assert out[0]["val_acc"] == pytest.approx(expected, abs=1e-6)
    assert float(trainer.callback_metrics["val_acc"]) == pytest.approx(expected, abs=1e-6)
