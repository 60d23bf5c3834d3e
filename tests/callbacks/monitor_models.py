"""Tiny modules for the DeviceStatsMonitor / ThroughputMonitor / RichProgressBar tests, importable by Ray ranks.
Each *Mixin builds both the raytrainer module and its Lightning twin."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt


class TinyMixin:
    """4 -> 8 -> 1 regression with SGD; logs ``loss`` to the progress bar and ``val_loss`` in validation."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Tiny(TinyMixin, rt.LightningModule):
    """The raytrainer module."""


def loader(n: int = 32, batch_size: int = 4, seed: int = 0) -> DataLoader:
    """``n`` rows of 4 features and a target: ``n // batch_size`` batches."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch_size)


def batch_size(batch) -> int:
    """Samples in a (x, y) batch: ThroughputMonitor's batch_size_fn (a module-level function: Ray ranks load it)."""
    return int(batch[0].size(0))
