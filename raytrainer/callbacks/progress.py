"""Progress bars. ``ProgressBar``: the base class (Lightning's counts and metrics, and the forwarding of rank 0's
events to the Ray driver that every bar shares). ``TQDMProgressBar``: Lightning's tqdm bar on a terminal, plain
lines in a log file."""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from numbers import Number
from typing import Any

from tqdm import tqdm

from raytrainer.callbacks.callback import Callback

# An event's metrics: the values themselves, or a function that reads them only when they are drawn or sent
# (reading them can wait for a device).
Metrics = dict[str, Any] | Callable[[], dict[str, Any]] | None


def _resolve(metrics: Metrics) -> dict[str, Any] | None:
    return metrics() if callable(metrics) else metrics


class ProgressBar(Callback):
    """Base class of progress bars: ``trainer.progress_bar_callback`` finds any subclass. A subclass overrides the
    hooks it draws in, plus ``enable``/``disable``; the counts and ``get_metrics`` below are Lightning's API."""

    # Where ``_emit`` sends events: None draws them here (``handle``); rank 0 of a Ray run sets a function that
    # sends them to the driver, which draws them on its own copy of the bar.
    sink: Callable[[dict[str, Any]], None] | None = None
    # rank 0 -> driver: advance counts are merged and sent at most once per this many seconds
    sink_interval_s: float = 0.2
    _pending = 0
    _pending_metrics: Metrics = None
    _sent_at = -math.inf

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
    def is_enabled(self) -> bool:
        return True

    @property
    def is_disabled(self) -> bool:
        return not self.is_enabled

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

    # -- events: the hooks of a bar turn into small dicts, drawn here or by the Ray driver --------------------
    def _emit(self, event: dict[str, Any]) -> None:
        """Draw ``event`` here, or send it to ``sink``: advance counts are merged and sent at most once per
        ``sink_interval_s`` with the metrics of their last event; counts not sent yet go before any other event,
        so the driver's totals are exact at every open and close. Sent events carry this process's clock
        (``t``), so the driver can show the rank's elapsed time and speed, not the messages' arrival times."""
        if not self.is_enabled:
            return
        sink = self.sink
        if sink is None:
            self.handle(event)
            return
        if event["kind"] == "advance":
            self._pending += event["n"]
            if event.get("metrics") is not None:
                self._pending_metrics = event["metrics"]
            if time.monotonic() - self._sent_at >= self.sink_interval_s:
                self._send_pending(sink)
            return
        self._send_pending(sink)
        sink({**event, "metrics": _resolve(event.get("metrics")), "t": time.monotonic()})

    def _send_pending(self, sink: Callable[[dict[str, Any]], None]) -> None:
        now = time.monotonic()
        if self._pending:
            sink({"kind": "advance", "n": self._pending, "metrics": _resolve(self._pending_metrics), "t": now})
        self._pending, self._pending_metrics, self._sent_at = 0, None, now

    def handle(self, event: dict[str, Any]) -> None:
        """Draw one event of ``_emit`` (in-process, or on the Ray driver for rank 0's bar); a subclass that draws
        in its hooks directly ignores them."""

    def close(self) -> None:
        """Close what the bar drew (the Ray driver calls it when the ranks stop)."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_trainer"] = None  # set again by setup() where the copy runs
        state.update(sink=None, _pending=0, _pending_metrics=None)
        return state


BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
_MIN_REDRAW_S = 0.1  # a terminal bar is redrawn at most 10 times a second
_WIDTH = 5           # floats and strings in the metrics take at least 5 characters, so the bar does not jitter


def _padded(value: Any) -> str:
    """tqdm's short number format, with floats padded to ``_WIDTH`` characters (Lightning's ``Tqdm.format_num``)."""
    text = value if isinstance(value, str) else tqdm.format_num(value)
    if not isinstance(value, (float, str)) or "e" in text:
        return text
    if "." not in text:
        try:
            float(text)
        except ValueError:
            return text
        if len(text) < _WIDTH:
            text += "."
    return text.ljust(_WIDTH, "0")


def _postfix_text(metrics: dict[str, Any]) -> str:
    """``key=value, ...`` as tqdm's ``set_postfix`` writes it, numbers through ``_padded``."""
    parts = []
    for key, value in metrics.items():
        if hasattr(value, "item") and not isinstance(value, (Number, str)):
            value = value.item()  # a tensor or numpy scalar
        parts.append(f"{key}={(_padded(value) if isinstance(value, Number) else str(value)).strip()}")
    return ", ".join(parts)


class _Null:
    """A stream that drops what is written: the counting tqdm of a log file bar writes here."""

    encoding = "utf-8"

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class _Bar(tqdm):
    """One bar. ``live`` (a terminal): drawn in place, at most every ``_MIN_REDRAW_S``. Otherwise (a log file):
    never redrawn; a plain line at 25, 50 and 75 % of a known total and one at the end (``quiet``: none)."""

    def __init__(self, desc: str, total: int | None, position: int, leave: bool, stream: Any, live: bool,
                 quiet: bool = False) -> None:
        self.out, self.live, self.quiet = stream, live, quiet
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        super().__init__(total=total, desc=desc, position=position, leave=leave, file=stream if live else _Null(),
                         dynamic_ncols=live, smoothing=0, bar_format=BAR_FORMAT, unit="it",
                         ascii=None if live else not encoding.startswith("utf"))
        self._restarted()

    def _restarted(self) -> None:
        self.drawn_n, self.drawn_t, self.quarter, self.written_n = 0, time.monotonic(), 1, -1
        self.origin: float | None = None  # the sender's clock when the bar (re)started: events from a Ray rank

    def sync(self, t: float | None) -> None:
        """Time the bar by the sender's clock (``t`` of a rank's event), not by when its messages arrived."""
        if t is not None and self.origin is not None:
            self.start_t = self._time() - (t - self.origin)

    def restart(self, desc: str, total: int | None) -> None:
        """Count again from 0 (the next epoch, or the next dataloader, on the same bar)."""
        if not self.live and self.n and self.written_n != self.n:
            self.write_line()  # a log file keeps the count the previous one reached
        self.total = total
        self.set_description(desc, refresh=False)
        self.reset()  # draws the empty bar on a terminal
        self._restarted()

    def start_at(self, n: int) -> None:
        """Count from ``n`` (an epoch resumed mid-way: the batches it already trained), as Lightning's bar shows the
        batch index; a log file's 25/50/75 % lines already passed are not written."""
        self.n = self.drawn_n = n
        while self.total and self.quarter < 4 and 4 * n >= self.quarter * self.total:
            self.quarter += 1

    def set_metrics(self, metrics: Metrics) -> None:
        values = _resolve(metrics)
        if values is not None:
            self.set_postfix_str(_postfix_text(values), refresh=False)

    def advance(self, n: int, metrics: Metrics, every: int) -> None:
        """Count ``n`` more; draw when due (``every``: batches between redraws on a terminal)."""
        self.n += n
        if self.live:
            now = time.monotonic()
            if self.n - self.drawn_n >= every and now - self.drawn_t >= _MIN_REDRAW_S:
                self.set_metrics(metrics)
                self.refresh()
                self.drawn_n, self.drawn_t = self.n, now
        elif self.total and self.quarter < 4 and 4 * self.n >= self.quarter * self.total and self.n < self.total:
            while 4 * self.n >= self.quarter * self.total:
                self.quarter += 1
            self.set_metrics(metrics)
            self.write_line()

    def finish(self, metrics: Metrics) -> None:
        """The stage's last count, with its metrics: drawn on a terminal, written as a line in a log file."""
        self.set_metrics(metrics)
        if self.live:
            self.refresh()
            self.drawn_n, self.drawn_t = self.n, time.monotonic()
        else:
            self.write_line()

    def show(self, metrics: Metrics) -> None:
        """New metrics (validation's, on the epoch's bar): drawn now on a terminal, on the next line in a log."""
        self.set_metrics(metrics)
        if self.live:
            self.refresh()

    def write_line(self) -> None:
        if not self.quiet:
            print(self.format_meter(**{**self.format_dict, "ncols": None}), file=self.out, flush=True)
            self.written_n = self.n

    def end(self) -> None:
        """Close; in a log file write the count reached unless a line already has it."""
        if not self.live and self.written_n != self.n:
            self.write_line()
        self.close()


class TQDMProgressBar(ProgressBar):
    """Lightning's tqdm bars on stderr. On a terminal: one training bar (``Epoch N``), reset each epoch and left on
    screen with its metrics when fit ends (``leave=True``: each epoch's bar stays), a validation bar on the line
    below it, cleared when validation ends, and a bar per validate/test/predict call. Elsewhere (a log file, Ray
    job logs): no redraws; one plain line per epoch with its metrics, plus one at 25, 50 and 75 % of an epoch
    whose length is known, and one line per validate/test/predict call. ``refresh_rate``: batches between
    redraws (0 disables the bar); ``process_position``: a program's bars start at line 2N."""

    BAR_FORMAT = BAR_FORMAT

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        super().__init__()
        if int(process_position) < 0:
            raise ValueError(f"TQDMProgressBar(process_position={process_position!r}): use an int >= 0 (the line "
                             "offset when several programs draw bars in one terminal).")
        if int(refresh_rate) < 0:
            raise ValueError(f"TQDMProgressBar(refresh_rate={refresh_rate!r}): use batches between redraws >= 0 "
                             "(0 disables the bar).")
        self._enabled = True
        self.refresh_rate = int(refresh_rate)
        self.process_position = int(process_position)
        self.leave = leave
        self._train_progress_bar: _Bar | None = None
        self._eval_progress_bar: _Bar | None = None
        self._eval_stage: str | None = None
        self._bar: _Bar | None = None  # the bar advance events move

    @property
    def is_enabled(self) -> bool:
        return self.__dict__.get("_enabled", True) and self.refresh_rate > 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def train_progress_bar(self) -> tqdm:
        if self._train_progress_bar is None:
            raise TypeError(f"{type(self).__name__} has no training bar now (one exists while fit trains).")
        return self._train_progress_bar

    def print(self, *args: Any, sep: str = " ", end: str = "\n", **kwargs: Any) -> None:
        """Print above a terminal's live bars (they are drawn again below); plain print elsewhere."""
        bar = self._bar or self._train_progress_bar
        if bar is not None and bar.live:
            bar.write(sep.join(map(str, args)), file=bar.out, end=end)
        else:
            print(*args, sep=sep, end=end, **kwargs)

    # -- drawing: the same events in-process and on the Ray driver ----------------------------------------------
    def _stream(self) -> Any:
        return sys.stderr

    def _new_bar(self, desc: str, total: int | None, position: int, leave: bool, quiet: bool = False) -> _Bar:
        stream = self._stream()
        live = bool(getattr(stream, "isatty", lambda: False)())
        return _Bar(desc, total, position, leave, stream, live, quiet)

    def handle(self, event: dict[str, Any]) -> None:
        """Draw one event: ``open`` (a stage's bar, or the next epoch), ``advance``, ``close`` (a stage's end, with
        its metrics), ``stop`` (the end of the call: close every bar)."""
        kind, t = event["kind"], event.get("t")
        if kind == "advance":
            if self._bar is not None:
                self._bar.sync(t)
            self.advance(event["n"], event.get("metrics"))
        elif kind == "open":
            self._open(event["stage"], event["desc"], event.get("total"), event.get("in_fit", False))
            if self._bar is not None:
                self._bar.origin = t
                if event.get("initial"):
                    self._bar.start_at(event["initial"])
        elif kind == "close":
            self._close_stage(event["stage"], event.get("metrics"), t)
        else:
            self.close()

    def advance(self, n: int, metrics: Metrics) -> None:
        """Count ``n`` more batches on the current bar (``metrics``: read only if it is drawn now)."""
        if self._bar is not None:
            self._bar.advance(n, metrics, max(self.refresh_rate, 1))

    def _open(self, stage: str, desc: str, total: int | None, in_fit: bool) -> None:
        base = 2 * self.process_position
        if stage == "train":
            bar = self._train_progress_bar
            if bar is not None and self.leave:  # leave=True: the finished epoch's bar stays, a new one below
                bar.end()
                bar = None
            if bar is None:
                bar = self._train_progress_bar = self._new_bar(desc, total, base, leave=True)
            else:
                bar.restart(desc, total)
            self._bar = bar
            return
        bar = self._eval_progress_bar
        if bar is not None and self._eval_stage == stage:
            bar.restart(desc, total)  # the next dataloader
        else:
            if bar is not None:
                bar.end()
            # inside fit: validation is drawn below the epoch's bar and cleared (in a log: no lines, its metrics are
            # on the epoch's line); a validate/test/predict call's bar stays
            bar = self._eval_progress_bar = self._new_bar(
                desc, total, base + (stage == "validate" and in_fit), leave=not in_fit, quiet=in_fit)
            self._eval_stage = stage
        self._bar = bar

    def _close_stage(self, stage: str, metrics: Metrics, t: float | None = None) -> None:
        train = self._train_progress_bar
        if stage == "train":
            if train is not None:
                train.sync(t)
                train.finish(metrics)
                if self.leave:
                    train.end()
                    self._train_progress_bar = None
            self._bar = None
            return
        if self._eval_progress_bar is not None:
            self._eval_progress_bar.sync(t)
            self._eval_progress_bar.end()
            self._eval_progress_bar = self._eval_stage = None
        if train is not None:
            train.show(metrics)  # validation's metrics on the epoch's bar
        self._bar = train

    def close(self) -> None:
        """Close every bar: on a terminal the training bar stays with its last count and metrics."""
        for bar in (self._eval_progress_bar, self._train_progress_bar):
            if bar is not None:
                bar.end()
        self._eval_progress_bar = self._train_progress_bar = self._bar = self._eval_stage = None

    # -- hooks (the ranks other than 0 are disabled) ------------------------------------------------------------
    def _metrics(self, trainer: Any) -> Callable[[], dict[str, Any]]:
        return lambda: self.get_metrics(trainer, trainer.lightning_module)

    @staticmethod
    def _resumed_batches(trainer: Any) -> int:
        """Batches of this epoch a mid-epoch resume already trained (the bar counts on from there, as Lightning's
        does); 0 for an elastic run, whose sampler re-splits what is left of the epoch."""
        session = trainer.session
        return 0 if session.elastic else session.state.resume_batch_idx(trainer.current_epoch)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.is_enabled:
            total = self.total_train_batches
            self._emit({"kind": "open", "stage": "train", "desc": f"Epoch {trainer.current_epoch}",
                        "total": None if not total or math.isinf(total) else int(total),
                        "initial": self._resumed_batches(trainer)})

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.is_enabled:
            self._emit({"kind": "advance", "n": 1, "metrics": self._metrics(trainer)})

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.is_enabled:
            self._emit({"kind": "close", "stage": "train", "metrics": self._metrics(trainer)})

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._emit({"kind": "stop"})

    def _eval_batch_start(self, trainer: Any, stage: str, desc: str, dataloader_idx: int) -> None:
        if not self.is_enabled or not self.has_dataloader_changed(dataloader_idx):
            return
        if trainer.sanity_checking:
            stage, desc = "sanity_check", self.sanity_check_description
        counts = trainer.session.eval_batch_counts
        total = counts[dataloader_idx] if dataloader_idx < len(counts) else 0
        self._emit({"kind": "open", "stage": stage, "desc": f"{desc} DataLoader {dataloader_idx}",
                    "total": total or None, "in_fit": trainer.state.fn == "fit"})

    def _eval_advance(self) -> None:
        self._emit({"kind": "advance", "n": 1})

    def _eval_end(self, trainer: Any, stage: str) -> None:
        self.reset_dataloader_idx_tracker()
        in_fit = trainer.state.fn == "fit" and not trainer.sanity_checking
        if self.is_enabled:
            self._emit({"kind": "close", "stage": stage, "metrics": self._metrics(trainer) if in_fit else None})

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._eval_batch_start(trainer, "validate", self.validation_description, dataloader_idx)

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        self._eval_advance()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._eval_end(trainer, "sanity_check" if trainer.sanity_checking else "validate")

    def on_test_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._eval_batch_start(trainer, "test", self.test_description, dataloader_idx)

    def on_test_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        self._eval_advance()

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._eval_end(trainer, "test")

    def on_predict_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        self._eval_batch_start(trainer, "predict", self.predict_description, dataloader_idx)

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        self._eval_advance()

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._eval_end(trainer, "predict")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.sink is None:
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(_train_progress_bar=None, _eval_progress_bar=None, _eval_stage=None, _bar=None)
        return state
