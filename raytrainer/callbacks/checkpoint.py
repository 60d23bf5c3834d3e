"""Checkpoint: the base class the Trainer recognises as a checkpointing callback; OnExceptionCheckpoint."""
from __future__ import annotations

import os
from typing import Any

from raytrainer.callbacks.callback import Callback
from raytrainer.utilities import log


class Checkpoint(Callback):
    """Subclass it for a custom checkpointing callback: ``trainer.checkpoint_callbacks`` lists every one."""

    FILE_EXTENSION = ".ckpt"


class OnExceptionCheckpoint(Checkpoint):
    """Writes ``dirpath/filename.ckpt`` when a Trainer call raises, so a crashed fit can resume from where it was
    (``trainer.fit(model, ckpt_path=cb.ckpt_path)``). A call that ends normally removes that file, as in Lightning.

    On several ranks (Ray) rank 0 writes it from its own state, without waiting for the other ranks (they may be
    the ones that failed); the other ranks write nothing.
    """

    def __init__(self, dirpath: str | os.PathLike[str], filename: str = "on_exception") -> None:
        if not filename:
            raise ValueError("OnExceptionCheckpoint(filename='') is empty: give the checkpoint a file name "
                             "(without the .ckpt extension), e.g. 'on_exception'.")
        self.dirpath = os.fspath(dirpath)
        self.filename = filename

    @property
    def ckpt_path(self) -> str:
        """Where the checkpoint is written."""
        from raytrainer.io import storage

        return storage.join(self.dirpath, self.filename + self.FILE_EXTENSION)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        from raytrainer.checkpoint.bridge import capture, writes_sharded
        from raytrainer.io import storage

        session = trainer.session
        if not trainer.is_global_zero or session.module is None:
            return
        try:
            if writes_sharded(session):
                log.warning("OnExceptionCheckpoint: sharded (FSDP) checkpoints need every rank, which a failed run "
                            "cannot promise; nothing was written.")
                return
            # capture, not trainer.save_checkpoint: no barrier, since other ranks may be dead or elsewhere
            ckpt = capture(session, False)
            storage.makedirs(self.dirpath)
            storage.save(ckpt, self.ckpt_path)
        except Exception as err:  # noqa: BLE001 - the original exception must propagate, not this one
            log.warning("OnExceptionCheckpoint could not write %s: %s", self.ckpt_path, err)
            return
        log.warning("OnExceptionCheckpoint: %s raised; checkpoint written to %s", type(exception).__name__,
                    self.ckpt_path)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """After a call that succeeded, the file of an earlier failure is stale: remove it (rank 0)."""
        from raytrainer.io import storage

        if trainer.interrupted or not trainer.is_global_zero:
            return
        storage.remove(self.ckpt_path, missing_ok=True)
