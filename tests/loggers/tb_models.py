"""A module and callbacks for the TensorBoard logger tests, importable by Ray ranks."""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def data(n: int = 64, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch_size)


def make_module(base, hparams: bool = True, fail_at: int | None = None):
    """An instance of a small regression module on ``base`` (raytrainer or pytorch_lightning)."""
    class Regressor(base.LightningModule):
        def __init__(self, lr: float = 0.05, hidden: int = 8) -> None:
            super().__init__()
            if hparams:
                self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            self.example_input_array = torch.zeros(2, 4)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            if fail_at is not None and self.global_step == fail_at:
                raise RuntimeError(f"injected failure at step {fail_at}")
            loss = nn.functional.mse_loss(self(batch[0]), batch[1])
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", nn.functional.mse_loss(self(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Regressor()


def rank_touch_callback(base):
    """A callback that calls logger.experiment.add_scalar on every rank (only rank 0's may reach a file)."""
    class RankTouch(base.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.logger.experiment.add_scalar("rank_touch", float(trainer.global_rank), trainer.global_step)

    return RankTouch()


def kill_at(base, step: int, marker: str, rank: int):
    """A callback that SIGKILLs ``rank``'s own process once, when the batch after ``step`` optimizer steps starts
    (every row of the steps before is logged by then); a marker file remembers it."""
    import signal

    class KillAt(base.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_rank == rank and trainer.global_step == step and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)

    return KillAt()
