"""PassThroughProfiler: the profiler of a Trainer without one; records nothing."""
from __future__ import annotations

from raytrainer.profilers.profiler import Profiler


class PassThroughProfiler(Profiler):
    """Records nothing. ``trainer.profiler`` is one when no profiler was given; the Trainer then wraps no hook."""

    def start(self, action_name: str) -> None:
        pass

    def stop(self, action_name: str) -> None:
        pass
