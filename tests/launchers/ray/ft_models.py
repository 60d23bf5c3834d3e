"""Small modules and callbacks for the fault-tolerance tests (importable by the Ray ranks)."""
from __future__ import annotations

import glob
import json
import os
import signal
import time

import torch
from signal_at import SignalAt  # noqa: F401 - the tests import it from here
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl


class Regression(pl.LightningModule):
    """Linear regression; optionally logs every sample id it trains on, with step and world size."""

    def __init__(self, ids_path: str | None = None, sleep_s: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.ids_path = ids_path
        self.sleep_s = sleep_s

    def training_step(self, batch, batch_idx):
        idx, x, y = (batch["id"], batch["x"], batch["y"][:, None]) if isinstance(batch, dict) else batch
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.ids_path:
            with open(f"{self.ids_path}.{os.getpid()}", "a") as f:
                f.write(json.dumps({"epoch": self.current_epoch, "step": self.global_step, "ids": idx.tolist(),
                                    "world": self.trainer.world_size, "time": time.time()}) + "\n")
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader(n: int = 256, batch_size: int = 16, shuffle: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return DataLoader(TensorDataset(torch.arange(n), x, x.sum(1, keepdim=True)), batch_size=batch_size,
                      shuffle=shuffle)


class FailingRegression(Regression):
    """Raises a retryable error inside training_step on rank 1 at ``step``, every time (a crash loop)."""

    def __init__(self, fail_step: int) -> None:
        super().__init__()
        self.fail_step = fail_step

    def training_step(self, batch, batch_idx):
        from raytrainer.launchers.ray.launcher import RetryableError

        if self.global_rank == 1 and self.global_step == self.fail_step:
            raise RetryableError(f"injected failure at step {self.fail_step}")
        return super().training_step(batch, batch_idx)


def kept_ids(root: str, ev: list[dict]) -> list[dict]:
    """The sample ids Regression(ids_path=root/ids) logged in steps that count: work done after the point a
    restart or resize resumed from is dropped (it was done again)."""
    restarts = [e for e in ev if e["event"] in ("restart", "resize")]
    rows = [json.loads(line) for path in glob.glob(os.path.join(root, "ids.*")) for line in open(path)]
    return [r for r in rows if not any(r["time"] < e["time"] and r["step"] >= e["step"] for e in restarts)]


def params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def events(root: str) -> list[dict]:
    paths = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f == "events.jsonl"]
    out: list[dict] = []
    for p in sorted(paths):
        out += [json.loads(line) for line in open(p) if line.strip()]
    return out


class KillThenCollectiveAt(pl.Callback):
    """At ``step`` (after its optimizer step, before the step's snapshot): rank 1 dies, once, and every rank
    enters an all-reduce; rank 0 fails there with parameters one step newer than its last snapshot."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        if trainer.global_rank == 1 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        import torch.distributed as dist

        dist.all_reduce(torch.zeros(1))


class KillRank0InSetup(pl.Callback):
    """Rank 0 dies in ``setup`` of the first attempt: before it restored a checkpoint or recorded its start."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def setup(self, trainer, pl_module, stage):
        if trainer.global_rank == 0 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


class HangOnRank1(Regression):
    """Rank 1 sleeps in training_step at ``hang_step`` (the first time only: a marker file says it happened), so
    rank 0 waits for it in DDP's all-reduce; a restarted run trains on."""

    def __init__(self, hang_step: int, marker: str) -> None:
        super().__init__()
        self.hang_step, self.marker = hang_step, marker

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step == self.hang_step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(3600)  # the hang the driver must name
        return super().training_step(batch, batch_idx)
