"""LightningDataModule: data download, splits and dataloaders in one reusable object."""
from __future__ import annotations

from typing import Any

from raytrainer.module import DataHooks
from raytrainer.utilities import AttributeDict


class LightningDataModule(DataHooks):
    """Override prepare_data, setup(stage) and the *_dataloader methods you need."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self._hparams = AttributeDict()

    def prepare_data(self) -> None:
        """Download or write data once per node (called on local rank 0 only)."""

    def setup(self, stage: str) -> None:
        """Build datasets for 'fit', 'validate', 'test' or 'predict' (called on every rank)."""

    def teardown(self, stage: str) -> None:
        """Release what setup built."""

    def save_hyperparameters(self, *args: Any, ignore: Any = None, logger: bool = True) -> None:
        """Record __init__ arguments into ``self.hparams`` (logged with the module's unless logger=False)."""
        import inspect

        from raytrainer.module import _collect_init_args
        from raytrainer.utilities import check_plain_hparams

        values = _collect_init_args(inspect.currentframe().f_back, type(self))
        if args:
            values = {k: values[k] for k in args}
        ignore = [ignore] if isinstance(ignore, str) else list(ignore or [])
        values = {k: v for k, v in values.items() if k not in ignore}
        check_plain_hparams(values, type(self).__name__)
        self.hparams.update(values)
        self.__dict__["_log_hyperparams"] = bool(logger)

    @property
    def hparams(self) -> AttributeDict:
        if "_hparams" not in self.__dict__:
            self.__dict__["_hparams"] = AttributeDict()
        return self.__dict__["_hparams"]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what state_dict returned."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["trainer"] = None
        return state
