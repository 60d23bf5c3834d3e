"""AdvancedProfiler: Python's cProfile per action, reported as pstats tables."""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from raytrainer.io import storage
from raytrainer.profilers.profiler import Profiler


class AdvancedProfiler(Profiler):
    """Records every function call made inside each action with cProfile (detailed and slower).

    ``line_count_restriction``: functions listed per action (an int, or a fraction of them in [0, 1]).
    ``dump_stats``: also write each action's raw stats to ``dirpath/<stage>-<filename>-<action>.prof``.
    """

    def __init__(self, dirpath: str | Path | None = None, filename: str | None = None,
                 line_count_restriction: float = 1.0, dump_stats: bool = False) -> None:
        super().__init__(dirpath=dirpath, filename=filename)
        self.profiled_actions: dict[str, cProfile.Profile] = defaultdict(cProfile.Profile)
        self.line_count_restriction = line_count_restriction
        self.dump_stats = dump_stats

    def start(self, action_name: str) -> None:
        # one cProfile runs at a time: an action started inside another is recorded on its own
        for pr in self.profiled_actions.values():
            pr.disable()
        self.profiled_actions[action_name].enable()

    def stop(self, action_name: str) -> None:
        pr = self.profiled_actions.get(action_name)
        if pr is None:
            raise ValueError(f"Attempting to stop recording an action ({action_name}) which was never started.")
        pr.disable()

    def _dump(self, action_name: str, pr: cProfile.Profile) -> None:
        if not self.dirpath:
            raise ValueError("AdvancedProfiler(dump_stats=True) needs a directory: pass dirpath=... (or a filename, "
                             "so the Trainer's log_dir is used).")
        target = storage.join(self.dirpath, self._prepare_filename(action_name=action_name, extension=".prof"))
        with tempfile.TemporaryDirectory() as tmp:  # pstats writes only local files
            local = os.path.join(tmp, "stats.prof")
            pr.dump_stats(local)
            with open(local, "rb") as f:
                data = f.read()
        fs, path = storage.resolve(target)
        fs.create_dir(path.rsplit("/", 1)[0] if "/" in path else ".", recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(data)

    def summary(self) -> str:
        stats = {}
        for action, pr in self.profiled_actions.items():
            if self.dump_stats:
                self._dump(action, pr)
            text = io.StringIO()
            pstats.Stats(pr, stream=text).strip_dirs().sort_stats("cumulative").print_stats(
                self.line_count_restriction)
            stats[action] = text.getvalue()
        return self._stats_to_str(stats)

    def teardown(self, stage: str | None) -> None:
        super().teardown(stage=stage)
        self.profiled_actions.clear()

    def __reduce__(self) -> tuple[Any, ...]:
        # cProfile objects do not pickle: a copy (e.g. on a Ray rank) starts with no recordings
        return (self.__class__, (), {"dirpath": self.dirpath, "filename": self.filename,
                                     "line_count_restriction": self.line_count_restriction,
                                     "dump_stats": self.dump_stats})
