"""A callback that signals (SIGKILL by default) its own rank's process once at a step: the fault every Ray
restart test injects. Importable by Ray ranks (tests/ is on the driver's sys.path, which ranks inherit)."""
from __future__ import annotations

import os
import signal

import raytrainer as rt


class SignalAt(rt.Callback):
    """Sends ``sig`` to this rank's own process when the batch that makes ``step`` optimizer steps ends, on rank
    ``rank`` only, once (a marker file remembers it across restarts)."""

    def __init__(self, step: int, marker: str, rank: int = 1, sig: int = signal.SIGKILL) -> None:
        self.step, self.marker, self.rank, self.sig = step, marker, rank, sig

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), self.sig)
