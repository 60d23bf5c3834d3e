"""RichProgressBar: Lightning's rich progress bar. Rank 0 turns hooks into small events; they are drawn where the
bar lives (in-process) or sent to the Ray driver, which draws them on its own copy of the bar."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from raytrainer.callbacks.progress import ProgressBar


@dataclass
class RichProgressBarTheme:
    """Styles (rich style strings) of the bar's parts, and how metrics are written (Lightning's fields)."""

    description: Any = ""
    progress_bar: Any = "#6206E0"
    progress_bar_finished: Any = "#6206E0"
    progress_bar_pulse: Any = "#6206E0"
    batch_progress: Any = ""
    time: Any = "dim"
    processing_speed: Any = "dim underline"
    metrics: Any = "italic"
    metrics_text_delimiter: str = " "
    metrics_format: str = ".3f"


def _hms(seconds: float | None) -> str:
    return "-:--:--" if seconds is None else str(timedelta(seconds=int(seconds)))


def _columns(theme: RichProgressBarTheme) -> list[Any]:
    """Description, bar, done/total, elapsed • remaining, speed (the metrics column is added after these)."""
    from rich.progress import BarColumn, ProgressColumn, TextColumn
    from rich.text import Text

    class Count(ProgressColumn):
        def render(self, task: Any) -> Text:
            total = "--" if task.total is None or math.isinf(task.total) else int(task.total)
            return Text(f"{int(task.completed)}/{total}", style=theme.batch_progress)

    class Clock(ProgressColumn):
        max_refresh = 0.5

        def render(self, task: Any) -> Text:
            elapsed = task.finished_time if task.finished else task.elapsed
            return Text(f"{_hms(elapsed)} • {_hms(task.time_remaining)}", style=theme.time)

    class Speed(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed or 0.0:.2f}it/s", style=theme.processing_speed)

    return [TextColumn("{task.description}", style=theme.description),
            BarColumn(complete_style=theme.progress_bar, finished_style=theme.progress_bar_finished,
                      pulse_style=theme.progress_bar_pulse),
            Count(), Clock(), Speed()]


class RichProgressBar(ProgressBar):
    """A rich bar per stage: training epochs (with the progress-bar metrics), sanity check, validation, test,
    predict. ``refresh_rate``: redraws per second (0 disables the bar); ``leave``: keep each finished epoch's bar
    on screen; ``console_kwargs``: arguments of the ``rich.console.Console`` it draws on."""

    def __init__(self, refresh_rate: int = 100, leave: bool = False,
                 theme: RichProgressBarTheme | None = None, console_kwargs: dict[str, Any] | None = None) -> None:
        try:
            import rich  # noqa: F401
        except ImportError as exc:  # pragma: no cover - rich is a dependency
            raise ModuleNotFoundError("RichProgressBar needs `rich`: pip install rich.") from exc
        if refresh_rate < 0:
            raise ValueError(f"RichProgressBar(refresh_rate={refresh_rate}): use redraws per second >= 0 "
                             "(0 disables the bar).")
        super().__init__()
        self._refresh_rate = refresh_rate
        self._leave = leave
        self.theme = theme if theme is not None else RichProgressBarTheme()
        self._console_kwargs = dict(console_kwargs or {})
        self._enabled = True
        self._console: Any = None
        self.progress: Any = None
        self._reset_ids()
        self._current: Any = None                  # the task that advance events move
        self._metrics_text = ""
        self._metrics_at = -math.inf

    # ------------------------------------------------------------------ Lightning's attributes
    @property
    def refresh_rate(self) -> float:
        return self._refresh_rate

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self._refresh_rate > 0

    @property
    def sink_interval_s(self) -> float:
        """rank 0 -> Ray driver: merged advance counts at most refresh_rate (<= 10) times a second."""
        return 1.0 / min(max(self._refresh_rate, 1), 10)

    @property
    def is_disabled(self) -> bool:
        return not self.is_enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _reset_ids(self) -> None:
        self.train_progress_bar_id: Any = None
        self.val_sanity_progress_bar_id: Any = None
        self.val_progress_bar_id: Any = None
        self.test_progress_bar_id: Any = None
        self.predict_progress_bar_id: Any = None

    def configure_columns(self, trainer: Any) -> list[Any]:
        """The columns before the metrics; override to change them (``trainer`` is None on a Ray driver)."""
        return _columns(self.theme)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """Print above the live bars (plain print when none is drawn)."""
        if self._console is not None:
            self._console.print(*args, **kwargs)
        else:
            print(*args, **kwargs)

    # ------------------------------------------------------------------ drawing (where the bar is shown)
    def _ensure_progress(self) -> Any:
        if self.progress is None:
            from rich.console import Console
            from rich.progress import Progress, TextColumn

            if self._console is None:
                self._console = Console(**self._console_kwargs)
            self._reset_ids()
            self.progress = Progress(*self.configure_columns(self._trainer),
                                     TextColumn("{task.fields[metrics]}", style=self.theme.metrics),
                                     console=self._console, auto_refresh=True,
                                     refresh_per_second=min(max(self._refresh_rate, 1), 10))
            self.progress.start()
        return self.progress

    def _stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()  # leaves the last drawing on screen (on a non-terminal console: prints it once)
            self.progress = None
            self._current = None

    def handle(self, event: dict[str, Any]) -> None:
        """Draw one event (the same events in-process and on the Ray driver)."""
        kind = event["kind"]
        if kind == "stop":
            self._stop()
            return
        if kind == "metrics":
            self._set_metrics(event["metrics"])
            return
        if kind == "advance":
            if self.progress is not None and self._current is not None:
                self.progress.update(self._current, advance=event["n"])
            if event.get("metrics") is not None:
                self._set_metrics(event["metrics"])
            return
        if kind == "open":
            self._open(event["stage"], event["desc"], event["total"])
        elif kind == "close" and self.progress is not None:
            stage = event["stage"]
            if event.get("metrics") is not None:
                self._set_metrics(event["metrics"])
            if stage in ("sanity_check", "validate") and event.get("hide", True):
                task = self.val_sanity_progress_bar_id if stage == "sanity_check" else self.val_progress_bar_id
                if task is not None:
                    self.progress.update(task, visible=False)
            self._current = self.train_progress_bar_id if stage != "train" else None

    def _open(self, stage: str, desc: str, total: float | None) -> None:
        if stage == "train" and self._leave and self.train_progress_bar_id is not None:
            self._stop()  # the finished epoch's bar stays on screen; the next epoch gets a new one below it
        progress = self._ensure_progress()
        total = None if total is None or math.isinf(total) else total
        attr = {"train": "train_progress_bar_id", "sanity_check": "val_sanity_progress_bar_id",
                "validate": "val_progress_bar_id", "test": "test_progress_bar_id",
                "predict": "predict_progress_bar_id"}[stage]
        task = getattr(self, attr)
        if task is None:
            task = progress.add_task(desc, total=total, metrics="")
            setattr(self, attr, task)
        else:
            progress.reset(task, total=total, description=desc, visible=True)
        self._current = task

    def _set_metrics(self, metrics: dict[str, Any]) -> None:
        theme = self.theme
        parts = []
        for name, value in metrics.items():
            if not isinstance(value, str):
                try:
                    value = f"{value:{theme.metrics_format}}"
                except (TypeError, ValueError):
                    value = str(value)
            parts.append(f"{name}: {value}")
        self._metrics_text = theme.metrics_text_delimiter.join(parts)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, metrics=self._metrics_text)

    def close(self) -> None:
        """Stop drawing (the Ray launcher calls it when the run ends)."""
        self._stop()

    # ------------------------------------------------------------------ events from the hooks (rank 0)
    def _shown_metrics(self, trainer: Any) -> dict[str, Any]:
        import torch

        return {k: v.item() if isinstance(v, torch.Tensor) else v
                for k, v in self.get_metrics(trainer, trainer.lightning_module).items()}

    def _train_metrics_due(self, trainer: Any) -> dict[str, Any] | None:
        """The shown metrics, read at most refresh_rate (<= 10) times a second (reading them can sync a device)."""
        now = time.monotonic()
        if now - self._metrics_at < 1.0 / min(max(self._refresh_rate, 1), 10):
            return None
        self._metrics_at = now
        return self._shown_metrics(trainer)

    def _train_description(self, trainer: Any) -> str:
        desc = f"Epoch {trainer.current_epoch}"
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            desc += f"/{trainer.max_epochs - 1}"
        return f"{desc:{len(self.validation_description)}}"  # as wide as "Validation": no jitter between them

    def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero:
            total = sum(trainer.num_sanity_val_batches) if trainer.num_sanity_val_batches else None
            self._emit({"kind": "open", "stage": "sanity_check", "desc": self.sanity_check_description,
                        "total": total})

    def on_sanity_check_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero:
            self._emit({"kind": "close", "stage": "sanity_check"})

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero:
            total = self.total_train_batches
            self._emit({"kind": "open", "stage": "train", "desc": self._train_description(trainer),
                        "total": None if total is None or math.isinf(total) else int(total)})

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.is_global_zero and self.is_enabled:
            self._emit({"kind": "advance", "n": 1, "metrics": self._train_metrics_due(trainer)})

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero:
            self._emit({"kind": "close", "stage": "train", "metrics": self._shown_metrics(trainer)})

    def _eval_open(self, trainer: Any, stage: str, desc: str) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            total = sum(trainer.session.eval_batch_counts) or None
            self._emit({"kind": "open", "stage": stage, "desc": desc, "total": total})

    def _eval_advance(self, trainer: Any) -> None:
        if trainer.is_global_zero and self.is_enabled:
            self._emit({"kind": "advance", "n": 1})

    def _eval_end(self, trainer: Any, stage: str) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        if trainer.state.fn == "fit":  # validation inside fit: hide its bar, show its metrics on the epoch's bar
            self._emit({"kind": "close", "stage": stage, "metrics": self._shown_metrics(trainer)})
        else:  # a validate/test/predict call: its bar stays, drawing ends
            self._emit({"kind": "close", "stage": stage, "hide": False})
            self._emit({"kind": "stop"})

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_open(trainer, "validate", self.validation_description)

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        self._eval_advance(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._eval_end(trainer, "validate")

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_open(trainer, "test", self.test_description)

    def on_test_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        self._eval_advance(trainer)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._eval_end(trainer, "test")

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_open(trainer, "predict", self.predict_description)

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        self._eval_advance(trainer)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._eval_end(trainer, "predict")

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if trainer.is_global_zero:
            self._emit({"kind": "stop"})

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._stop()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(progress=None, _console=None, _current=None)
        return state
