"""A tabular classifier trained from Parquet files by raytrainer.data.ParquetDataset on Ray ranks.

    python examples/parquet_classifier.py                                   # 2 ranks, data in runs/.../data
    python examples/parquet_classifier.py --data s3://my-bucket/tabular     # the same, data on S3
    python examples/parquet_classifier.py --sigterm_at_step 40              # preempted at step 40: exits 75
    python examples/parquet_classifier.py                                   # ... and this resumes there

The first run writes a synthetic data set (a row id, 16 float features, a 4-class label) to ``--data`` when
nothing is there yet. Each rank reads only its row groups; a preempted run checkpoints its position in the
data, and the rerun (``--ckpt_path last``, the default) starts reading at that position.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import raytrainer as pl  # noqa: E402
from raytrainer.data import ParquetDataset  # noqa: E402
from raytrainer.io import storage  # noqa: E402

FEATURES, CLASSES = 16, 4


def write_dataset(uri: str, rows: int, files: int = 8, row_group: int = 10_000, seed: int = 0) -> None:
    """``rows`` rows of a separable 4-class problem as ``files`` Parquet files under ``uri``/train and /val."""
    fs, root = storage.resolve(uri)
    g = np.random.default_rng(seed)
    w = g.standard_normal((FEATURES, CLASSES)).astype(np.float32)
    for split, n in (("train", rows), ("val", max(rows // 10, CLASSES))):
        fs.create_dir(f"{root}/{split}", recursive=True)
        per = n // files
        for f in range(files):
            x = g.standard_normal((per, FEATURES)).astype(np.float32)
            y = (x @ w + 0.3 * g.standard_normal((per, CLASSES))).argmax(1)
            table = pa.table({"id": np.arange(f * per, (f + 1) * per),
                              "features": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), FEATURES),
                              "label": y.astype(np.int64)})
            pq.write_table(table, f"{root}/{split}/part-{f:03d}.parquet", row_group_size=row_group, filesystem=fs)


def have_dataset(uri: str) -> bool:
    fs, root = storage.resolve(uri)
    return fs.get_file_info(f"{root}/train/part-000.parquet").type == pa.fs.FileType.File


class Classifier(pl.LightningModule):
    """An MLP over the feature vector; batches are the dicts ParquetDataset yields."""

    def __init__(self, hidden: int = 64, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self.net(batch["features"]), batch["label"])
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        acc = (self.net(batch["features"]).argmax(1) == batch["label"]).float().mean()
        self.log("val_acc", acc, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class PreemptDriverOnce(pl.Callback):
    """Preemption demo: rank 0 sends SIGTERM to the driver process once, at a given step (a spot node's notice)."""

    def __init__(self, step: int, root: str) -> None:
        self.step, self.driver, self.marker = step, os.getpid(), os.path.join(root, ".preempted-once")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object,
                           batch: object, batch_idx: int) -> None:
        if trainer.global_rank == 0 and trainer.global_step == self.step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(self.driver, signal.SIGTERM)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.join(os.getcwd(), "runs", "parquet_classifier")
    p.add_argument("--data", default=os.path.join(root, "data"), help="a directory or a pyarrow URI (s3://...)")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--num_nodes", default="1")
    p.add_argument("--max_epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--default_root_dir", default=root)
    p.add_argument("--ckpt_path", default="last", help='"last" resumes a preempted run; "none" starts fresh')
    p.add_argument("--sigterm_at_step", type=int, default=None, help="preempt the driver once at this step")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> pl.Trainer:
    args = parse_args(argv)
    if not have_dataset(args.data):
        write_dataset(args.data, args.rows)
    pl.seed_everything(0)
    trainer = pl.Trainer(
        num_processes=args.num_processes, num_nodes=int(args.num_nodes) if args.num_nodes.isdigit() else args.num_nodes,
        max_epochs=args.max_epochs, default_root_dir=args.default_root_dir, log_every_n_steps=10,
        callbacks=[pl.ModelCheckpoint(save_last=True)]
        + ([PreemptDriverOnce(args.sigterm_at_step, args.default_root_dir)] if args.sigterm_at_step else []),
    )
    train = ParquetDataset(f"{args.data}/train", columns=["features", "label"], batch_size=args.batch_size,
                           shuffle=True, seed=0)
    val = ParquetDataset(f"{args.data}/val", columns=["features", "label"], batch_size=4096)
    trainer.fit(Classifier(), train, val, ckpt_path=None if args.ckpt_path == "none" else args.ckpt_path)
    print(f"world size: {trainer.world_size}, epochs: {trainer.current_epoch}, steps: {trainer.global_step}, "
          f"val_acc: {float(trainer.callback_metrics['val_acc']):.3f}")
    return trainer


if __name__ == "__main__":
    main()
