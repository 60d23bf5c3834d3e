"""Small data types shared by the loops and the callbacks (Lightning keeps them in ``utilities.types``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class LRSchedulerConfig:
    """One scheduler and when to step it."""

    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None
    strict: bool = True
    name: str | None = None
    reduce_on_plateau: bool = False
    opt_idx: int = 0
