"""GradientAccumulationScheduler: change accumulate_grad_batches by epoch."""
from __future__ import annotations

from typing import Any

from raytrainer.callbacks.callback import Callback, overrides
from raytrainer.utilities import log
from raytrainer.utilities.exceptions import MisconfigurationException


class GradientAccumulationScheduler(Callback):
    """``scheduling={epoch: factor}``: from each listed epoch on, accumulate ``factor`` batches per optimizer step
    (epochs before the first key accumulate 1)."""

    def __init__(self, scheduling: dict[int, int]) -> None:
        if not scheduling:
            raise TypeError("GradientAccumulationScheduler(scheduling={}) is empty: give at least one "
                            "{epoch: factor} entry, e.g. {0: 1, 4: 2}.")
        if any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in scheduling):
            raise MisconfigurationException(
                f"GradientAccumulationScheduler: epochs (the keys) must be ints >= 0; got {list(scheduling)}.")
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in scheduling.values()):
            raise MisconfigurationException(
                "GradientAccumulationScheduler: accumulation factors (the values) must be ints >= 1; got "
                f"{list(scheduling.values())}.")
        if 0 not in scheduling:
            scheduling.update({0: 1})  # as Lightning: the caller's dict gains the epoch-0 default too
        self.scheduling = scheduling
        self.epochs = sorted(scheduling)
        self._set_value: int | None = None  # what this callback last wrote into the trainer

    def going_to_accumulate_grad_batches(self) -> bool:
        """Whether any epoch accumulates more than one batch."""
        return any(v > 1 for v in self.scheduling.values())

    def get_accumulate_grad_batches(self, epoch: int) -> int:
        """The factor in force at ``epoch``."""
        factor = 1
        for start in self.epochs:
            if epoch >= start:
                factor = self.scheduling[start]
        return factor

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        from raytrainer.module import LightningModule

        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "GradientAccumulationScheduler needs automatic optimization, which accumulates gradients for you; "
                "this module sets automatic_optimization = False. Remove the callback, or accumulate in your "
                "training_step.")
        if self.going_to_accumulate_grad_batches() and any(
                overrides(pl_module, LightningModule, name) for name in ("optimizer_step", "optimizer_zero_grad")):
            log.warning("GradientAccumulationScheduler with an overridden optimizer_step/optimizer_zero_grad: those "
                        "hooks run once per optimizer step, not once per batch.")
        # A value other than 1 that this callback did not write came from Trainer(accumulate_grad_batches=...).
        if trainer.accumulate_grad_batches != 1 and trainer.accumulate_grad_batches != self._set_value:
            raise ValueError(
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) and the "
                "GradientAccumulationScheduler callback both set the accumulation: remove accumulate_grad_batches "
                "from the Trainer or remove the callback.")

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._set_value = self.get_accumulate_grad_batches(trainer.current_epoch)
        trainer.accumulate_grad_batches = self._set_value
