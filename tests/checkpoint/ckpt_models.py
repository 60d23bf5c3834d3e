"""Small models and helpers shared by the checkpoint tests (real torch, real files)."""
from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt
from raytrainer.io import storage

N_SAMPLES, BATCH = 40, 4  # 10 training batches per epoch


def regression_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed regression problem (same tensors every call)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(N_SAMPLES, 1, generator=g)
    return x, y


def loaders(shuffle: bool = True) -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader (order drawn from the global torch RNG) and a validation loader."""
    x, y = regression_data()
    return (DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=shuffle),
            DataLoader(TensorDataset(x, y), batch_size=8))


def make_body(base: type) -> type:
    """The same model written against raytrainer's or pytorch_lightning's LightningModule."""

    class Regressor(base):
        def __init__(self, hidden: int = 16, lr: float = 0.02, dropout: float = 0.1, scheduler: str = "step",
                     val_metric_offset: float = 0.0) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                                           torch.nn.Linear(hidden, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self(x), y)
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self(x), y) + self.hparams.val_metric_offset)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            if self.hparams.scheduler == "plateau":
                sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=0.9)
                return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}
            if self.hparams.scheduler == "step_interval":
                sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7)
                return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
            return {"optimizer": opt, "lr_scheduler": sched}

    return Regressor


Regressor = make_body(rt.LightningModule)


def trainer(root: Any, **kwargs: Any) -> rt.Trainer:
    """A quiet Trainer that logs every step to metrics.csv (a CSVLogger: the default would be TensorBoard)."""
    args = dict(default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False,
                log_every_n_steps=1, deterministic=True, logger=rt.loggers.CSVLogger(str(root)))
    args.update(kwargs)
    return rt.Trainer(**args)


def metric_rows(version_dir: str) -> list[dict[str, str]]:
    """metrics.csv of one logger version (local path or URI) as rows without empty cells."""
    text = storage.read_verified(storage.join(version_dir, "metrics.csv")).decode()
    return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(io.StringIO(text))]


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys, and every tensor identical bit for bit."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k] - b[k]).abs().max().item():.3g})"


def temp_files(directory: str) -> list[str]:
    """The temporary files of checkpoint writes in flight (or left by a killed writer) in ``directory``."""
    return [n for n in os.listdir(directory) if n.startswith(".") and ".tmp-" in n]


def kill_during_a_write(script: str, arg: str, directory: str, ready: Callable[[], bool] = lambda: True,
                        timeout: float = 120.0) -> list[str]:
    """Run ``python -c script arg``, wait for ``directory/last.ckpt`` and then for ``ready()``, SIGKILL it while a
    later checkpoint is being written; returns the temporary files the kill left (proof that it hit a write)."""
    proc = subprocess.Popen([sys.executable, "-c", script, arg], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        last = os.path.join(directory, "last.ckpt")
        for what, done, pause in (("a checkpoint was written", lambda: os.path.exists(last), 0.01),
                                  ("the test's condition held", ready, 0.01),
                                  ("a further checkpoint write started", lambda: temp_files(directory), 0.001)):
            while not done():
                assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, f"not in time: {what}"
                time.sleep(pause)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return temp_files(directory)
