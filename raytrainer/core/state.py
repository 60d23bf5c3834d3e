"""LoopState: where a rank's run is (counters and data position), saved and restored one way.

Checkpoints, in-memory snapshots and elastic resizes all call ``state_dict()`` /
``load_state_dict()``; a restore leaves a ``ResumePosition`` that the next epoch consumes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ResumePosition:
    """Where a restored run re-enters its epoch: the RNG that ordered it, and batches already done."""

    epoch: int
    batch_idx: int
    epoch_rng: torch.Tensor | None  # None for a Lightning checkpoint: the epoch gets a fresh order
    rng: dict[str, Any] | None
    results: dict[str, Any] | None = None  # epoch accumulators of self.log(on_epoch=True) values so far
    segments: list[list[int]] | None = None  # elastic runs: [world, batches per rank, batch size] done so far
    data: str | None = None  # the fingerprint of a resumable source (ParquetDataset) the position is in


class LoopState:
    """The fit loop's counters and data position (Lightning keeps these in its loops' progress objects)."""

    def __init__(self) -> None:
        self.current_epoch = 0
        self.global_step = 0
        self.batches_that_stepped = 0   # Lightning's _batches_that_stepped: the loggers' step
        self.total_batches_seen = 0     # across epochs (val_check_interval with check_val_every_n_epoch=None)
        self.batch_idx = 0
        self.batches_done_in_epoch = 0
        self.epoch_done = False         # between the epoch's last batch and the end of on_train_epoch_end
        self.stepped_since_log = False
        self.epoch_start_rng: torch.Tensor | None = None
        self.epoch_segments: list[list[int]] = []
        self.resume: ResumePosition | None = None
        self.resuming = False

    @property
    def mid_epoch(self) -> bool:
        """Stopped after a finished batch inside an epoch (not at its end)."""
        return not self.epoch_done and self.batches_done_in_epoch > 0

    def counters(self) -> dict[str, int]:
        """The counters the driver and later calls need (what a RunResult carries back)."""
        return {"current_epoch": self.current_epoch, "global_step": self.global_step,
                "batches_that_stepped": self.batches_that_stepped, "total_batches_seen": self.total_batches_seen}

    def load_counters(self, counters: dict[str, int]) -> None:
        for key, value in counters.items():
            setattr(self, key, int(value))

    def state_dict(self, segments: list[list[int]] | None = None,
                   results: dict[str, Any] | None = None) -> dict[str, Any]:
        """The resume position: epoch, batches done, the RNG that ordered the epoch, elastic segments, and
        the partial epoch means (``results``) of a mid-epoch stop."""
        mid = self.mid_epoch
        return {
            "epoch": self.current_epoch + 1 if self.epoch_done else self.current_epoch,
            "batch_idx": self.batches_done_in_epoch if mid else 0,
            "epoch_start_rng": self.epoch_start_rng if self.epoch_start_rng is not None else torch.get_rng_state(),
            "segments": segments,
            "batches_that_stepped": self.batches_that_stepped,
            "total_batches_seen": self.total_batches_seen,
            "results": results if mid and results is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any], global_step: int, rng: dict[str, Any] | None) -> None:
        """Restore counters and leave the position for the epoch it belongs to (``take_resume``)."""
        epoch = int(state["epoch"])
        self.global_step = int(global_step)
        self.current_epoch = epoch
        self.batches_that_stepped = int(state.get("batches_that_stepped", global_step))
        self.total_batches_seen = int(state.get("total_batches_seen", 0))
        self.resume = ResumePosition(epoch=epoch, batch_idx=int(state["batch_idx"]),
                                     epoch_rng=state.get("epoch_start_rng"), rng=rng,
                                     results=state.get("results") or None, segments=state.get("segments"),
                                     data=state.get("data"))
        self.resuming = True

    def resume_batch_idx(self, epoch: int) -> int:
        """Batches of ``epoch`` a pending resume has already trained (0 when none): the progress bar starts there."""
        pos = self.resume
        return pos.batch_idx if pos is not None and pos.epoch == epoch else 0

    def take_resume(self, epoch: int) -> ResumePosition | None:
        """The restored position if it belongs to ``epoch`` (used once)."""
        pos = self.resume
        if pos is None or pos.epoch != epoch:
            return None
        self.resume = None
        return pos
