"""LearningRateMonitor: log each optimizer's learning rate."""
from __future__ import annotations

from typing import Any

from raytrainer.callbacks.callback import Callback


class LearningRateMonitor(Callback):
    """Logs ``lr-<Optimizer>`` (and ``/pg<i>`` for several param groups) every step or epoch."""

    def __init__(self, logging_interval: str | None = None) -> None:
        if logging_interval not in (None, "step", "epoch"):
            raise ValueError(f"LearningRateMonitor(logging_interval={logging_interval!r}): use 'step', 'epoch' "
                             "or None.")
        self.logging_interval = logging_interval

    def _lrs(self, trainer: Any) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, opt in enumerate(trainer.optimizers):
            name = f"lr-{type(opt).__name__}" + (f"-{i}" if len(trainer.optimizers) > 1 else "")
            groups = opt.param_groups
            for j, g in enumerate(groups):
                out[name + (f"/pg{j + 1}" if len(groups) > 1 else "")] = float(g["lr"])
        return out

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        stepped = trainer.session.state.batches_that_stepped
        if self.logging_interval != "epoch" and (stepped + 1) % trainer.log_every_n_steps == 0:
            trainer.session.send_to_loggers(self._lrs(trainer), trainer.session.state.batches_that_stepped)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.logging_interval != "step":
            trainer.session.send_to_loggers(self._lrs(trainer), trainer.session.state.batches_that_stepped)
