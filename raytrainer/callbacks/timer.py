"""Timer: stop fit after a wall-clock budget, counting the time of earlier (resumed) runs."""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from raytrainer.callbacks.callback import Callback
from raytrainer.utilities import log
from raytrainer.utilities.durations import parse_duration
from raytrainer.utilities.exceptions import MisconfigurationException
from raytrainer.utilities.states import RunningStage

_INTERVALS = ("step", "epoch")


class Timer(Callback):
    """Tracks the time of each stage and asks fit to stop once ``duration`` of training has passed.

    The elapsed training time is part of the state_dict, so a run resumed from a checkpoint (or a Ray snapshot)
    counts the time spent before it.
    """

    def __init__(self, duration: str | timedelta | dict[str, int] | None = None, interval: str = "step",
                 verbose: bool = True) -> None:
        if interval not in _INTERVALS:
            raise MisconfigurationException(
                f"Timer(interval={interval!r}) is not supported: use one of {', '.join(_INTERVALS)}.")
        self._duration = parse_duration("Timer: duration", duration)
        self._interval = interval
        self._verbose = verbose
        self._start_time: dict[RunningStage, float | None] = dict.fromkeys(RunningStage)
        self._end_time: dict[RunningStage, float | None] = dict.fromkeys(RunningStage)
        self._offset = 0.0

    # ------------------------------------------------------------------ queries
    def start_time(self, stage: str = RunningStage.TRAINING) -> float | None:
        """When ``stage`` last started (time.monotonic seconds), None before it ran."""
        return self._start_time[RunningStage(stage)]

    def end_time(self, stage: str = RunningStage.TRAINING) -> float | None:
        """When ``stage`` last ended (time.monotonic seconds), None while it runs or before it ran."""
        return self._end_time[RunningStage(stage)]

    def time_elapsed(self, stage: str = RunningStage.TRAINING) -> float:
        """Seconds ``stage`` ran; for training, plus what a resumed checkpoint had already counted."""
        stage = RunningStage(stage)
        offset = self._offset if stage == RunningStage.TRAINING else 0.0
        start, end = self._start_time[stage], self._end_time[stage]
        if start is None:
            return offset
        return (time.monotonic() if end is None else end) - start + offset

    def time_remaining(self, stage: str = RunningStage.TRAINING) -> float | None:
        """Seconds left of ``duration`` for ``stage``; None without a duration."""
        return None if self._duration is None else self._duration - self.time_elapsed(stage)

    # ------------------------------------------------------------------ hooks
    def _mark(self, stage: RunningStage, table: dict[RunningStage, float | None]) -> None:
        table[stage] = time.monotonic()
        if table is self._start_time:
            self._end_time[stage] = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._mark(RunningStage.TRAINING, self._start_time)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._mark(RunningStage.TRAINING, self._end_time)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._mark(RunningStage.VALIDATING, self._start_time)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._mark(RunningStage.VALIDATING, self._end_time)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._mark(RunningStage.TESTING, self._start_time)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._mark(RunningStage.TESTING, self._end_time)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._duration is not None:
            self._check(trainer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._interval == "step" and self._duration is not None:
            self._check(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._interval == "epoch" and self._duration is not None:
            self._check(trainer)

    def _check(self, trainer: Any) -> None:
        """Stop when the budget is spent; rank 0's clock decides for every rank, so all stop at the same step."""
        assert self._duration is not None
        stop = self.time_elapsed() >= self._duration
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None and getattr(strategy, "distributed", False):
            stop = bool(strategy.broadcast(stop))
        trainer.should_stop = trainer.should_stop or stop
        if stop and self._verbose and trainer.is_global_zero:
            log.info("Time limit reached. Elapsed time is %s. Signaling Trainer to stop.",
                     timedelta(seconds=int(self.time_elapsed())))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"time_elapsed": {stage.value: self.time_elapsed(stage) for stage in RunningStage}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run counts on from the training time the checkpoint recorded."""
        self._offset = float(state_dict.get("time_elapsed", {}).get(RunningStage.TRAINING.value, 0.0))
        # the clock of an earlier call of this object no longer counts: the offset already holds it
        self._start_time[RunningStage.TRAINING] = self._end_time[RunningStage.TRAINING] = None
