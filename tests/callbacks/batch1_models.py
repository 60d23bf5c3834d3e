"""Tiny modules and callbacks for the callbacks-batch-1 tests (Timer, finetuning, writers...), importable by Ray
ranks. Each *Mixin builds both the raytrainer module and its Lightning twin."""
from __future__ import annotations

import json
import os

import torch
from signal_at import SignalAt as KillAt  # noqa: F401 - rank 1 by default
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import raytrainer as rt
from raytrainer.callbacks import BasePredictionWriter, Timer


class RegMixin:
    """4 -> 8 -> 1 regression with SGD; ``fail_at``: training_step raises at that global step on ``fail_rank``."""

    def __init__(self, fail_at: int | None = None, fail_rank: int = 0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.fail_at, self.fail_rank = fail_at, fail_rank

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step == self.fail_at and self.global_rank == self.fail_rank:
            raise ValueError(f"injected failure at step {self.fail_at}")
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Reg(RegMixin, rt.LightningModule):
    """The raytrainer module."""


class BackboneMixin:
    """A backbone (Linear, BatchNorm, Tanh) and a head; the optimizer starts with the head only."""

    def __init__(self, bn: bool = True) -> None:
        super().__init__()
        # (CPU BatchNorm is slow on a loaded 2-core machine: the tests that need no BatchNorm leave it out)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8) if bn else nn.Identity(), nn.Tanh())
        self.head = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.head(self.backbone(x)), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.head.parameters(), lr=0.1, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)]


class Backbone(BackboneMixin, rt.LightningModule):
    """The raytrainer module."""


def loader(n: int = 32, batch_size: int = 4, shuffle: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g) * 2 + 1
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=batch_size, shuffle=shuffle)


class Indexed(Dataset):
    """Sample i is (tensor of 4 copies of i, i): a prediction tells which sample it came from."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((4,), float(i)), torch.tensor([float(i)])


class WriterMixin:
    """Writes each rank's batch indices and predictions to ``root/rank<r>.<batch|epoch>.json``."""

    def __init__(self, root: str, write_interval: str = "batch_and_epoch") -> None:
        super().__init__(write_interval)
        self.root = root

    def _append(self, trainer, kind: str, row: dict) -> None:
        with open(os.path.join(self.root, f"rank{trainer.global_rank}.{kind}.json"), "a") as f:
            f.write(json.dumps(row) + "\n")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self._append(trainer, "batch", {"indices": list(batch_indices), "batch_idx": batch_idx,
                                        "inputs": batch[0][:, 0].tolist(), "dl": dataloader_idx})

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        self._append(trainer, "epoch", {"indices": batch_indices, "n_predictions": len(predictions)})


class ShardWriter(WriterMixin, BasePredictionWriter):
    """The raytrainer writer."""


class TimerLog(rt.Callback):
    """Rank 0 appends the Timer's offset at train start and its elapsed time after each batch to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _timer(self, trainer) -> Timer:
        return next(c for c in trainer.callbacks if isinstance(c, Timer))

    def _write(self, trainer, row: dict) -> None:
        if trainer.global_rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_train_start(self, trainer, pl_module):
        self._write(trainer, {"start": True, "offset": self._timer(trainer)._offset, "step": trainer.global_step})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._write(trainer, {"step": trainer.global_step, "elapsed": self._timer(trainer).time_elapsed()})
