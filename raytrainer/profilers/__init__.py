"""Lightning's profilers: ``Trainer(profiler="simple" | "advanced" | "pytorch" | a Profiler)``."""
from __future__ import annotations

from typing import Any

from raytrainer.profilers.advanced import AdvancedProfiler
from raytrainer.profilers.base import PassThroughProfiler
from raytrainer.profilers.profiler import Profiler, profiled, profiled_iter
from raytrainer.profilers.pytorch import PyTorchProfiler
from raytrainer.profilers.simple import SimpleProfiler
from raytrainer.utilities.exceptions import MisconfigurationException

__all__ = ["AdvancedProfiler", "PassThroughProfiler", "Profiler", "PyTorchProfiler", "SimpleProfiler", "make_profiler",
           "profiled", "profiled_iter"]

PROFILERS: dict[str, type[Profiler]] = {"simple": SimpleProfiler, "advanced": AdvancedProfiler,
                                        "pytorch": PyTorchProfiler}


def make_profiler(profiler: Any) -> Profiler | None:
    """Trainer(profiler=...) as a Profiler: a name builds one with default settings; None stays None (no
    profiling; ``trainer.profiler`` then shows a PassThroughProfiler, as Lightning's)."""
    if profiler is None:
        return None
    if isinstance(profiler, Profiler):
        return profiler
    if isinstance(profiler, str):
        name = profiler.lower()
        if name == "xla":
            raise MisconfigurationException(
                "Trainer(profiler='xla') is Lightning's XLA profiler, which raytrainer does not have. Use "
                "profiler='simple', 'advanced' or 'pytorch', or torch_xla.debug.profiler directly.")
        if name not in PROFILERS:
            raise MisconfigurationException(
                f"Trainer(profiler={profiler!r}): a profiler name must be one of {list(PROFILERS)} (or pass a "
                "raytrainer.profilers.Profiler instance).")
        return PROFILERS[name]()
    raise MisconfigurationException(
        f"Trainer(profiler=...) takes a name ({', '.join(repr(n) for n in PROFILERS)}), a raytrainer.profilers."
        f"Profiler instance or None; got {type(profiler).__name__}.")
