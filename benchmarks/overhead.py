"""Per-step overhead: plain PyTorch loop vs raytrainer vs pytorch_lightning, interleaved in one process.

Task (the issue's): MLP Linear(32,64)-ReLU-Linear(64,1), 20,000 samples, batch 32, 3 epochs, CPU,
torch.set_num_threads(1), self.log("loss", loss) every step.
- raytrainer: default Trainer settings (progress bar on, CSV logger every 50 steps, checkpointing on).
- Lightning: progress bar, checkpointing and logger off, as in Lightning's own parity benchmark.

    python benchmarks/overhead.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

N, BATCH, EPOCHS, LR = 20_000, 32, 3, 0.01


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 32, generator=g)
    y = x[:, :1] * 2 + 0.1 * torch.randn(N, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))


def run_plain() -> float:
    torch.manual_seed(0)
    model, loader = mlp(), data()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    start = time.perf_counter()
    for _ in range(EPOCHS):
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - start


def run_raytrainer(root: str) -> float:
    import raytrainer as rt

    class Model(rt.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    torch.manual_seed(0)
    model, loader = Model(), data()
    trainer = rt.Trainer(max_epochs=EPOCHS, default_root_dir=root, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(model, loader)
    return time.perf_counter() - start


def run_lightning(root: str) -> float:
    import pytorch_lightning as pl

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    torch.manual_seed(0)
    model, loader = Model(), data()
    trainer = pl.Trainer(max_epochs=EPOCHS, default_root_dir=root, enable_progress_bar=False,
                         enable_checkpointing=False, logger=False, enable_model_summary=False, accelerator="cpu",
                         devices=1)
    start = time.perf_counter()
    trainer.fit(model, loader)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-lightning", action="store_true", help="skip the pytorch_lightning anchor")
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    times: dict[str, list[float]] = {"plain": [], "raytrainer": [], "lightning": []}
    runners = [("plain", run_plain), ("raytrainer", run_raytrainer)]
    if not args.no_lightning:
        runners.append(("lightning", run_lightning))
    with tempfile.TemporaryDirectory() as root:
        for name, fn in runners:  # warm-up: imports, first allocations
            _quiet(fn, root) if name != "plain" else fn()
        for i in range(args.repeats):
            for name, fn in runners:
                t = _quiet(fn, root) if name != "plain" else fn()
                times[name].append(t)
                print(f"run {i + 1}/{args.repeats} {name:<11} {t:.3f} s", flush=True)
    steps = EPOCHS * (N // BATCH + (N % BATCH > 0))
    base = statistics.median(times["plain"])
    print(f"\n{steps} steps, torch {torch.__version__}, threads=1, median of {args.repeats} interleaved runs")
    print("| runner | median (s) | ratio vs plain | overhead per step (ms) |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        if not ts:
            continue
        m = statistics.median(ts)
        print(f"| {name} | {m:.3f} | {m / base:.3f} | {(m - base) / steps * 1e3:.4f} |")


def _quiet(fn, root: str) -> float:
    # The progress bar still renders (into a buffer), so its cost is measured; only the terminal is spared.
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return fn(root)


if __name__ == "__main__":
    main()
