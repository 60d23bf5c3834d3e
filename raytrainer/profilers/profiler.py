"""Profiler: the base class of Lightning's profilers. A profiler records named actions (start/stop) and
reports them at the end of each Trainer call, to ``dirpath/<stage>-<filename>.txt`` or to the log."""
from __future__ import annotations

import functools
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from raytrainer.io import storage
from raytrainer.utilities import log


class Profiler(ABC):
    """Subclass and define ``start``/``stop`` (and ``summary``) to write a custom profiler.

    ``dirpath``: where the report goes (default: the Trainer's ``log_dir`` when a filename is given).
    ``filename``: write the report to ``<stage>-<filename>[-<rank>].txt`` instead of logging it.
    """

    def __init__(self, dirpath: str | Path | None = None, filename: str | None = None) -> None:
        self.dirpath = os.fspath(dirpath) if dirpath is not None else None
        self.filename = filename
        self._stage: str | None = None
        self._local_rank: int | None = None
        self._write_stream: Callable[[str], None] | None = None

    @abstractmethod
    def start(self, action_name: str) -> None:
        """Start recording ``action_name``."""

    @abstractmethod
    def stop(self, action_name: str) -> None:
        """Stop recording ``action_name`` (started before)."""

    def summary(self) -> str:
        """The report of what was recorded (empty: nothing to report)."""
        return ""

    @contextmanager
    def profile(self, action_name: str) -> Generator[str, None, None]:
        """Record the block inside ``with profiler.profile(name):`` as one call of ``name``."""
        try:
            self.start(action_name)
            yield action_name
        finally:
            self.stop(action_name)

    # ------------------------------------------------------------------ the report
    def setup(self, stage: str, local_rank: int | None = None, log_dir: str | None = None) -> None:
        """Called by the Trainer at the start of a call: the stage names the report, the rank (None for one
        process) goes into its file name, and ``log_dir`` is the default ``dirpath``."""
        self._stage = getattr(stage, "value", stage)
        self._local_rank = local_rank
        self.dirpath = self.dirpath or log_dir

    def teardown(self, stage: str | None) -> None:
        """Called after the report is written: closes the output."""
        self._write_stream = None

    def describe(self) -> None:
        """Write the report (to the file, or the log on rank 0), then tear down; the Trainer calls it when a
        call ends, and a profiler used on its own may call it directly."""
        self._prepare_streams()
        text = self.summary()
        if text and self._write_stream is not None:
            self._write_stream(text)
        self.teardown(stage=self._stage)

    def _prepare_streams(self) -> None:
        if self._write_stream is not None:
            return
        if self.filename and self.dirpath:
            self._write_stream = functools.partial(_append, storage.join(self.dirpath, self._prepare_filename()))
        else:
            self._write_stream = self._rank_zero_info

    def _rank_zero_info(self, text: str) -> None:
        if self._local_rank in (None, 0):
            log.info("%s", text)

    def _prepare_filename(self, action_name: str | None = None, extension: str = ".txt") -> str:
        """``<stage>-<filename>-<rank>-<action>`` with path-unsafe characters replaced, as Lightning names them."""
        parts = [p for p in (self._stage, self.filename) if p]
        if self._local_rank is not None:
            parts.append(str(self._local_rank))
        if action_name is not None:
            parts.append(action_name)
        base = re.sub(r"_+", "_", re.sub(r"[\\/:*?\"<>|\n\r\t]", "_", "-".join(parts))).strip()
        return (base or "profile") + extension

    def _stats_to_str(self, stats: dict[str, str]) -> str:
        """One report from per-action texts (the advanced and PyTorch profilers)."""
        lines = [(f"{self._stage.upper()} " if self._stage else "") + "Profiler Report"]
        for action, text in stats.items():
            rank = f" rank: {self._local_rank}" if self._local_rank is not None else ""
            lines += [f"Profile stats for: {action}{rank}", text]
        return os.linesep.join(lines)

    @property
    def local_rank(self) -> int:
        """The rank that profiles (0 in a one-process run)."""
        return 0 if self._local_rank is None else self._local_rank

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_write_stream"] = None  # an open report travels as its settings, never as a stream
        return state


def _append(path: str, text: str) -> None:
    """Append ``text`` to a report file (a local path or a URI; object stores are rewritten whole)."""
    fs, fs_path = storage.resolve(path)
    local = fs.type_name == "local"
    fs.create_dir(os.path.dirname(fs_path) if local else fs_path.rsplit("/", 1)[0], recursive=True)
    if local:
        with open(fs_path, "a", encoding="utf-8") as f:
            f.write(text)
        return
    try:
        with fs.open_input_stream(fs_path) as f:
            old = f.read()
    except (FileNotFoundError, OSError):
        old = b""
    with fs.open_output_stream(fs_path) as f:
        f.write(old + text.encode("utf-8"))


def profiled(profiler: Profiler, action_name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` recorded as ``action_name`` on each call: the Trainer wraps hooks and steps with it once per run,
    only when a profiler is on, so the calls cost nothing extra otherwise."""
    start, stop = profiler.start, profiler.stop

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        start(action_name)
        try:
            return fn(*args, **kwargs)
        finally:
            stop(action_name)

    return call


def profiled_iter(profiler: Profiler, action_name: str, iterable: Iterable[Any]) -> Iterator[Any]:
    """The items of ``iterable``, each fetch (``next``) recorded as ``action_name`` (the loops' dataloader_next)."""
    it = iter(iterable)
    start, stop = profiler.start, profiler.stop
    while True:
        start(action_name)
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            stop(action_name)
        yield item
