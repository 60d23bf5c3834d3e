"""PyTorchProfiler: torch.profiler over a Trainer call; every action is a record_function range, the report is
torch's operator table, and with a filename a Chrome trace is written next to it."""
from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from raytrainer.io import storage
from raytrainer.profilers.profiler import Profiler

# actions after which a torch.profiler schedule advances one step (Lightning steps it at the same places)
STEP_ACTIONS = ("training_step", "validation_step", "test_step", "predict_step")


class PyTorchProfiler(Profiler):
    """Runs ``torch.profiler.profile(**profiler_kwargs)`` from the first action of a call to its report.

    ``export_to_chrome``: with a ``filename`` (and so a directory), also write
    ``<stage>-<filename>[-<rank>].pt.trace.json`` for chrome://tracing or Perfetto.
    ``row_limit``, ``sort_by_key``, ``group_by_input_shapes``, ``table_kwargs``: the table of
    ``key_averages()``. ``profiler_kwargs`` go to torch.profiler.profile (activities, record_shapes,
    profile_memory, with_stack, schedule, ...); with a ``schedule`` the profiler steps after each step action.
    """

    def __init__(self, dirpath: str | Path | None = None, filename: str | None = None,
                 group_by_input_shapes: bool = False, export_to_chrome: bool = True, row_limit: int = 20,
                 sort_by_key: str | None = None, table_kwargs: dict[str, Any] | None = None,
                 **profiler_kwargs: Any) -> None:
        super().__init__(dirpath=dirpath, filename=filename)
        if group_by_input_shapes and not profiler_kwargs.get("record_shapes", False):
            raise ValueError("PyTorchProfiler(group_by_input_shapes=True) needs record_shapes=True, so torch records "
                             "the shapes it groups by.")
        unknown = set(profiler_kwargs) - set(inspect.signature(torch.profiler.profile).parameters)
        if unknown:
            raise TypeError(f"PyTorchProfiler got {sorted(unknown)}, which torch.profiler.profile does not take.")
        self._group_by_input_shapes = group_by_input_shapes
        self._export_to_chrome = export_to_chrome
        self._row_limit = row_limit
        self._sort_by_key = sort_by_key or ("cuda_time_total" if self._uses_cuda(profiler_kwargs)
                                            else "cpu_time_total")
        self._table_kwargs = dict(table_kwargs or {})
        self._profiler_kwargs = profiler_kwargs
        self.profiler: torch.profiler.profile | None = None
        self._ranges: dict[str, Any] = {}
        self.function_events: Any = None

    @staticmethod
    def _uses_cuda(kwargs: dict[str, Any]) -> bool:
        activities = kwargs.get("activities")
        if activities is None:
            return torch.cuda.is_available()
        return torch.profiler.ProfilerActivity.CUDA in activities

    def start(self, action_name: str) -> None:
        if self.profiler is None:
            kwargs = dict(self._profiler_kwargs)
            if "activities" not in kwargs:
                kwargs["activities"] = [torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = torch.profiler.profile(**kwargs)
            self.profiler.__enter__()
        if action_name in self._ranges:
            raise ValueError(f"Attempted to start {action_name} which has already started.")
        rf = torch.profiler.record_function(action_name)
        rf.__enter__()
        self._ranges[action_name] = rf

    def stop(self, action_name: str) -> None:
        rf = self._ranges.pop(action_name, None)
        if rf is None:
            raise ValueError(f"Attempting to stop recording an action ({action_name}) which was never started.")
        rf.__exit__(None, None, None)
        if self.profiler is not None and "schedule" in self._profiler_kwargs and action_name.endswith(STEP_ACTIONS):
            self.profiler.step()

    def _finish(self) -> None:
        """Stop torch's profiler and keep its events for the report."""
        if self.profiler is None:
            return
        for rf in reversed(list(self._ranges.values())):
            rf.__exit__(None, None, None)
        self._ranges.clear()
        prof, self.profiler = self.profiler, None
        prof.__exit__(None, None, None)
        if self._export_to_chrome and self.filename and self.dirpath:
            self._write_trace(prof)
        try:
            self.function_events = prof.events()
        except (AssertionError, RuntimeError):  # a schedule that never reached its active window records nothing
            self.function_events = None

    def _write_trace(self, prof: torch.profiler.profile) -> None:
        target = storage.join(self.dirpath, self._prepare_filename(extension=".pt.trace.json"))
        fs, path = storage.resolve(target)
        fs.create_dir(os.path.dirname(path) if fs.type_name == "local" else path.rsplit("/", 1)[0], recursive=True)
        with tempfile.TemporaryDirectory() as tmp:  # torch writes traces to local files only
            local = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(local)
            with open(local, "rb") as f, fs.open_output_stream(path) as out:
                out.write(f.read())

    def summary(self) -> str:
        self._finish()
        if not self.function_events:
            return ""
        data = self.function_events.key_averages(group_by_input_shapes=self._group_by_input_shapes)
        table = data.table(sort_by=self._sort_by_key, row_limit=self._row_limit, **self._table_kwargs)
        return self._stats_to_str({"records": table})

    def teardown(self, stage: str | None) -> None:
        self._finish()
        self.function_events = None
        super().teardown(stage=stage)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(profiler=None, _ranges={}, function_events=None)  # torch's profiler does not pickle
        return state
