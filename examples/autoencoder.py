"""LitAutoEncoder on scikit-learn's digits (8x8 images, 64 inputs), trained by raytrainer.

    python examples/autoencoder.py --max_epochs 5                    # one CPU, in-process
    python examples/autoencoder.py --num_processes 2 --max_epochs 5  # 2 ranks on a local Ray instance
    python examples/autoencoder.py --num_nodes 2:4 --num_processes 1 # elastic, on a Ray cluster

Every Trainer argument that matters for where it runs is a flag, so the same script goes from a
laptop to a cluster unchanged.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import raytrainer as pl  # noqa: E402


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits images scaled to [0, 1] (1797 x 64) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(digits.target)


class DigitsDataModule(pl.LightningDataModule):
    """Train/validation/test splits of the digits, fixed by a seed."""

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        x, y = load_digits_tensors()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.hparams.seed))
        x, y = x[perm], y[perm]
        self.train_set = TensorDataset(x[:1400], y[:1400])
        self.val_set = TensorDataset(x[1400:1600], y[1400:1600])
        self.test_set = TensorDataset(x[1600:], y[1600:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=200)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=200)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=200)


class LitAutoEncoder(pl.LightningModule):
    """The LitAutoEncoder of the feature tour, sized for 8x8 digits."""

    def __init__(self, hidden: int = 64, latent: int = 3, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, 64))
        self.example_input_array = torch.rand(1, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding: what prediction and export return."""
        return self.encoder(x)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, _ = batch
        return nn.functional.mse_loss(self.decoder(self.encoder(x)), x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True, sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch), sync_dist=True)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int,
                     dataloader_idx: int = 0) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class KillOnce(pl.Callback):
    """Fault-tolerance demo: rank 1 kills its own process (SIGKILL) once, at a given step."""

    def __init__(self, step: int, root: str) -> None:
        self.step, self.marker = step, os.path.join(root, ".killed-once")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object,
                           batch: object, batch_idx: int) -> None:
        if trainer.global_rank == 1 and trainer.global_step == self.step and not os.path.exists(self.marker):
            os.makedirs(os.path.dirname(self.marker), exist_ok=True)
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


def _count(value: str) -> str | int:
    return value if ":" in value or "," in value or value in ("auto", "-1") else int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_epochs", type=int, default=5)
    p.add_argument("--max_steps", type=int, default=-1)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", type=_count, default="auto")
    p.add_argument("--num_processes", type=_count, default=None)
    p.add_argument("--gpus", type=_count, default=None)
    p.add_argument("--tpu_cores", type=int, default=None)
    p.add_argument("--num_nodes", type=_count, default=1)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--default_root_dir", default=os.path.join(os.getcwd(), "runs", "autoencoder"))
    p.add_argument("--ckpt_path", default="last", help='"last" resumes a preempted run; "none" starts fresh')
    p.add_argument("--max_failures", type=int, default=0)
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--no_progress_bar", action="store_true")
    p.add_argument("--kill_rank_at_step", type=int, default=None,
                   help="demo of fault tolerance: rank 1 SIGKILLs itself once at this step (use with --max_failures)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> pl.Trainer:
    args = parse_args(argv)
    pl.seed_everything(args.seed, workers=True)
    trainer = pl.Trainer(
        max_epochs=args.max_epochs, max_steps=args.max_steps, accelerator=args.accelerator, devices=args.devices,
        num_processes=args.num_processes, gpus=args.gpus, tpu_cores=args.tpu_cores, num_nodes=args.num_nodes,
        strategy=args.strategy, precision=args.precision, default_root_dir=args.default_root_dir,
        max_failures=args.max_failures, deterministic=args.deterministic or None,
        enable_progress_bar=not args.no_progress_bar, log_every_n_steps=5, logger=loggers(args.default_root_dir),
        # save_last: checkpoints/last.ckpt always names the newest checkpoint (the README exports it)
        callbacks=[pl.ModelCheckpoint(save_last=True)]
        + ([KillOnce(args.kill_rank_at_step, args.default_root_dir)] if args.kill_rank_at_step else []),
    )
    model = LitAutoEncoder(lr=args.lr)
    dm = DigitsDataModule(batch_size=args.batch_size, seed=args.seed)
    trainer.fit(model, datamodule=dm, ckpt_path=None if args.ckpt_path == "none" else args.ckpt_path)
    last = float(trainer.callback_metrics.get("train_loss_epoch", float("nan")))
    test = trainer.test(model, datamodule=dm, verbose=False)
    print(f"world size: {trainer.world_size}, epochs: {trainer.current_epoch}, steps: {trainer.global_step}")
    first = _first_epoch_loss(trainer.log_dir)
    print(f"train loss: first epoch {first:.4f} -> last epoch {last:.4f}; test loss {test[0]['test_loss']:.4f}")
    print(f"checkpoint: {trainer.checkpoint_callback.best_model_path}")
    print(f"logs: {trainer.log_dir} (metrics.csv; tensorboard --logdir {os.path.dirname(trainer.log_dir)})")
    return trainer


def loggers(root: str) -> list[pl.loggers.Logger]:
    """TensorBoard (Lightning's default) and metrics.csv, both in the same lightning_logs/version_N folder."""
    tensorboard = pl.loggers.TensorBoardLogger(root)
    return [tensorboard, pl.loggers.CSVLogger(root, version=tensorboard.version)]


def _first_epoch_loss(log_dir: str) -> float:
    import csv

    path = os.path.join(log_dir, "metrics.csv")
    if not os.path.exists(path):
        return float("nan")
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get("train_loss_epoch"):
                return float(row["train_loss_epoch"])
    return float("nan")


if __name__ == "__main__":
    main()
