"""The batch-size search (Lightning's ``scale_batch_size``) and the ``BatchSizeFinder`` callback.

Each trial runs ``steps_per_trial`` steps of fit (or batches of validate/test/predict) in a private trial Trainer
with the module's (or datamodule's) batch size attribute set to the size tried; the data comes from the
module's or datamodule's dataloader hooks, so each trial builds its loaders with that size. A trial that runs
out of memory ends the doubling (``power``) or narrows a binary search (``binsearch``), with Lightning's rules
(``max_trials``, ``max_val``, ``margin``, the dataset-length cap). The module is put back as it was; the
attribute keeps the size found.
"""
from __future__ import annotations

import contextlib
from typing import Any

from raytrainer.callbacks._tuning import (
    ModuleSnapshot,
    free_memory,
    get_attr,
    has_attr,
    is_oom_error,
    isolated_rng,
    no_lifecycle_hooks,
    refuse_distributed,
    set_attr,
    trial_trainer,
)
from raytrainer.callbacks.callback import Callback
from raytrainer.utilities import log
from raytrainer.utilities.exceptions import MisconfigurationException

MODES = ("power", "binsearch")
METHODS = ("fit", "validate", "test", "predict")
_HOOK = {"fit": "train_dataloader", "validate": "val_dataloader", "test": "test_dataloader",
         "predict": "predict_dataloader"}


def _dataset_length(method: str, module: Any, datamodule: Any) -> int | None:
    """Samples in the data a trial of ``method`` reads (the longest training dataset, or the eval datasets
    together), from the dataloader hook; None when no dataset has a length."""
    source = datamodule if datamodule is not None else module
    hook = getattr(source, _HOOK[method], None)
    loaders = hook() if hook is not None else None
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    lengths = []
    for dl in loaders:
        try:
            lengths.append(len(dl.dataset))
        except (AttributeError, TypeError, NotImplementedError):
            continue
    if not lengths:
        return None
    return max(lengths) if method == "fit" else sum(lengths)


class _Search:
    """One search: the trial runs and the attribute changes between them."""

    def __init__(self, trainer: Any, module: Any, datamodule: Any, method: str, name: str, steps_per_trial: int,
                 max_val: int, running: bool = False) -> None:
        self.trainer, self.module, self.datamodule, self.method = trainer, module, datamodule, method
        self.running = running  # inside a fit in progress: the trials skip prepare_data/setup/teardown
        self.name, self.steps, self.max_val = name, steps_per_trial, max_val
        self.trials: list[tuple[int, bool]] = []  # (size, fitted in memory), in order

    def adjust(self, factor: float = 1.0, value: int | None = None, desc: str | None = None) -> tuple[int, bool]:
        """Set the attribute to ``value`` (or the current size times ``factor``, at most max_val); not past the
        dataset: a size already at or above its length stays. Returns (size, whether it changed)."""
        current = get_attr(self.module, self.datamodule, self.name)
        length = _dataset_length(self.method, self.module, self.datamodule)
        if length is not None and current >= length:
            log.info("scale_batch_size: batch size %d is at least the dataset's length (%d); not raising it.",
                     current, length)
            return current, False
        new = value if value is not None else int(current * factor)
        if new > self.max_val:
            new = self.max_val
        if new < 1:
            raise RuntimeError(f"scale_batch_size: even batch size {current} runs out of memory; the model does "
                               "not fit at any batch size on this device.")
        if desc:
            log.info("scale_batch_size: batch size %d %s, trying %d.", current, desc, new)
        set_attr(self.module, self.datamodule, self.name, new)
        return new, new != current

    def fits(self, size: int) -> bool:
        """Run one trial at the current size: True when it ran, False when it ran out of memory."""
        free_memory()
        steps = self.steps
        changes: dict[str, Any] = {"fit": {"max_steps": steps, "limit_train_batches": None,
                                           "limit_val_batches": steps},
                                   "validate": {"limit_val_batches": steps}, "test": {"limit_test_batches": steps},
                                   "predict": {"limit_predict_batches": steps}}[self.method]
        trial = trial_trainer(self.trainer, [], None, **changes)
        dm = self.datamodule
        quiet = no_lifecycle_hooks(self.module, dm) if self.running else contextlib.nullcontext()
        try:
            with quiet:
                self._run(trial, dm)
        except BaseException as exc:
            if not is_oom_error(exc):
                raise
            del exc
            free_memory(collect=True)
            self.trials.append((size, False))
            return False
        self.trials.append((size, True))
        return True

    def _run(self, trial: Any, dm: Any) -> None:
        """One trial of the search's method."""
        if self.method == "fit":
            trial.fit(self.module, datamodule=dm)
        elif self.method == "predict":
            trial.predict(self.module, datamodule=dm, return_predictions=False)
        else:
            getattr(trial, self.method)(self.module, datamodule=dm, verbose=False)

    def power(self, size: int, max_trials: int) -> int:
        """Double until a size runs out of memory (or a limit is reached); the last size that fitted."""
        any_success = False
        for i in range(max_trials):
            if size >= self.max_val:
                log.info("scale_batch_size: reached max_val=%d; stopping.", self.max_val)
                break
            if not self.fits(size):
                size, _ = self.adjust(factor=0.5, desc="failed")
                if any_success:
                    break
                continue
            if i + 1 >= max_trials:
                break
            size, changed = self.adjust(factor=2.0, desc="succeeded")
            if not changed:
                break
            any_success = True
        return size

    def binsearch(self, size: int, max_trials: int, margin: float) -> int:
        """Double until a size runs out of memory, then bisect between the last size that fitted and the one
        that did not; the result is reduced by ``margin``."""
        low, high, count = 1, None, 0
        while True:
            if size >= self.max_val:
                log.info("scale_batch_size: reached max_val=%d; stopping.", self.max_val)
                break
            if not self.fits(size):
                high = size
                size, _ = self.adjust(value=(high + low) // 2, desc="failed")
                if high - low <= 1:
                    break
                continue
            count += 1
            if count >= max_trials:
                break
            low = size
            if high:
                if high - low <= 1:
                    break
                size, changed = self.adjust(value=(high + low) // 2, desc="succeeded")
            else:
                size, changed = self.adjust(factor=2.0, desc="succeeded")
            if not changed:
                break
        if margin > 0:
            reduced = max(1, int(size * (1 - margin)))
            if reduced != size:
                log.info("scale_batch_size: margin %.1f%% takes batch size %d to %d.", margin * 100, size, reduced)
                size = reduced
                set_attr(self.module, self.datamodule, self.name, size)
        return size


def check_batch_size_args(mode: str, steps_per_trial: int, init_val: int, max_trials: int, margin: float,
                          max_val: int) -> str:
    """Validate the search's arguments; returns the mode in lower case."""
    mode = mode.lower()
    if mode not in MODES:
        raise ValueError(f"scale_batch_size mode={mode!r}: use one of {MODES}.")
    for name, value in (("steps_per_trial", steps_per_trial), ("init_val", init_val), ("max_trials", max_trials),
                        ("max_val", max_val)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"scale_batch_size {name}={value!r}: must be an int >= 1.")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"scale_batch_size margin={margin}: must be in [0, 1).")
    return mode


def batch_size_search(trainer: Any, model: Any, datamodule: Any = None, *, method: str = "fit",
                      mode: str = "power", steps_per_trial: int = 3, init_val: int = 2, max_trials: int = 25,
                      batch_arg_name: str = "batch_size", margin: float = 0.05, max_val: int = 8192,
                      running: bool = False) -> int | None:
    """Find the largest batch size of ``model`` (or ``datamodule``) that runs ``method`` without running out of
    memory; sets it on the attribute and returns it (None under fast_dev_run, as Lightning)."""
    mode = check_batch_size_args(mode, steps_per_trial, init_val, max_trials, margin, max_val)
    if method not in METHODS:
        raise ValueError(f"scale_batch_size method={method!r}: use one of {METHODS}.")
    refuse_distributed(trainer, "scale_batch_size")
    if trainer.fast_dev_run:
        log.warning("scale_batch_size skipped: fast_dev_run is on.")
        return None
    if not has_attr(model, datamodule, batch_arg_name):
        raise MisconfigurationException(
            f"scale_batch_size changes `{batch_arg_name}`, but neither the model, model.hparams, the datamodule nor "
            f"datamodule.hparams has it. Add the attribute and read it in your {_HOOK[method]}(), or pass "
            "batch_arg_name=... naming yours.")
    if hasattr(model, batch_arg_name) and batch_arg_name in (getattr(model, "hparams", None) or {}):
        log.warning("model.%s and model.hparams.%s both exist; model.%s is the starting size.", batch_arg_name,
                    batch_arg_name, batch_arg_name)
    original = get_attr(model, datamodule, batch_arg_name)
    snapshot = ModuleSnapshot(model, datamodule)
    search = _Search(trainer, model, datamodule, method, batch_arg_name, steps_per_trial, max_val, running)
    done = False
    try:
        with isolated_rng():
            size, _ = search.adjust(value=init_val)
            size = search.power(size, max_trials) if mode == "power" else search.binsearch(size, max_trials, margin)
        done = True
    finally:
        snapshot.restore()
        free_memory()
        if not done:  # a failed search leaves the size the user had
            set_attr(model, datamodule, batch_arg_name, original)
    log.info("scale_batch_size: batch size %d (trials: %s).", size, search.trials)
    return size


class BatchSizeFinder(Callback):
    """Runs scale_batch_size when fit starts (Lightning's ``BatchSizeFinder``), then reloads the fit's loaders with
    the size found; the result is ``optimal_batch_size``. The data must come from the module's or datamodule's
    dataloader hooks. One process only: a Trainer running several ranks on Ray refuses it before they start."""

    SUPPORTED_MODES = MODES

    def __init__(self, mode: str = "power", steps_per_trial: int = 3, init_val: int = 2, max_trials: int = 25,
                 batch_arg_name: str = "batch_size", margin: float = 0.05, max_val: int = 8192) -> None:
        self._mode = check_batch_size_args(mode, steps_per_trial, init_val, max_trials, margin, max_val)
        self._steps_per_trial, self._init_val, self._max_trials = steps_per_trial, init_val, max_trials
        self._batch_arg_name, self._margin, self._max_val = batch_arg_name, margin, max_val
        self.optimal_batch_size: int | None = init_val

    def check_launch(self, trainer: Any, fn: str) -> None:
        """Refuse a several-rank plan on the driver, before any rank starts."""
        refuse_distributed(trainer, "BatchSizeFinder")

    def scale_batch_size(self, trainer: Any, pl_module: Any) -> None:
        """Search now, in the running fit; sets ``optimal_batch_size`` and reloads the fit's loaders."""
        session = trainer.session
        if not session.reloadable.get("train", True) or (session.val_dataloaders
                                                         and not session.reloadable.get("validate", True)):
            raise MisconfigurationException(
                "BatchSizeFinder cannot change the batch size of dataloaders passed to trainer.fit(...) directly. "
                "Build them in the module's or datamodule's train_dataloader()/val_dataloader() from the batch "
                f"size attribute (`{self._batch_arg_name}`), or remove the callback.")
        self.optimal_batch_size = batch_size_search(
            trainer, pl_module, session.datamodule, method="fit", mode=self._mode,
            steps_per_trial=self._steps_per_trial, init_val=self._init_val, max_trials=self._max_trials,
            batch_arg_name=self._batch_arg_name, margin=self._margin, max_val=self._max_val, running=True)
        session._load_train()  # the fit goes on with loaders of the size found
        if session.val_dataloaders:
            session._load_eval("validate")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.scale_batch_size(trainer, pl_module)

    def _eval_note(self, trainer: Any, stage: str) -> None:
        log.warning("BatchSizeFinder searches when fit starts; it does not tune trainer.%s. Use "
                    "Tuner(trainer).scale_batch_size(model, method=%r, ...) before it.", stage, stage)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state_fn == "validate":
            self._eval_note(trainer, "validate")

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_note(trainer, "test")

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_note(trainer, "predict")
