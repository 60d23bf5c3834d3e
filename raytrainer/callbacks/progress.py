"""Progress bar (tqdm): epoch, step, speed and the prog_bar metrics, redrawn at most ~10 times a second."""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from raytrainer.callbacks.callback import Callback


class ProgressBar(Callback):
    """Base class of progress bars: ``trainer.progress_bar_callback`` finds any subclass. A subclass overrides the
    hooks it draws in, plus ``enable``/``disable``; the counts and ``get_metrics`` below are Lightning's API."""

    def __init__(self) -> None:
        self._trainer: Any = None
        self._current_eval_dataloader_idx: int | None = None

    @property
    def trainer(self) -> Any:
        if self._trainer is None:
            raise TypeError(f"{type(self).__name__}.trainer is not set yet: it is set in setup(), when a Trainer "
                            "call starts.")
        return self._trainer

    sanity_check_description = property(lambda self: "Sanity Checking")
    train_description = property(lambda self: "Training")
    validation_description = property(lambda self: "Validation")
    test_description = property(lambda self: "Testing")
    predict_description = property(lambda self: "Predicting")

    @property
    def total_train_batches(self) -> int | float:
        """Training batches this epoch (inf for a loader without a length); capped by the steps left when
        max_epochs=-1 and max_steps is set."""
        t = self.trainer
        n = t.num_training_batches
        if t.max_epochs == -1 and t.max_steps is not None and t.max_steps > 0:
            return min(n, t.max_steps - t.global_step)
        return n

    @property
    def train_batch_idx(self) -> int:
        """Training batches done in the current epoch."""
        return self.trainer.session.state.batches_done_in_epoch

    def _current(self, batches: list[int | float] | int | float) -> int | float:
        if isinstance(batches, list):
            return batches[self._current_eval_dataloader_idx or 0] if batches else 0
        return batches

    @property
    def total_val_batches_current_dataloader(self) -> int | float:
        t = self.trainer
        return self._current(t.num_sanity_val_batches if t.sanity_checking else t.num_val_batches)

    @property
    def total_test_batches_current_dataloader(self) -> int | float:
        return self._current(self.trainer.num_test_batches)

    @property
    def total_predict_batches_current_dataloader(self) -> int | float:
        return self._current(self.trainer.num_predict_batches)

    @property
    def total_val_batches(self) -> int | float:
        """Validation batches of the current training epoch (0 when it does not validate)."""
        t = self.trainer
        if not t.session.should_validate_epoch(t.current_epoch):
            return 0
        return sum(t.num_val_batches)

    def has_dataloader_changed(self, dataloader_idx: int) -> bool:
        """Record ``dataloader_idx`` as current; True when it differs from the previous one."""
        old, self._current_eval_dataloader_idx = self._current_eval_dataloader_idx, dataloader_idx
        return old != dataloader_idx

    def reset_dataloader_idx_tracker(self) -> None:
        self._current_eval_dataloader_idx = None

    def disable(self) -> None:
        """Stop drawing (ranks other than 0 call it in setup)."""
        raise NotImplementedError(f"{type(self).__name__} must implement disable().")

    def enable(self) -> None:
        """Draw again after disable()."""
        raise NotImplementedError(f"{type(self).__name__} must implement enable().")

    def print(self, *args: Any, **kwargs: Any) -> None:
        print(*args, **kwargs)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer
        if not trainer.is_global_zero:
            self.disable()

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        """What the bar shows: the logger's version as ``v_num`` and the values logged with prog_bar=True."""
        items: dict[str, Any] = {}
        versions = [lg.version for lg in trainer.loggers if getattr(lg, "version", None) not in (None, "")]
        if versions:
            version = versions[0] if len(set(map(str, versions))) == 1 else "_".join(map(str, versions))
            items["v_num"] = version[-4:] if isinstance(version, str) else version
        return {**items, **trainer.progress_bar_metrics}

    # Ray: the driver forwards rank 0's bar events to its own bar; a bar that draws on the ranks ignores them.
    def handle(self, event: dict[str, Any]) -> None:
        """Draw an event that rank 0's bar sent to the Ray driver (none for a bar that draws on the ranks)."""

    def close(self) -> None:
        """Close what the bar drew."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_trainer"] = None  # set again by setup() where the copy runs
        return state


class TQDMProgressBar(ProgressBar):
    """One bar per stage. Metrics become floats only when tqdm redraws, never per step."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        super().__init__()
        if int(process_position) < 0:
            raise ValueError(f"TQDMProgressBar(process_position={process_position!r}): use an int >= 0 (the line "
                             "offset when several programs draw bars in one terminal).")
        self._enabled = True
        self.refresh_rate = max(int(refresh_rate), 1)
        self.process_position = int(process_position)
        self.leave = leave
        self._bar: Any = None
        self._drawn_at = -1.0
        # Where events go: None draws locally; a callable sends them elsewhere (the Ray driver).
        self.sink: Callable[[dict[str, Any]], None] | None = None
        self._sink_every = 0.2
        self._last_sent = 0.0

    # -- drawing (also used by the Ray driver to draw events sent by rank 0) ---------------------
    def open(self, desc: str, total: int | None) -> None:
        from tqdm.auto import tqdm

        self.close()
        # as Lightning: a program's bars start at line 2 * process_position (its main bar; the next line is its
        # validation bar), so programs given different positions do not draw over each other
        position = 2 * self.process_position + (desc.startswith("Validation") and self.process_position > 0)
        self._bar = tqdm(total=total, desc=desc, leave=self.leave, dynamic_ncols=True, file=sys.stderr,
                         mininterval=0.1, smoothing=0.1, unit="it", position=position or None)
        self._drawn_at = -1.0

    def advance(self, n: int, metrics: Callable[[], dict[str, float]] | dict[str, float] | None) -> None:
        bar = self._bar
        if bar is None:
            return
        bar.update(n)
        if bar.last_print_t != self._drawn_at:  # tqdm just redrew: refresh the metrics shown
            self._drawn_at = bar.last_print_t
            values = metrics() if callable(metrics) else metrics
            if values:
                bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def handle(self, event: dict[str, Any]) -> None:
        """Draw one event produced by ``_emit`` (used on the Ray driver)."""
        kind = event["kind"]
        if kind == "open":
            self.open(event["desc"], event["total"])
        elif kind == "advance":
            self.advance(event["n"], event.get("metrics"))
        else:
            self.close()

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _emit(self, event: dict[str, Any], trainer: Any) -> None:
        if not self.__dict__.get("_enabled", True):
            return
        if self.sink is None:
            self.handle(event) if event["kind"] != "advance" else self.advance(
                event["n"], lambda: trainer.progress_bar_metrics)
            return
        if event["kind"] == "advance":
            import time

            self._pending = getattr(self, "_pending", 0) + event["n"]
            now = time.monotonic()
            if now - self._last_sent < self._sink_every:
                return
            self._last_sent = now
            event = {"kind": "advance", "n": self._pending, "metrics": trainer.progress_bar_metrics}
            self._pending = 0
        self.sink(event)

    # -- hooks ------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero:
            self._emit({"kind": "open", "desc": f"Epoch {trainer.current_epoch}",
                        "total": trainer.num_training_batches or None}, trainer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.is_global_zero:
            self._emit({"kind": "advance", "n": 1}, trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero:
            self._emit({"kind": "close"}, trainer)

    def _eval_open(self, trainer: Any, name: str) -> None:
        if trainer.is_global_zero and not trainer.training:
            self._emit({"kind": "open", "desc": name, "total": sum(trainer.session.eval_batch_counts) or None}, trainer)

    def _eval_advance(self, trainer: Any) -> None:
        if trainer.is_global_zero and not trainer.training:
            self._emit({"kind": "advance", "n": 1}, trainer)

    def _eval_close(self, trainer: Any) -> None:
        if trainer.is_global_zero and not trainer.training:
            self._emit({"kind": "close"}, trainer)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_open(trainer, "Validation")

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        self._eval_advance(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._eval_close(trainer)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_open(trainer, "Testing")

    def on_test_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        self._eval_advance(trainer)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._eval_close(trainer)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_open(trainer, "Predicting")

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        self._eval_advance(trainer)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._eval_close(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_bar"] = None
        state["sink"] = None
        return state
