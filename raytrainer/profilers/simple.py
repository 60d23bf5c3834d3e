"""SimpleProfiler: how long each action took (mean, calls, total, share of the run), as a table."""
from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from pathlib import Path

from raytrainer.profilers.profiler import Profiler


class SimpleProfiler(Profiler):
    """Records the duration of every call of every action and reports mean and total per action.

    ``extended=True`` adds the number of calls and each action's percentage of the run's time.
    """

    def __init__(self, dirpath: str | Path | None = None, filename: str | None = None,
                 extended: bool = True) -> None:
        super().__init__(dirpath=dirpath, filename=filename)
        self.current_actions: dict[str, float] = {}
        self.recorded_durations: dict[str, list[float]] = defaultdict(list)
        self.extended = extended
        self.start_time = time.perf_counter()

    def start(self, action_name: str) -> None:
        if action_name in self.current_actions:
            raise ValueError(f"Attempted to start {action_name} which has already started.")
        self.current_actions[action_name] = time.perf_counter()

    def stop(self, action_name: str) -> None:
        end = time.perf_counter()
        started = self.current_actions.pop(action_name, None)
        if started is None:
            raise ValueError(f"Attempting to stop recording an action ({action_name}) which was never started.")
        self.recorded_durations[action_name].append(end - started)

    def _rows(self) -> tuple[list[tuple[str, float, int, float, float]], int, float]:
        """(action, mean, calls, total, percent) by percent, the number of calls and the run's duration."""
        run = time.perf_counter() - self.start_time
        rows = []
        for action, durations in self.recorded_durations.items():
            total = math.fsum(durations)
            rows.append((action, total / len(durations), len(durations), total, 100.0 * total / run))
        rows.sort(key=lambda r: r[4], reverse=True)
        return rows, sum(r[2] for r in rows), run

    def summary(self) -> str:
        sep = os.linesep
        out = (f"{self._stage.upper()} " if self._stage else "") + f"Profiler Report{sep}"
        if not self.recorded_durations:
            return out
        width = max(len(k) for k in self.recorded_durations)

        def row(*cells: str) -> str:
            action, rest = cells[0], cells[1:]
            return f"{sep}|  {action:<{width}s}\t|" + "".join(f"  {c:<15}\t|" for c in rest)

        if self.extended:
            header = row("Action", "Mean duration (s)", "Num calls", "Total time (s)", "Percentage %")
            line = f"{sep}{'-' * len(header.expandtabs())}"
            rows, calls, run = self._rows()
            out += line + header + line + row("Total", "-", f"{calls}", f"{run:.5}", "100 %") + line
            for action, mean, n, total, percent in rows:
                out += row(action, f"{mean:.5}", f"{n}", f"{total:.5}", f"{percent:.5}")
        else:
            header = row("Action", "Mean duration (s)", "Total time (s)")
            line = f"{sep}{'-' * len(header.expandtabs())}"
            out += line + header + line
            rows, _, _ = self._rows()
            for action, mean, _n, total, _p in sorted(rows, key=lambda r: r[1], reverse=True):
                out += row(action, f"{mean:.5}", f"{total:.5}")
        return out + line + sep
