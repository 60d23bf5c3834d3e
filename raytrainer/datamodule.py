"""LightningDataModule: data download, splits and dataloaders in one reusable object."""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from raytrainer.module import DataHooks, HyperparametersMixin, restricted_classmethod


class LightningDataModule(DataHooks, HyperparametersMixin):
    """Override prepare_data, setup(stage) and the *_dataloader methods you need."""

    name: str | None = None
    # The checkpoint keys of save_hyperparameters' values, the argument name and its type (Lightning's).
    CHECKPOINT_HYPER_PARAMS_KEY = "datamodule_hyper_parameters"
    CHECKPOINT_HYPER_PARAMS_NAME = "datamodule_hparams_name"
    CHECKPOINT_HYPER_PARAMS_TYPE = "datamodule_hparams_type"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.trainer: Any = None

    @classmethod
    def from_datasets(cls, train_dataset: Any = None, val_dataset: Any = None, test_dataset: Any = None,
                      predict_dataset: Any = None, batch_size: int = 1, num_workers: int = 0,
                      **datamodule_kwargs: Any) -> LightningDataModule:
        """A datamodule whose dataloaders serve these datasets (each a Dataset, or a list/dict of them).

        ``batch_size`` and ``num_workers`` go to every DataLoader, and to ``__init__`` when it takes them;
        ``datamodule_kwargs`` go to ``__init__``. Training loaders shuffle (map-style datasets only).
        """
        hooks = {"train_dataloader": (train_dataset, True), "val_dataloader": (val_dataset, False),
                 "test_dataloader": (test_dataset, False), "predict_dataloader": (predict_dataset, False)}
        for hook, (data, _) in hooks.items():
            if data is not None:
                _check_datasets(data, hook.replace("dataloader", "dataset"))
        params = inspect.signature(cls.__init__).parameters
        takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
        special = {k: v for k, v in {"batch_size": batch_size, "num_workers": num_workers}.items()
                   if takes_any or k in params}
        datamodule = cls(**datamodule_kwargs, **special)
        for hook, (data, shuffle) in hooks.items():
            if data is not None:
                setattr(datamodule, hook, _DatasetLoaders(data, shuffle, batch_size, num_workers))
        return datamodule

    def prepare_data(self) -> None:
        """Download or write data once per node (local rank 0), or once in all (see prepare_data_per_node)."""

    def setup(self, stage: str) -> None:
        """Build datasets for 'fit', 'validate', 'test' or 'predict' (called on every rank)."""

    def teardown(self, stage: str) -> None:
        """Release what setup built."""

    def state_dict(self) -> dict[str, Any]:
        """State to save in checkpoints (under the class's qualified name); empty: nothing is saved."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what state_dict returned (called when fit resumes and by load_from_checkpoint)."""

    def on_exception(self, exception: BaseException) -> None:
        """Called when a Trainer call fails with ``exception`` (after the callbacks' on_exception)."""

    @restricted_classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             weights_only: bool | None = None, **kwargs: Any) -> LightningDataModule:
        """Rebuild the datamodule from the ``datamodule_hyper_parameters`` a checkpoint saved (overridden by
        ``hparams_file`` and kwargs) and load its ``state_dict`` if the checkpoint holds one."""
        from raytrainer.checkpoint.resolve import load_datamodule

        return load_datamodule(cls, checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                               weights_only=weights_only, overrides=kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["trainer"] = None
        return state


def _check_datasets(data: Any, name: str) -> None:
    """Refuse anything but a Dataset or a list/tuple/dict of them, naming the argument."""
    if isinstance(data, Dataset):
        return
    items = data.values() if isinstance(data, Mapping) else data if isinstance(data, (list, tuple)) else None
    if items is None:
        raise TypeError(f"LightningDataModule.from_datasets({name}=...) expects a torch Dataset or a list/tuple/dict "
                        f"of them, got {type(data).__name__}.")
    for item in items:
        _check_datasets(item, name)


class _DatasetLoaders:
    """A from_datasets dataloader hook: fresh DataLoaders over the datasets (same structure) on each call.

    Training loaders shuffle map-style datasets; memory is pinned when CUDA is available. A plain object
    rather than a closure, so the datamodule pickles for Ray ranks."""

    def __init__(self, data: Any, shuffle: bool, batch_size: int, num_workers: int) -> None:
        self.data, self.shuffle, self.batch_size, self.num_workers = data, shuffle, batch_size, num_workers

    def __call__(self) -> Any:
        return self._build(self.data)

    def _build(self, data: Any) -> Any:
        if isinstance(data, Dataset):
            return DataLoader(data, batch_size=self.batch_size, num_workers=self.num_workers,
                              shuffle=self.shuffle and not isinstance(data, IterableDataset),
                              pin_memory=torch.cuda.is_available())
        if isinstance(data, Mapping):
            return type(data)((k, self._build(v)) for k, v in data.items())
        return type(data)(self._build(v) for v in data)
