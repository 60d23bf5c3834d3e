"""Tuner: Lightning's ``Tuner(trainer).lr_find(...)`` and ``.scale_batch_size(...)``.

Both run their trials in private trial Trainers built from ``trainer``'s settings, so ``trainer`` itself (its
counters, callbacks, loggers, optimizers and checkpoint files) is as before; the module's weights are put back
bitwise, and only the value found is set (``lr``/``learning_rate``/``attr_name``, or the batch size attribute).
Where Lightning runs them: ``lr_find`` on a Ray Trainer is a Ray run of its own on the same ranks (DDP), whose rank
0 losses come back to the driver; ``scale_batch_size`` runs in one process only (a Ray Trainer refuses it before
any rank starts, as Lightning refuses it under distributed strategies).
"""
from __future__ import annotations

from typing import Any

from raytrainer.callbacks.batch_size_finder import METHODS, BatchSizeFinder, batch_size_search
from raytrainer.callbacks.lr_finder import LearningRateFinder, LRFinderResult, lr_search
from raytrainer.datamodule import LightningDataModule
from raytrainer.module import LightningModule
from raytrainer.utilities.exceptions import MisconfigurationException


def _check_method_args(method: str, train_dataloaders: Any, val_dataloaders: Any, dataloaders: Any) -> None:
    """Lightning's rule: fit takes train/val loaders, the other methods take ``dataloaders``."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is invalid: use one of {METHODS}.")
    if method == "fit" and dataloaders is not None:
        raise MisconfigurationException("With method='fit' the tuner takes train_dataloaders and val_dataloaders, "
                                        "not dataloaders.")
    if method != "fit" and (train_dataloaders is not None or val_dataloaders is not None):
        raise MisconfigurationException(f"With method={method!r} the tuner takes dataloaders=..., not "
                                        "train_dataloaders or val_dataloaders.")


def _check_model(model: Any) -> None:
    if not isinstance(model, LightningModule):
        raise TypeError(f"the tuner tunes a raytrainer.LightningModule; got {type(model).__name__}.")


class Tuner:
    """Tunes a model's learning rate or batch size with ``trainer``'s settings, leaving ``trainer`` as it was."""

    def __init__(self, trainer: Any) -> None:
        self._trainer = trainer

    def lr_find(self, model: LightningModule, train_dataloaders: Any = None, val_dataloaders: Any = None,
                dataloaders: Any = None, datamodule: LightningDataModule | None = None, method: str = "fit",
                min_lr: float = 1e-8, max_lr: float = 1, num_training: int = 100, mode: str = "exponential",
                early_stop_threshold: float | None = 4.0, update_attr: bool = True,
                attr_name: str = "") -> LRFinderResult | None:
        """Train ``num_training`` steps with the learning rate rising from ``min_lr`` to ``max_lr``; returns the
        losses (``.results``), ``.suggestion()`` and ``.plot()``. With ``update_attr`` the suggestion is set on
        ``model.lr``/``model.learning_rate``/``attr_name`` (or the same hparams key)."""
        if method != "fit":
            raise MisconfigurationException(f"lr_find runs with method='fit' only; got method={method!r}.")
        _check_method_args(method, train_dataloaders, val_dataloaders, dataloaders)
        _check_model(model)
        if any(isinstance(cb, LearningRateFinder) for cb in self._trainer.callbacks):
            raise ValueError("The Trainer already has a LearningRateFinder callback; remove it to use the Tuner.")
        if isinstance(train_dataloaders, LightningDataModule):
            datamodule, train_dataloaders = train_dataloaders, None
        kwargs: dict[str, Any] = {"datamodule": datamodule} if datamodule is not None else \
            {"train_dataloaders": train_dataloaders, "val_dataloaders": val_dataloaders}
        return lr_search(self._trainer, model, kwargs, min_lr=min_lr, max_lr=max_lr, num_training=num_training,
                         mode=mode, early_stop_threshold=early_stop_threshold, update_attr=update_attr,
                         attr_name=attr_name)

    def scale_batch_size(self, model: LightningModule, train_dataloaders: Any = None, val_dataloaders: Any = None,
                         dataloaders: Any = None, datamodule: LightningDataModule | None = None,
                         method: str = "fit", mode: str = "power", steps_per_trial: int = 3, init_val: int = 2,
                         max_trials: int = 25, batch_arg_name: str = "batch_size", margin: float = 0.05,
                         max_val: int = 8192) -> int | None:
        """The largest batch size (``power``: doubling; ``binsearch``: doubling then bisection, less ``margin``)
        whose ``steps_per_trial`` steps of ``method`` run without an out-of-memory error; set on the batch size
        attribute of the model, its hparams or the datamodule, and returned."""
        _check_method_args(method, train_dataloaders, val_dataloaders, dataloaders)
        _check_model(model)
        if any(isinstance(cb, BatchSizeFinder) for cb in self._trainer.callbacks):
            raise ValueError("The Trainer already has a BatchSizeFinder callback; remove it to use the Tuner.")
        if isinstance(train_dataloaders, LightningDataModule):
            datamodule, train_dataloaders = train_dataloaders, None
        if isinstance(dataloaders, LightningDataModule):
            datamodule, dataloaders = dataloaders, None
        if any(x is not None for x in (train_dataloaders, val_dataloaders, dataloaders)):
            raise MisconfigurationException(
                "scale_batch_size cannot change the batch size of dataloaders passed in directly. Build them in the "
                f"module's or datamodule's dataloader hooks from `{batch_arg_name}`, and pass the datamodule (or "
                "nothing, for the module's hooks).")
        return batch_size_search(self._trainer, model, datamodule, method=method, mode=mode,
                                 steps_per_trial=steps_per_trial, init_val=init_val, max_trials=max_trials,
                                 batch_arg_name=batch_arg_name, margin=margin, max_val=max_val)
