"""The learning-rate range test (Lightning's ``lr_find``) and the ``LearningRateFinder`` callback.

The search trains ``num_training`` optimizer steps in a private trial Trainer, raising the learning rate from
``min_lr`` to ``max_lr`` (exponentially or linearly) and recording the smoothed loss after each step; it stops
early when the loss diverges. The schedule, the smoothing and the suggestion follow Lightning's, so the same
model, data and seed give the same learning rates, losses and suggestion. The module is put back as it was.

On Ray it runs where Lightning runs it, on every DDP rank: the Tuner's trial is a Ray run of its own, whose rank 0
sends its losses back with its callback state; the callback's search runs inside the running fit on each rank.
Every rank takes rank 0's losses and early stop (as Lightning broadcasts them), so all set the same learning rate.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from raytrainer.callbacks._tuning import (
    ModuleSnapshot,
    fit_trial,
    has_attr,
    isolated_rng,
    no_lifecycle_hooks,
    refuse_sharded,
    set_attr,
    trial_trainer,
)
from raytrainer.callbacks.callback import Callback
from raytrainer.utilities import log
from raytrainer.utilities.exceptions import MisconfigurationException

MODES = ("exponential", "linear")


class LRFinderResult:
    """What ``lr_find`` found: ``results`` ({"lr": [...], "loss": [...]}, one entry per optimizer step),
    ``suggestion()`` and ``plot()``."""

    def __init__(self, mode: str, lr_min: float, lr_max: float, num_training: int) -> None:
        self.mode, self.lr_min, self.lr_max, self.num_training = mode, lr_min, lr_max, num_training
        self.results: dict[str, list[float]] = {"lr": [], "loss": []}
        self._optimal_idx: int | None = None
        self.applied: tuple[str, float] | None = None  # (attribute, learning rate) set on the module, if any

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "lr_min": self.lr_min, "lr_max": self.lr_max, "num_training": self.num_training,
                "results": self.results, "applied": self.applied}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LRFinderResult:
        result = cls(saved["mode"], saved["lr_min"], saved["lr_max"], saved["num_training"])
        result.results, result.applied = saved["results"], saved.get("applied")
        return result

    def suggestion(self, skip_begin: int = 10, skip_end: int = 1) -> float | None:
        """The learning rate where the smoothed loss falls fastest (the most negative gradient of loss over lr),
        ignoring the first ``skip_begin`` and last ``skip_end`` points and non-finite losses; None (with an error
        in the log) when fewer than 2 points remain."""
        n = len(self.results["loss"])
        idx = list(range(n))[skip_begin:n - skip_end if skip_end else n]
        losses = torch.tensor([self.results["loss"][i] for i in idx], dtype=torch.float32)
        lrs = torch.tensor([self.results["lr"][i] for i in idx], dtype=torch.float32)
        finite = torch.isfinite(losses)
        losses, lrs = losses[finite], lrs[finite]
        if len(losses) < 2:
            log.error("lr_find: too few points (%d after skipping %d at the start, %d at the end and non-finite "
                      "losses) to suggest a learning rate; raise num_training or give more training batches.",
                      len(losses), skip_begin, skip_end)
            self._optimal_idx = None
            return None
        gradients = torch.gradient(losses, spacing=[lrs])[0]
        kept = [i for i, ok in zip(idx, finite.tolist()) if ok]
        self._optimal_idx = kept[int(torch.argmin(gradients))]
        return self.results["lr"][self._optimal_idx]

    def plot(self, suggest: bool = False, show: bool = False, ax: Any = None) -> Any:
        """Loss over learning rate with matplotlib (log x axis in exponential mode), the suggestion marked in red
        when ``suggest``; returns the figure. Shows it with ``show``; draws into ``ax`` when given."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise ImportError("LRFinderResult.plot needs matplotlib, which is not installed: "
                              "`pip install matplotlib`.") from err
        if ax is None:
            fig, ax = plt.subplots()
        else:
            fig = ax.figure
        lrs, losses = self.results["lr"], self.results["loss"]
        ax.plot(lrs, losses)
        if self.mode == "exponential":
            ax.set_xscale("log")
        ax.set_xlabel("Learning rate")
        ax.set_ylabel("Loss")
        if suggest and self.suggestion() is not None and self._optimal_idx is not None:
            i = self._optimal_idx
            ax.plot(lrs[i], losses[i], markersize=10, marker="o", color="red")
        if show:
            plt.show()
        return fig


def lr_at(k: int, mode: str, lr_min: float, lr_max: float, num_training: int) -> float:
    """The learning rate of the search's ``k``-th optimizer step (Lightning's schedule: ``lr_min`` at step 0,
    then ``lr_min -> lr_max`` at fraction (k + 1) / num_training)."""
    if k <= 0:
        return lr_min
    r = (k + 1) / num_training
    if mode == "linear":
        return lr_min + r * (lr_max - lr_min)
    return lr_min * (lr_max / lr_min) ** r


class _LRSearch(Callback):
    """The trial's only callback: sets each step's learning rate and records it with the smoothed loss; asks the
    loop to stop when the loss diverges (above ``early_stop_threshold`` times the best)."""

    def __init__(self, result: LRFinderResult, start_step: int, early_stop_threshold: float | None,
                 beta: float = 0.98) -> None:
        self.result, self.start_step, self.threshold, self.beta = result, start_step, early_stop_threshold, beta
        self.avg_loss = 0.0
        self.best_loss = 0.0
        self.diverged = False

    def state_dict(self) -> dict[str, Any]:
        """What a Ray trial's rank 0 sends back to the driver: the recorded learning rates and losses."""
        return {"results": self.result.results, "diverged": self.diverged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.result.results.update(state_dict["results"])
        self.diverged = state_dict["diverged"]

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise MisconfigurationException(
                f"lr_find needs exactly one optimizer, but configure_optimizers returned {len(optimizers)}. "
                "Tune the learning rate of a module with a single optimizer.")
        trainer.session.lr_scheduler_configs = []  # as Lightning: the search's schedule replaces the module's
        for group in optimizers[0].param_groups:
            group["lr"] = group["initial_lr"] = self.result.lr_min

    def _lr(self, trainer: Any) -> float:
        r = self.result
        return lr_at(trainer.global_step - self.start_step, r.mode, r.lr_min, r.lr_max, r.num_training)

    def _window_end(self, trainer: Any) -> bool:
        return (trainer.session.state.batch_idx + 1) % trainer.accumulate_grad_batches == 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        lr = self._lr(trainer)
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = lr
        if self._window_end(trainer):
            self.result.results["lr"].append(self._lr(trainer))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._window_end(trainer):
            return
        if not outputs:  # training_step returned None: the step counts, its loss does not (nan is skipped)
            self.result.results["loss"].append(float("nan"))
            return
        loss = outputs if isinstance(outputs, torch.Tensor) else outputs["loss"]
        step = trainer.global_step
        self.avg_loss = self.beta * self.avg_loss + (1 - self.beta) * loss.item()
        smoothed = self.avg_loss / (1 - self.beta ** (step + 1))
        diverged = self.threshold is not None and step > 1 and smoothed > self.threshold * self.best_loss
        if trainer.world_size > 1:  # rank 0's decision on every rank: they stop at the same step
            diverged = trainer.strategy.broadcast(diverged)
        if diverged:
            trainer.should_stop = self.diverged = True
        if smoothed < self.best_loss or step == 1:
            self.best_loss = smoothed
        self.result.results["loss"].append(smoothed)


def lr_attr_name(module: Any, datamodule: Any, attr_name: str = "") -> str:
    """The attribute the suggestion goes to: ``attr_name``, else ``lr`` or ``learning_rate`` (module or hparams)."""
    if attr_name:
        if not has_attr(module, datamodule, attr_name):
            raise AttributeError(f"lr_find(attr_name={attr_name!r}): the model (and model.hparams) has no attribute "
                                 f"{attr_name!r}. Name the attribute that holds the learning rate.")
        return attr_name
    for name in ("lr", "learning_rate"):
        if has_attr(module, datamodule, name):
            return name
    raise AttributeError("lr_find(update_attr=True) sets the suggestion on `model.lr` or `model.learning_rate` (or "
                         "the same key in model.hparams), and the model has neither. Add one, pass attr_name=... "
                         "naming yours, or update_attr=False.")


def lr_search(trainer: Any, model: Any, fit_kwargs: dict[str, Any], *, min_lr: float = 1e-8, max_lr: float = 1.0,
              num_training: int = 100, mode: str = "exponential", early_stop_threshold: float | None = 4.0,
              update_attr: bool = True, attr_name: str = "", running: bool = False) -> LRFinderResult | None:
    """Run the range test on ``model`` with ``trainer``'s settings and the data in ``fit_kwargs`` (those of
    Trainer.fit); returns the result (None under fast_dev_run, as Lightning). ``running``: called from a fit in
    progress (the callback), whose optimizers then get the suggested learning rate too."""
    mode = mode.lower()
    if mode not in MODES:
        raise ValueError(f"lr_find mode={mode!r}: use 'exponential' or 'linear'.")
    if not (0 < min_lr < max_lr) or not math.isfinite(max_lr):
        raise ValueError(f"lr_find needs 0 < min_lr < max_lr (finite); got min_lr={min_lr}, max_lr={max_lr}.")
    if int(num_training) < 1:
        raise ValueError(f"lr_find num_training={num_training}: must be at least 1.")
    refuse_sharded(trainer, "lr_find")
    if trainer.fast_dev_run:
        log.warning("lr_find skipped: fast_dev_run is on.")
        return None
    datamodule = fit_kwargs.get("datamodule")
    if update_attr:
        attr_name = lr_attr_name(model, datamodule, attr_name)
    result = LRFinderResult(mode, min_lr, max_lr, int(num_training))
    start = trainer.global_step if running else 0
    counters = trainer.session.state.counters() if running else None
    search = _LRSearch(result, start, early_stop_threshold)
    trial = trial_trainer(trainer, [search], counters, max_steps=start + int(num_training),
                          limit_val_batches=int(num_training))
    snapshot = ModuleSnapshot(model, datamodule)
    try:
        with isolated_rng(), no_lifecycle_hooks(model, datamodule) if running else contextlib.nullcontext():
            fit_trial(trial, trainer, model, fit_kwargs, running)
    finally:
        snapshot.restore()
    if running and trainer.world_size > 1:
        result.results = trainer.strategy.broadcast(result.results)  # rank 0's, as Lightning's search
    steps = trial.global_step - start
    if not trainer.is_global_zero:
        pass  # every rank found the same: rank 0 says it
    elif search.diverged:
        log.info("lr_find stopped early after %d of %d steps: the loss diverged.", steps, num_training)
    elif steps != num_training:
        log.info("lr_find ran %d of %d steps: the Trainer's max_epochs (with limit_train_batches) ended it first.",
                 steps, num_training)
    if update_attr:
        lr = result.suggestion()
        if lr is not None:
            set_attr(model, datamodule, attr_name, lr)
            if running:  # the fit in progress already built its optimizers
                for opt in trainer.optimizers:
                    for group in opt.param_groups:
                        group["lr"] = lr
            result.applied = (attr_name, lr)
            if trainer.is_global_zero:
                log.info("lr_find: learning rate set to %s (%s).", lr, attr_name)
    return result


def running_fit_data(trainer: Any) -> dict[str, Any]:
    """The data of the fit in progress, as Trainer.fit arguments for a trial: the datamodule, the loaders the
    fit was given, or nothing (the module's own dataloader hooks)."""
    session = trainer.session
    if session.datamodule is not None:
        return {"datamodule": session.datamodule}
    out: dict[str, Any] = {}
    for key, stage in (("train_dataloaders", "train"), ("val_dataloaders", "validate")):
        source = session.data_sources.get(stage)
        if source is not None and not session.reloadable.get(stage, True):
            out[key] = source()
    return out


class LearningRateFinder(Callback):
    """Runs lr_find when fit starts (Lightning's ``LearningRateFinder``); the result is ``optimal_lr`` and, with
    ``update_attr``, the suggestion is set on the module (``lr``/``learning_rate``/``attr_name``) and the
    fit's optimizer. On Ray every rank searches within the fit (rank 0's losses decide), and ``optimal_lr``
    reaches the driver's callback."""

    SUPPORTED_MODES = MODES

    def __init__(self, min_lr: float = 1e-8, max_lr: float = 1, num_training_steps: int = 100,
                 mode: str = "exponential", early_stop_threshold: float | None = 4.0, update_attr: bool = True,
                 attr_name: str = "") -> None:
        mode = mode.lower()
        if mode not in MODES:
            raise ValueError(f"LearningRateFinder mode={mode!r}: use one of {MODES}.")
        self._min_lr, self._max_lr, self._num_training_steps = min_lr, max_lr, num_training_steps
        self._mode, self._early_stop_threshold = mode, early_stop_threshold
        self._update_attr, self._attr_name = update_attr, attr_name
        self.optimal_lr: LRFinderResult | None = None

    def check_launch(self, trainer: Any, fn: str) -> None:
        """Refuse a sharded plan on the driver, before any rank starts."""
        if fn == "fit":
            refuse_sharded(trainer, "LearningRateFinder")

    def state_dict(self) -> dict[str, Any]:
        """The search's result, so the driver's callback holds it after a Ray fit (and a resumed fit too)."""
        return {} if self.optimal_lr is None else {"optimal_lr": self.optimal_lr.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("optimal_lr")
        if saved is not None:
            self.optimal_lr = LRFinderResult.from_dict(saved)

    def apply_on_driver(self, trainer: Any, model: Any) -> None:
        """After a Ray fit: the learning rate the ranks set on their module is set on the driver's module too,
        as Lightning's search leaves it on the module the script holds."""
        applied = self.optimal_lr.applied if self.optimal_lr is not None else None
        if applied is not None and has_attr(model, trainer.datamodule, applied[0]):
            set_attr(model, trainer.datamodule, *applied)

    def lr_find(self, trainer: Any, pl_module: Any) -> None:
        """Search now, with the running fit's data; sets ``optimal_lr``."""
        self.optimal_lr = lr_search(
            trainer, pl_module, running_fit_data(trainer), min_lr=self._min_lr, max_lr=self._max_lr,
            num_training=self._num_training_steps, mode=self._mode, early_stop_threshold=self._early_stop_threshold,
            update_attr=self._update_attr, attr_name=self._attr_name, running=True)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.lr_find(trainer, pl_module)
