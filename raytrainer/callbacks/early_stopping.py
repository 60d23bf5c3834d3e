"""EarlyStopping: stop fit when a monitored metric stops improving (or diverges, or is not finite)."""
from __future__ import annotations

import math
import warnings
from enum import Enum
from typing import Any

import torch

from raytrainer.callbacks.callback import Callback
from raytrainer.utilities import log
from raytrainer.utilities.exceptions import MisconfigurationException


class EarlyStoppingReason(Enum):
    """Why EarlyStopping stopped the run (Lightning's values, which checkpoints store)."""

    NOT_STOPPED = 0
    STOPPING_THRESHOLD = 1
    DIVERGENCE_THRESHOLD = 2
    PATIENCE_EXHAUSTED = 3
    NON_FINITE_METRIC = 4


class EarlyStopping(Callback):
    """Lightning's EarlyStopping: patience, min_delta, thresholds; every rank agrees on stopping."""

    def __init__(self, monitor: str, min_delta: float = 0.0, patience: int = 3, verbose: bool = False,
                 mode: str = "min", strict: bool = True, check_finite: bool = True,
                 stopping_threshold: float | None = None, divergence_threshold: float | None = None,
                 check_on_train_epoch_end: bool | None = None, log_rank_zero_only: bool = False) -> None:
        if mode not in ("min", "max"):
            raise MisconfigurationException(f"EarlyStopping(mode={mode!r}): use 'min' or 'max'.")
        if patience < 0:
            raise ValueError(f"EarlyStopping(patience={patience}) must be >= 0.")
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.verbose = verbose
        self.strict = strict
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.check_on_train_epoch_end = check_on_train_epoch_end
        self.log_rank_zero_only = log_rank_zero_only  # verbose messages from rank 0 only
        # min_delta counts as improvement in the monitored direction
        self.min_delta = torch.tensor(abs(min_delta) if mode == "max" else -abs(min_delta))
        self.wait_count = 0
        self.stopped_epoch = 0
        self.best_score = torch.tensor(math.inf if mode == "min" else -math.inf)
        self.stopping_reason = EarlyStoppingReason.NOT_STOPPED  # set by the check that fires on this rank
        self.stopping_reason_message: str | None = None

    @property
    def state_key(self) -> str:
        return f"EarlyStopping{{'monitor': {self.monitor!r}, 'mode': {self.mode!r}}}"

    def state_dict(self) -> dict[str, Any]:
        """Lightning's keys; the stopping reason as its enum value, so checkpoints load in either framework."""
        return {"wait_count": self.wait_count, "stopped_epoch": self.stopped_epoch,
                "best_score": self.best_score, "patience": self.patience,
                "stopping_reason": self.stopping_reason.value, "stopping_reason_message": self.stopping_reason_message}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from ``state_dict`` (older checkpoints without a stopping reason: not stopped)."""
        self.wait_count = int(state_dict["wait_count"])
        self.stopped_epoch = int(state_dict["stopped_epoch"])
        self.best_score = torch.as_tensor(state_dict["best_score"])
        self.patience = int(state_dict.get("patience", self.patience))
        self.stopping_reason = EarlyStoppingReason(
            state_dict.get("stopping_reason", EarlyStoppingReason.NOT_STOPPED.value))
        self.stopping_reason_message = state_dict.get("stopping_reason_message")

    def _on_epoch_end_hook(self, trainer: Any) -> bool:
        """Check in on_train_epoch_end (after that epoch's validation) unless validation runs mid-epoch or
        not every epoch; then check after each validation. Lightning's default."""
        if self.check_on_train_epoch_end is not None:
            return self.check_on_train_epoch_end
        if not trainer.session.val_dataloaders:
            return True
        return trainer.val_check_interval in (None, 1.0) and trainer.check_val_every_n_epoch == 1

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state_fn == "fit" and self._on_epoch_end_hook(trainer):
            self._check(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state_fn == "fit" and not trainer.sanity_checking and not self._on_epoch_end_hook(trainer):
            self._check(trainer)

    def _check(self, trainer: Any) -> None:
        if trainer.fast_dev_run:  # as in Lightning: a fast_dev_run never stops early
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            message = (f"EarlyStopping(monitor={self.monitor!r}) found no such metric at epoch "
                       f"{trainer.current_epoch}. Logged: {sorted(metrics)}. Log it with self.log, "
                       "or pass strict=False.")
            if self.strict:
                raise RuntimeError(message)
            if self.verbose:
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            return
        current = torch.as_tensor(metrics[self.monitor]).detach().float().cpu().squeeze()
        stop, reason = self._evaluate(current)
        if trainer.strategy is not None and trainer.strategy.distributed:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            # None on a rank that agreed to another rank's stop (its own check did not fire), as in Lightning
            self.stopping_reason_message = reason
            if self.verbose and reason and (trainer.is_global_zero or not self.log_rank_zero_only):
                log.info("EarlyStopping: %s", reason)

    def _evaluate(self, current: torch.Tensor) -> tuple[bool, str | None]:
        """Whether to stop and why, checked in Lightning's order; sets ``stopping_reason`` when stopping."""
        better = torch.lt if self.mode == "min" else torch.gt
        order = "<" if self.mode == "min" else ">"
        if self.check_finite and not torch.isfinite(current):
            self.stopping_reason = EarlyStoppingReason.NON_FINITE_METRIC
            return True, (f"Monitored metric {self.monitor} = {current} is not finite. Previous best value was "
                          f"{float(self.best_score):.3f}. Signaling Trainer to stop.")
        if self.stopping_threshold is not None and better(current, torch.tensor(self.stopping_threshold)):
            self.stopping_reason = EarlyStoppingReason.STOPPING_THRESHOLD
            return True, (f"Stopping threshold reached: {self.monitor} = {current} {order} "
                          f"{self.stopping_threshold}. Signaling Trainer to stop.")
        if self.divergence_threshold is not None and better(-current, -torch.tensor(self.divergence_threshold)):
            self.stopping_reason = EarlyStoppingReason.DIVERGENCE_THRESHOLD
            # the comparison that fired (Lightning's message shows the mode's sign, the opposite one, here)
            return True, (f"Divergence threshold reached: {self.monitor} = {current} {'>' if order == '<' else '<'} "
                          f"{self.divergence_threshold}. Signaling Trainer to stop.")
        if better(current - self.min_delta, self.best_score.to(current.device)):
            self.best_score = current
            self.wait_count = 0
            return False, None
        self.wait_count += 1
        if self.wait_count >= self.patience:
            self.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
            return True, (f"Monitored metric {self.monitor} did not improve in the last {self.wait_count} records. "
                          f"Best score: {float(self.best_score):.3f}. Signaling Trainer to stop.")
        return False, None
