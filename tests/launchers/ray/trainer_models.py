"""Small picklable modules and callbacks for the Trainer-on-Ray tests.

They live in an importable module (not inside test functions) so the rank actors, which get the
driver's ``sys.path``, unpickle them by name. The callbacks report what happened on each rank by
writing small files into a directory the test chose: the ranks are other processes, so files are
the simplest channel back that does not go through the code under test.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl

DIM = 4


def regression_data(n: int = 128, dim: int = DIM, seed: int = 0) -> TensorDataset:
    """A fixed linear-regression dataset: y = sum(x) + noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def loader(dataset: TensorDataset, batch_size: int, shuffle: bool = False) -> DataLoader:
    """An ordinary DataLoader (raytrainer injects the DistributedSampler on the ranks)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


class Regression(pl.LightningModule):
    """Linear regression with SGD and no dropout: deterministic given the data order.

    Logs the rank number as ``train_rank`` (sync_dist=True: the mean over ranks) and
    ``train_rank_local`` (no sync: what rank 0 saw), so tests can tell a reduced value from a local
    one; ``val_rank_local`` has no sync_dist, but validation metrics are reduced across ranks anyway.
    """

    def __init__(self, dim: int = DIM, lr: float = 0.1, hidden: int = 0, fail_on_rank: int | None = None,
                 fail_at_batch: int = 2, step_sleep_s: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        with torch.random.fork_rng():  # the same initial weights every time, without touching the caller's RNG
            torch.manual_seed(0)
            if hidden:
                self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            else:
                self.net = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.hparams.fail_on_rank == self.global_rank and batch_idx == self.hparams.fail_at_batch:
            raise ValueError(f"deliberate failure in training_step at batch {batch_idx}")
        if self.hparams.step_sleep_s:
            time.sleep(self.hparams.step_sleep_s)
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_rank", float(self.global_rank), on_step=False, on_epoch=True, sync_dist=True)
        self.log("train_rank_local", float(self.global_rank), on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), sync_dist=True)
        self.log("val_rank", float(self.global_rank), sync_dist=True)
        self.log("val_rank_local", float(self.global_rank))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch), sync_dist=True)
        self.log("test_rank", float(self.global_rank), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class WithOpenFile(Regression):
    """A module holding an open file handle: cannot be sent to the ranks."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.debug_log = open(path, "w")  # noqa: SIM115 - the point of the test


class RankProbe(pl.Callback):
    """Writes ``<out>/<stage>-rank-<r>.json`` on every rank: where it ran and what it saw.

    On ``on_train_batch_end`` of the first batch it also writes ``<out>/training-rank-<r>`` (so a
    test knows training has started); on ``on_train_end`` it saves the rank's parameters.
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = str(out_dir)

    def _write(self, name: str, payload: dict[str, Any]) -> None:
        path = Path(self.out_dir) / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, path)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        import ray

        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        self._write(f"{stage}-rank-{trainer.global_rank}.json", {
            "rank": trainer.global_rank, "world_size": trainer.world_size, "local_rank": trainer.local_rank,
            "node_rank": trainer.node_rank, "pid": os.getpid(),
            "node_id": ctx.get_node_id() if ctx is not None else None,
            "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK",
                                                   "MASTER_ADDR", "MASTER_PORT")},
        })

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        marker = Path(self.out_dir) / f"training-rank-{trainer.global_rank}"
        if not marker.exists():
            marker.write_text(str(os.getpid()))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"state_dict": state, "global_step": trainer.global_step},
                   Path(self.out_dir) / f"params-rank-{trainer.global_rank}.pt")


class WriteAudit(pl.Callback):
    """Records, per rank, every path raytrainer's storage layer writes or creates.

    Checkpoints, ``metrics.csv`` and ``hparams.yaml`` all go through
    ``raytrainer.io.storage``; this wraps its write functions in each rank process (still
    calling the real ones) and appends each path to ``<out>/writes-rank-<r>.txt``. The first line,
    ``installed``, proves the audit ran on that rank.
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = str(out_dir)
        self._originals: dict[str, Any] = {}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from raytrainer.io import storage

        record = Path(self.out_dir) / f"writes-rank-{trainer.global_rank}.txt"
        with open(record, "a") as f:
            f.write("installed\n")

        def spy(name: str, real: Any) -> Any:
            def wrapper(uri: Any, *args: Any, **kwargs: Any) -> Any:
                with open(record, "a") as f:
                    f.write(f"{name} {uri}\n")
                return real(uri, *args, **kwargs)
            return wrapper

        for name in ("write_bytes_atomic", "makedirs"):
            real = getattr(storage, name)
            self._originals[name] = real
            setattr(storage, name, spy(name, real))

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from raytrainer.io import storage

        for name, real in self._originals.items():
            setattr(storage, name, real)
        self._originals = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "_originals": {}}


def read_probes(out_dir: str | os.PathLike[str], stage: str) -> list[dict[str, Any]]:
    """The RankProbe records of one stage, by rank."""
    files = sorted(Path(out_dir).glob(f"{stage}-rank-*.json"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    return [json.loads(p.read_text()) for p in files]


class Boom(Regression):
    """Rank 1 raises at step 3 (a plain error in user code: not retried). Lives here, not in a test module, so
    the ranks unpickle it without importing the test module (and its ``conftest`` import)."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.global_step == 3 and self.trainer.global_rank == 1:
            raise RuntimeError("boom at step 3")
        return super().training_step(batch, batch_idx)
