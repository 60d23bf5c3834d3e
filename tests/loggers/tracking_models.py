"""A small module, data and checks shared by the MLflow and W&B logger tests (importable by Ray ranks)."""
from __future__ import annotations

import json
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl


class Tracked(pl.LightningModule):
    """Linear regression that logs a step loss, an epoch mean and a validation loss; saves its hyper-parameters."""

    def __init__(self, lr: float = 0.05, hidden: int = 8, opt: dict | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def lightning_twin(L):
    """The same module as Tracked, written for pytorch_lightning."""
    class LTracked(L.LightningModule):
        def __init__(self, lr: float = 0.05, hidden: int = 8, opt: dict | None = None) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))

        training_step = Tracked.training_step
        validation_step = Tracked.validation_step
        configure_optimizers = Tracked.configure_optimizers

    return LTracked


def loader(n: int = 64, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch_size)


def events(root: str) -> list[dict]:
    """Every line of the events logs under ``root``."""
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f == "events.jsonl")
    return [json.loads(line) for p in paths for line in open(p) if line.strip()]
