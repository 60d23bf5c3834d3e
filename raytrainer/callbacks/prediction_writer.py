"""BasePredictionWriter: write predictions as trainer.predict makes them (per batch, per epoch or both)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from raytrainer.callbacks.callback import Callback
from raytrainer.utilities.exceptions import MisconfigurationException

WRITE_INTERVALS = ("batch", "epoch", "batch_and_epoch")


class BasePredictionWriter(Callback):
    """Subclass and implement ``write_on_batch_end`` and/or ``write_on_epoch_end``.

    ``batch_indices`` are the dataset indices of each batch, as the (sharded) sampler drew them; on several ranks
    every rank writes its own shard (name files by ``trainer.global_rank``), and the shards together hold every
    sample once. Indices need a torch DataLoader with a batch sampler; for other iterables they are None.
    """

    def __init__(self, write_interval: str = "batch") -> None:
        if write_interval not in WRITE_INTERVALS:
            raise MisconfigurationException(
                f"BasePredictionWriter(write_interval={write_interval!r}): use one of {', '.join(WRITE_INTERVALS)}.")
        self.interval = write_interval

    @property
    def _on_batch(self) -> bool:
        return self.interval in ("batch", "batch_and_epoch")

    @property
    def _on_epoch(self) -> bool:
        return self.interval in ("epoch", "batch_and_epoch")

    def write_on_batch_end(self, trainer: Any, pl_module: Any, prediction: Any, batch_indices: Sequence[int] | None,
                           batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        """Write one batch's prediction."""
        raise NotImplementedError(f"{type(self).__name__}(write_interval={self.interval!r}) must implement "
                                  "write_on_batch_end.")

    def write_on_epoch_end(self, trainer: Any, pl_module: Any, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        """Write all of this rank's predictions; ``batch_indices[dataloader_idx][batch_idx]`` lists the samples."""
        raise NotImplementedError(f"{type(self).__name__}(write_interval={self.interval!r}) must implement "
                                  "write_on_epoch_end.")

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        if self._on_batch:
            indices = getattr(trainer.session, "current_batch_indices", None)
            self.write_on_batch_end(trainer, pl_module, outputs, indices, batch, batch_idx, dataloader_idx)

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._on_epoch:
            session = trainer.session
            self.write_on_epoch_end(trainer, pl_module, session.predictions, session.predict_batch_indices)
