"""EarlyStopping: stop fit when a monitored metric stops improving (or diverges, or is not finite)."""
from __future__ import annotations

import math
from typing import Any

import torch

from raytrainer.callbacks.callback import Callback
from raytrainer.utilities import log


class EarlyStopping(Callback):
    """Lightning's EarlyStopping: patience, min_delta, thresholds; every rank agrees on stopping."""

    def __init__(self, monitor: str, min_delta: float = 0.0, patience: int = 3, verbose: bool = False,
                 mode: str = "min", strict: bool = True, check_finite: bool = True,
                 stopping_threshold: float | None = None, divergence_threshold: float | None = None,
                 check_on_train_epoch_end: bool | None = None, log_rank_zero_only: bool = False) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping(mode={mode!r}): use 'min' or 'max'.")
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
        # min_delta counts as improvement in the monitored direction
        self.min_delta = torch.tensor(abs(min_delta) if mode == "max" else -abs(min_delta))
        self.wait_count = 0
        self.stopped_epoch = 0
        self.best_score = torch.tensor(math.inf if mode == "min" else -math.inf)
        self.stopping_reason_message: str | None = None

    @property
    def state_key(self) -> str:
        return f"EarlyStopping{{'monitor': {self.monitor!r}, 'mode': {self.mode!r}}}"

    def state_dict(self) -> dict[str, Any]:
        return {"wait_count": self.wait_count, "stopped_epoch": self.stopped_epoch,
                "best_score": self.best_score, "patience": self.patience}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_count = int(state_dict["wait_count"])
        self.stopped_epoch = int(state_dict["stopped_epoch"])
        self.best_score = torch.as_tensor(state_dict["best_score"])
        self.patience = int(state_dict.get("patience", self.patience))

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
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            if self.strict:
                raise RuntimeError(f"EarlyStopping(monitor={self.monitor!r}) found no such metric at epoch "
                                   f"{trainer.current_epoch}. Logged: {sorted(metrics)}. Log it with self.log, "
                                   "or pass strict=False.")
            return
        current = torch.as_tensor(metrics[self.monitor]).detach().float().cpu().squeeze()
        stop, reason = self._evaluate(current)
        if trainer.strategy is not None and trainer.strategy.distributed:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = reason
            if self.verbose and trainer.is_global_zero:
                log.info("EarlyStopping: %s", reason)

    def _evaluate(self, current: torch.Tensor) -> tuple[bool, str | None]:
        better = torch.lt if self.mode == "min" else torch.gt
        if self.check_finite and not torch.isfinite(current):
            return True, (f"{self.monitor} = {float(current)} is not finite. Previous best score: "
                          f"{float(self.best_score):.4g}. Signaling Trainer to stop.")
        if self.stopping_threshold is not None and better(current, torch.tensor(self.stopping_threshold)):
            return True, (f"Stopping threshold reached: {self.monitor} = {float(current):.4g} "
                          f"{'<' if self.mode == 'min' else '>'} {self.stopping_threshold}.")
        if self.divergence_threshold is not None and better(-current, -torch.tensor(self.divergence_threshold)):
            return True, (f"Divergence threshold reached: {self.monitor} = {float(current):.4g} "
                          f"{'>' if self.mode == 'min' else '<'} {self.divergence_threshold}.")
        if better(current - self.min_delta, self.best_score.to(current.device)):
            self.best_score = current
            self.wait_count = 0
            return False, None
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return True, (f"{self.monitor} did not improve in the last {self.wait_count} checks. Best score: "
                          f"{float(self.best_score):.4g}.")
        return False, None
