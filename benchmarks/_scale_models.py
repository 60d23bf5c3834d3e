"""What the ranks of ``benchmarks/scale.py`` run: a tiny module whose steps sleep, a lazy dataset and the probe
callback that writes rank 0's step times, the steady-state window's marks, and kills one rank once.

A module of its own (not ``scale.py``, which runs as ``__main__``) so the rank processes import these classes by
name: the driver's ``sys.path`` (with ``benchmarks/`` on it) is copied to every rank actor.
"""
from __future__ import annotations

import json
import os
import signal
import time
import uuid
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import raytrainer as pl

FEATURES = 8
STEPS_FILE = "steps.0"  # rank 0's (step, time, attempt, world) per step: recovery.analyse reads it
KILLED_FILE = "killed"  # the kill marker, as recovery._maybe_kill writes it: {"t", "step"}
GO_FILE = "go"          # the driver: spares are warm, the steady-state window may begin
MARK_A, MARK_B = "mark.a", "mark.b"  # rank 0 at the first and last step of the steady-state window
FIRST_FILE = "first"          # rank 0's first finished step of the run (the end of the group start)
RECOVERED_FILE = "recovered"  # rank 0's first finished step after the kill (the end of the recovery)
TRAIN_START_FILE = "train_start.0"  # rank 0's on_train_start times: recovery.breakdown reads them


class Synthetic(Dataset):
    """``length`` samples made from their index (nothing stored, so it pickles in a few bytes)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.full((FEATURES,), float(i % 7) / 7.0)
        return x, x[:1] * 3


def loader(steps_per_epoch: int, world: int) -> DataLoader:
    """One sample per batch; each rank gets ``steps_per_epoch`` batches per epoch (sequential, not shuffled)."""
    return DataLoader(Synthetic(steps_per_epoch * world), batch_size=1, shuffle=False)


class Tiny(pl.LightningModule):
    """Linear(8, 1) whose training step sleeps ``sleep_s``: steps are cheap for the two cores, yet not free."""

    def __init__(self, sleep_s: float) -> None:
        super().__init__()
        self.sleep_s = sleep_s
        self.net = nn.Linear(FEATURES, 1)

    def on_train_start(self) -> None:
        torch.set_num_threads(1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        time.sleep(self.sleep_s)
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _write_json(path: str, record: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(record))
    os.replace(tmp, path)  # readers never see half a file


class Probe(pl.Callback):
    """The ranks' side of one measurement run, in files under ``out`` (every rank's clock is the driver's).

    - rank 0 appends ``{"step", "t", "attempt", "world"}`` to ``steps.0`` after every training step, marks its
      first step of the run (``first``) and of the attempt after the kill (``recovered``), and appends the time
      of each ``on_train_start`` to ``train_start.0``;
    - ``window`` > 0: once the driver wrote ``go``, rank 0 marks the first (``mark.a``) and last (``mark.b``) step
      of ``window`` steps inside one epoch (``epoch_steps`` steps per epoch), for the driver's CPU readings;
    - ``kill``: after ``mark.b`` (or ``go`` without a window), the last rank writes ``killed`` and SIGKILLs itself,
      in the first attempt only (the marker stays, so a restarted rank does not kill again);
    - the run stops ``stop_after`` steps into the attempt after the kill, or into a world of ``grow_to`` ranks or
      more (a resize); every rank of an attempt decides alike, from its start step.
    """

    def __init__(self, out: str, *, window: int = 0, epoch_steps: int = 0, kill: bool = False,
                 grow_to: int | None = None, stop_after: int = 30) -> None:
        self.out, self.window, self.epoch_steps, self.kill = out, window, epoch_steps, kill
        self.grow_to, self.stop_after = grow_to, stop_after

    def _path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_rank == 0:
            with open(self._path(TRAIN_START_FILE), "a") as f:
                f.write(json.dumps({"t": time.time()}) + "\n")
        self.attempt = uuid.uuid4().hex
        self.first_step_marked = False
        self.start_step = trainer.global_step
        self.after_kill = os.path.exists(self._path(KILLED_FILE))
        self.mark_a: int | None = None
        self.marked_b = False

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step, rank, world = trainer.global_step, trainer.global_rank, trainer.world_size
        now = time.time()
        if rank == 0:
            with open(self._path(STEPS_FILE), "a") as f:
                f.write(json.dumps({"step": step, "t": now, "attempt": self.attempt, "world": world}) + "\n")
            if not self.first_step_marked:  # the driver reads every process's CPU when these appear
                self.first_step_marked = True
                _write_json(self._path(RECOVERED_FILE if self.after_kill else FIRST_FILE), {"step": step, "t": now})
            if self.window and not self.after_kill:
                self._mark(step, now)
        if self.kill and rank == world - 1 and not self.after_kill and os.path.exists(
                self._path(MARK_B if self.window else GO_FILE)) and not os.path.exists(self._path(KILLED_FILE)):
            _write_json(self._path(KILLED_FILE), {"t": time.time(), "step": step})
            os.kill(os.getpid(), signal.SIGKILL)
        grown = self.grow_to is not None and world >= self.grow_to
        if (self.after_kill or grown) and step >= self.start_step + self.stop_after:
            trainer.should_stop = True

    def _mark(self, step: int, now: float) -> None:
        """(rank 0) The steady-state window: ``window`` steps that do not cross an epoch's end."""
        if self.mark_a is None:
            in_epoch = step % self.epoch_steps if self.epoch_steps else 0
            if os.path.exists(self._path(GO_FILE)) and (not self.epoch_steps or
                                                        in_epoch + self.window < self.epoch_steps):
                self.mark_a = step
                _write_json(self._path(MARK_A), {"step": step, "t": now})
        elif not self.marked_b and step >= self.mark_a + self.window:
            self.marked_b = True
            _write_json(self._path(MARK_B), {"step": step, "t": now})
