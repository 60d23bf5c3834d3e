"""The model, data and fault callback of the fault-injection runs (importable by Ray ranks: the training script puts
this folder on PYTHONPATH, which the ranks inherit)."""
from __future__ import annotations

import os
import signal
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl

STEPS_PER_EPOCH = 16  # 256 samples in batches of 16, on one process


class FaultModel(pl.LightningModule):
    """A small regression with momentum (so optimizer state matters on resume). ``tag`` names the run that wrote a
    checkpoint (it is saved in every checkpoint's hyper_parameters); ``sleep_s`` stretches each step so a fault
    chosen by time lands inside training."""

    def __init__(self, tag: str = "", sleep_s: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        _, x, y = batch
        if self.hparams.sleep_s:
            time.sleep(self.hparams.sleep_s)
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader(n: int = 256, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return DataLoader(TensorDataset(torch.arange(n), x, x.sum(1, keepdim=True)), batch_size=batch_size, shuffle=True)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().cpu() for p in model.parameters()])


class Injector(pl.Callback):
    """Reports each rank's pid and step into ``workdir`` (which is never on the faulted storage), and, when
    ``step`` is set, sends ``sig`` once at that step from rank ``rank``: to its own process (``target="self"``) or
    to the driver (``target="driver"``, the pid recorded when the callback was made). A marker file remembers
    that the signal was sent, across restarts of the rank."""

    def __init__(self, workdir: str, step: int | None = None, sig: int = signal.SIGKILL, target: str = "self",
                 rank: int = 0) -> None:
        self.workdir, self.step, self.sig, self.target, self.rank = workdir, step, sig, target, rank
        self.driver_pid = os.getpid()

    def _write(self, name: str, text: str) -> None:
        tmp = os.path.join(self.workdir, f".{name}.{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(self.workdir, name))

    def on_train_start(self, trainer, pl_module):
        self._write(f"pid.rank{trainer.global_rank}", str(os.getpid()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rank = trainer.global_rank
        self._write(f"step.rank{rank}", f"{trainer.global_step} {time.time()}")
        if not os.path.exists(os.path.join(self.workdir, "first-step")):
            self._write("first-step", str(time.time()))
        marker = os.path.join(self.workdir, "signal-sent")
        if self.step is None or rank != self.rank or trainer.global_step != self.step or os.path.exists(marker):
            return
        self._write("signal-sent", f"{self.sig} {self.target} step {self.step} {time.time()}")
        os.kill(self.driver_pid if self.target == "driver" else os.getpid(), self.sig)
