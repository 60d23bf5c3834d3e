"""ThroughputMonitor: batches, samples, items and FLOPs per second over a rolling window, logged per stage."""
from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from raytrainer.callbacks.callback import Callback, logs_at
from raytrainer.utilities.states import FN_STAGE, RunningStage, TrainerFn


class _Rising(deque):
    """A bounded window of running totals that must never go down (a wrong counter fails loudly, not silently)."""

    def append(self, value: Any) -> None:
        if self and value < self[-1]:
            raise ValueError(f"Throughput totals must not decrease: got {value} after {self[-1]}. Pass running "
                             "totals (time since start, batches so far), not per-batch values.")
        super().append(value)


class Throughput:
    """Rolling throughput from running totals. ``compute()`` returns ``time``/``batches``/``samples``(/``lengths``)
    always, and the per-second rates (``device<sep>...`` per device; world totals when ``world_size > 1``) once
    ``window_size`` updates are in the window."""

    def __init__(self, available_flops: float | None = None, world_size: int = 1, window_size: int = 100,
                 separator: str = "/") -> None:
        if world_size < 1:
            raise ValueError(f"Throughput(world_size={world_size}): needs at least 1 device.")
        if window_size < 2:
            raise ValueError(f"Throughput(window_size={window_size}): rates need at least 2 updates in the window; "
                             "use window_size >= 2.")
        self.available_flops, self.world_size, self.separator = available_flops, world_size, separator
        self._time: _Rising = _Rising(maxlen=window_size)
        self._batches: _Rising = _Rising(maxlen=window_size)
        self._samples: _Rising = _Rising(maxlen=window_size)
        self._lengths: _Rising = _Rising(maxlen=window_size)
        self._flops: deque[float] = deque(maxlen=window_size)

    def update(self, *, time: float, batches: int, samples: int, lengths: int | None = None,
               flops: float | None = None) -> None:
        """Add running totals for this device: seconds since start, batches, samples, items; ``flops`` of the
        latest batch."""
        if samples < batches:
            raise ValueError(f"Throughput.update: samples ({samples}) < batches ({batches}); a batch holds at least "
                             "one sample, so check batch_size_fn.")
        if lengths is not None and lengths < samples:
            raise ValueError(f"Throughput.update: lengths ({lengths}) < samples ({samples}); a sample holds at "
                             "least one item, so check length_fn.")
        self._time.append(time)
        self._batches.append(batches)
        self._samples.append(samples)
        if lengths is not None:
            self._lengths.append(lengths)
            if len(self._lengths) != len(self._samples):
                raise RuntimeError("Throughput.update: pass `lengths` on every update or on none.")
        if flops is not None:
            self._flops.append(flops * self.world_size)

    def compute(self) -> dict[str, float]:
        """The totals and, with a full window, the rates (see the class docstring)."""
        sep, world = self.separator, self.world_size
        out: dict[str, float] = {"time": self._time[-1], "batches": self._batches[-1], "samples": self._samples[-1]}
        if self._lengths:
            out["lengths"] = self._lengths[-1]
        window_full = len(self._time) == self._time.maxlen
        span = self._time[-1] - self._time[0] if window_full else 0.0
        if window_full and span > 0:
            per_dev = {"batches_per_sec": (self._batches[-1] - self._batches[0]) / span,
                       "samples_per_sec": (self._samples[-1] - self._samples[0]) / span}
            if len(self._lengths) == self._lengths.maxlen:
                per_dev["items_per_sec"] = (self._lengths[-1] - self._lengths[0]) / span
            for k, v in per_dev.items():
                out[f"device{sep}{k}"] = v
                if world > 1:
                    out[k] = v * world
        if len(self._flops) == self._flops.maxlen and len(self._time) >= 2 and self._time[-1] > self._time[0]:
            # the FLOPs done between the window's first and last timestamps, summed over devices
            flops_per_sec = (sum(self._flops) - self._flops[0]) / (self._time[-1] - self._time[0])
            if world > 1:
                out["flops_per_sec"] = flops_per_sec
            out[f"device{sep}flops_per_sec"] = flops_per_sec / world
            if self.available_flops:
                out[f"device{sep}mfu"] = flops_per_sec / world / self.available_flops
        return out

    def reset(self) -> None:
        for window in (self._time, self._batches, self._samples, self._lengths, self._flops):
            window.clear()


class ThroughputMonitor(Callback):
    """Logs ``<stage><sep><metric>`` (``train/time``, ``train/device/samples_per_sec``, ``validate/batches``...)
    on global rank 0 after each training step (once gradient accumulation ends) and each evaluation batch.
    ``batch_size_fn(batch)`` gives a batch's samples, ``length_fn(batch)`` its items (e.g. tokens). A module with a
    ``flops_per_batch`` attribute adds FLOPs rates. Validation time inside fit is not counted as training time."""

    def __init__(self, batch_size_fn: Callable[[Any], int], length_fn: Callable[[Any], int] | None = None,
                 window_size: int = 100, separator: str = "/", available_flops: float | None = None) -> None:
        if not callable(batch_size_fn):
            raise TypeError("ThroughputMonitor(batch_size_fn=...) must be a function of a batch returning its "
                            f"sample count, e.g. lambda batch: batch[0].size(0); got {batch_size_fn!r}.")
        if length_fn is not None and not callable(length_fn):
            raise TypeError(f"ThroughputMonitor(length_fn=...) must be a function of a batch or None; got "
                            f"{length_fn!r}.")
        Throughput(window_size=window_size)  # validates window_size now, not at the first batch
        self.batch_size_fn, self.length_fn = batch_size_fn, length_fn
        self.window_size, self.separator, self.available_flops = window_size, separator, available_flops
        self._throughputs: dict[str, Throughput] = {}
        self._t0: dict[str, float] = {}
        self._samples: dict[str, int] = {}
        self._batches: dict[str, int] = {}
        self._lengths: dict[str, int] = {}
        self._run_ready = 0                       # evaluation batches of the current run: Lightning's log step
        self._has_flops: bool | None = None

    def _new(self, trainer: Any) -> Throughput:
        return Throughput(self.available_flops, max(int(trainer.world_size or 1), 1), self.window_size,
                          self.separator)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        fn = TrainerFn.from_str(stage)
        if fn == TrainerFn.FITTING:  # fit validates inside it
            self._throughputs[RunningStage.VALIDATING.value] = self._new(trainer)
        self._throughputs[FN_STAGE[fn].value] = self._new(trainer)

    # ------------------------------------------------------------------ measuring
    def _start(self, trainer: Any, stage: str) -> None:
        if trainer.state.fn == TrainerFn.FITTING or stage not in self._samples:
            self._throughputs[stage].reset()
            self._samples[stage] = self._batches[stage] = self._lengths[stage] = 0
        self._t0[stage] = time.perf_counter()

    def _update(self, trainer: Any, pl_module: Any, batch: Any, stage: str) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the step's kernels must be done before the clock is read
        elapsed = time.perf_counter() - self._t0[stage]
        with torch.inference_mode():  # a batch_size_fn/length_fn that touches tensors records no graph
            if self.length_fn is not None:
                self._lengths[stage] += int(self.length_fn(batch))
            self._samples[stage] += int(self.batch_size_fn(batch))
        self._batches[stage] += 1
        if self._has_flops is None:
            self._has_flops = hasattr(pl_module, "flops_per_batch")
            if not self._has_flops:
                warnings.warn(f"ThroughputMonitor: {type(pl_module).__name__} has no `flops_per_batch` attribute, "
                              "so no FLOPs rates are logged. Set it (e.g. with torch.utils.flop_counter) to get "
                              "them.", stacklevel=2)
        self._throughputs[stage].update(
            time=elapsed, batches=self._batches[stage], samples=self._samples[stage],
            lengths=self._lengths[stage] if self.length_fn is not None else None,
            flops=pl_module.flops_per_batch if self._has_flops else None)

    def _log(self, trainer: Any, stage: str, count: int, step: int, epoch: int | None) -> None:
        if not logs_at(trainer, count):
            return
        tp = self._throughputs[stage]
        metrics = {f"{stage}{tp.separator}{k}": v for k, v in tp.compute().items()}  # counts stay ints
        trainer.session.send_to_loggers(metrics, step, epoch)

    # ------------------------------------------------------------------ training
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero:
            self._start(trainer, RunningStage.TRAINING.value)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        stage = RunningStage.TRAINING.value
        self._update(trainer, pl_module, batch, stage)
        n = trainer.num_training_batches
        last = isinstance(n, int) and batch_idx + 1 >= n
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or last:  # measured with the optimizer step
            state = trainer.session.state
            # the loggers' step before this batch's optimizer step, as Lightning logs it
            step = state.batches_that_stepped - (1 if state.stepped_since_log else 0)
            self._log(trainer, stage, step + 1, step, trainer.current_epoch)

    # ------------------------------------------------------------------ evaluation
    def _eval_start(self, trainer: Any, stage: str) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self._run_ready = 0
            self._start(trainer, stage)

    def _eval_batch(self, trainer: Any, pl_module: Any, batch: Any, stage: str) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        self._run_ready += 1
        self._update(trainer, pl_module, batch, stage)
        self._log(trainer, stage, self._run_ready, self._run_ready, None)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_start(trainer, RunningStage.VALIDATING.value)

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._eval_batch(trainer, pl_module, batch, RunningStage.VALIDATING.value)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        train, val = RunningStage.TRAINING.value, RunningStage.VALIDATING.value
        if train not in self._t0:
            return
        train_time = self._throughputs[train]._time
        val_time = self._throughputs[val]._time
        # move the training clock's origin past the validation run (and the gap before it)
        train_done = self._t0[train] + (train_time[-1] if train_time else 0.0)
        self._t0[train] += (self._t0[val] - train_done) + (val_time[-1] if val_time else 0.0)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_start(trainer, RunningStage.TESTING.value)

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self._eval_batch(trainer, pl_module, batch, RunningStage.TESTING.value)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_start(trainer, RunningStage.PREDICTING.value)

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        self._eval_batch(trainer, pl_module, batch, RunningStage.PREDICTING.value)
