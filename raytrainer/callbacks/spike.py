"""SpikeDetection: stop training when the loss jumps far above its running mean, naming the batches (Lightning's)."""
from __future__ import annotations

import collections
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from raytrainer.callbacks.callback import Callback


class TrainingSpikeException(RuntimeError):
    """Raised by SpikeDetection at the batch whose loss spiked."""

    def __init__(self, batch_idx: int) -> None:
        super().__init__(f"Training spike detected in batch {batch_idx}")
        self.batch_idx = batch_idx


class SpikeDetection(Callback):
    """Compares each step's loss with the mean of the last ``window`` losses: a loss that got worse (``mode``) by
    at least ``atol`` and ``rtol`` times the mean (both, where given), or is not finite (``finite_only``), is a
    spike. The batch before it and the spiking batch are written to ``exclude_batches_path`` (a JSON list; default
    ``<default_root_dir>/skip_batches.json``) and TrainingSpikeException is raised on every rank."""

    def __init__(self, mode: str = "min", window: int = 10, warmup: int = 1, atol: float | None = None,
                 rtol: float | None = 2.0, exclude_batches_path: str | os.PathLike[str] | None = None,
                 finite_only: bool = True) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"SpikeDetection(mode={mode!r}): use 'min' (the loss should fall) or 'max'.")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"SpikeDetection(window={window!r}): use an int >= 1 (losses in the running mean).")
        self.mode, self.window, self.warmup, self.atol, self.rtol = mode, window, warmup, atol, rtol
        self.exclude_batches_path = None if exclude_batches_path is None else str(exclude_batches_path)
        self.finite_only = finite_only
        self.last_val = 0.0
        self.bad_batches: list[int] = []
        self._recent: collections.deque[float] = collections.deque(maxlen=window)

    def _running_mean(self) -> float:
        return sum(self._recent) / len(self._recent) if self._recent else math.nan

    def _is_spike(self, loss: float) -> bool:
        if self.finite_only and not math.isfinite(loss):
            return True
        change = loss - self.last_val
        if (change <= 0) if self.mode == "min" else (change >= 0):
            return False
        mean = self._running_mean()
        far = self.atol is None or abs(loss - mean) >= abs(self.atol)
        relatively_far = self.rtol is None or abs(loss - mean) >= abs(self.rtol * mean)
        return far and relatively_far

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if isinstance(outputs, torch.Tensor):
            loss = outputs
        elif isinstance(outputs, Mapping) and "loss" in outputs:
            loss = outputs["loss"]
        else:
            raise TypeError(f"SpikeDetection reads the loss from training_step's output, which must be a tensor or a "
                            f"dict with 'loss'; got {type(outputs).__qualname__}.")
        if self.exclude_batches_path is None:
            self.exclude_batches_path = os.path.join(trainer.default_root_dir, "skip_batches.json")
        elif not self.exclude_batches_path.endswith(".json"):
            self.exclude_batches_path = os.path.join(self.exclude_batches_path, "skip_batches.json")
        value = float(loss.detach().float().mean())
        spike = batch_idx >= self.warmup and self._is_spike(value)
        strategy = trainer.strategy
        if getattr(strategy, "distributed", False):
            spike = strategy.reduce_boolean_decision(spike, all=False)  # one rank's spike stops all
        if spike:
            self.bad_batches.extend([batch_idx - 1, batch_idx])
            if trainer.is_global_zero:
                os.makedirs(os.path.dirname(os.path.abspath(self.exclude_batches_path)), exist_ok=True)
                with open(self.exclude_batches_path, "w") as f:
                    json.dump(self.bad_batches, f, indent=4)
            raise TrainingSpikeException(batch_idx)
        if self.finite_only or math.isfinite(value):
            self._recent.append(value)
            self.last_val = value

    def state_dict(self) -> dict[str, Any]:
        return {"last_val": self.last_val, "mode": self.mode, "warmup": self.warmup, "atol": self.atol,
                "rtol": self.rtol, "bad_batches": list(self.bad_batches), "bad_batches_path": self.exclude_batches_path,
                "recent": list(self._recent)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_val = float(state_dict["last_val"])
        self.mode, self.warmup = state_dict["mode"], state_dict["warmup"]
        self.atol, self.rtol = state_dict["atol"], state_dict["rtol"]
        self.bad_batches = list(state_dict["bad_batches"])
        self.exclude_batches_path = state_dict["bad_batches_path"]
        self._recent = collections.deque(state_dict.get("recent", []), maxlen=self.window)
