"""Tiny modules for the weight-averaging tests, importable by Ray ranks; TinyMixin also builds the Lightning twin."""
from __future__ import annotations

import torch
from signal_at import SignalAt as KillAt  # noqa: F401 - rank 1 by default
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt


class TinyMixin:
    """A 2-layer regression net (optionally with BatchNorm) and SGD, with or without a StepLR scheduler."""

    def __init__(self, bn: bool = False, scheduler: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(4)] if bn else []
        self.net = nn.Sequential(*layers, nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.use_scheduler = scheduler

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        if not self.use_scheduler:
            return opt
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)]


class Tiny(TinyMixin, rt.LightningModule):
    """The raytrainer module."""


def loader(n: int = 64, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g) * 2 + 1
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=batch_size, shuffle=False)
