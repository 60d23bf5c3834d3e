"""Progress bar (tqdm): epoch, step, speed and the prog_bar metrics, redrawn at most ~10 times a second."""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from raytrainer.callbacks.callback import Callback


class TQDMProgressBar(Callback):
    """One bar per stage. Metrics become floats only when tqdm redraws, never per step."""

    def __init__(self, refresh_rate: int = 1, leave: bool = False) -> None:
        self.refresh_rate = max(int(refresh_rate), 1)
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
        self._bar = tqdm(total=total, desc=desc, leave=self.leave, dynamic_ncols=True, file=sys.stderr,
                         mininterval=0.1, smoothing=0.1, unit="it")
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

    def _emit(self, event: dict[str, Any], trainer: Any) -> None:
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
        state = self.__dict__.copy()
        state["_bar"] = None
        state["sink"] = None
        return state
