"""Rank 0's console is the driver's: what rank 0 prints (stdout, stderr) and logs during a call travels to the driver
with the progress bar's events, in order, and is printed there once, without Ray's ``(rank-0 pid=...)`` prefix, as a
single-process run prints it (the model summary, ``self.print``, warnings). The other ranks log only warnings and
errors (Lightning's ``rank_zero_info``); what they print still reaches the driver through Ray, prefixed by rank."""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

from raytrainer.launchers.ray.messages import send_to_driver
from raytrainer.utilities.console import apply_log_level, debug_enabled, log

_STREAMS = ("stdout", "stderr")
# Lines Ray's worker writes for Ray's own log reader (actor and job names, Ray Data's progress bars): they stay on the
# rank's stream, where Ray reads and draws them.
_RAY_LINE_MARKERS = ("__ray_tqdm_magic_token__", ":actor_name:", ":task_name:", ":job_id:")


class _ToDriver:
    """A text stream of rank 0 whose lines go to the driver (``isatty``: whether the driver's stream is a terminal,
    so rich and tqdm format for where the text ends up). What it does not define comes from the stream it replaces."""

    def __init__(self, name: str, original: Any, tty: bool) -> None:
        self.name, self.original, self.tty = name, original, tty
        self._buffer = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += text
            end = max(self._buffer.rfind("\n"), self._buffer.rfind("\r"))
            if end >= 0:  # whole lines (and a terminal bar's \r redraws) now; a partial line waits for flush()
                self._send(self._buffer[:end + 1])
                self._buffer = self._buffer[end + 1:]
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._buffer:
                self._send(self._buffer)
                self._buffer = ""

    def _send(self, text: str) -> None:
        if any(marker in text for marker in _RAY_LINE_MARKERS):
            lines = text.splitlines(keepends=True)
            for_ray = "".join(line for line in lines if any(marker in line for marker in _RAY_LINE_MARKERS))
            self.original.write(for_ray)
            self.original.flush()
            text = "".join(line for line in lines if not any(marker in line for marker in _RAY_LINE_MARKERS))
        if text:
            send_to_driver({"type": "output", "stream": self.name, "text": text})

    def isatty(self) -> bool:
        return self.tty

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return "utf-8"

    def __getattr__(self, name: str) -> Any:  # fileno(), buffer, errors...: the rank's own stream
        if name == "original":
            raise AttributeError(name)  # not set yet (a copy being built): no recursion
        return getattr(self.original, name)


class _LogToDriver(logging.Handler):
    """Sends rank 0's ``raytrainer`` log records to the driver, which logs them as its own."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            send_to_driver({"type": "log", "name": record.name, "level": record.levelno, "text": self.format(record)})
        except Exception:  # noqa: BLE001 - logging must never break the call
            self.handleError(record)


def driver_tty() -> dict[str, bool]:
    """Whether the driver's stdout and stderr are terminals (rank 0's replacement streams say the same)."""
    return {name: bool(getattr(getattr(sys, name), "isatty", lambda: False)()) for name in _STREAMS}


@contextlib.contextmanager
def rank_console(rank0: bool, tty: dict[str, bool] | None = None) -> Iterator[None]:
    """(a rank, around one call) Rank 0: stdout, stderr and ``raytrainer`` log records go to the driver. Other ranks:
    ``raytrainer`` logs warnings and errors only (everything with ``RAYTRAINER_LOG=debug``)."""
    level, handlers = log.level, log.handlers[:]
    apply_log_level()  # the driver's RAYTRAINER_LOG, forwarded with this call
    streams = {}
    if rank0:
        tty = tty or {}
        streams = {name: getattr(sys, name) for name in _STREAMS}
        for name, original in streams.items():
            setattr(sys, name, _ToDriver(name, original, bool(tty.get(name))))
        log.handlers = [_LogToDriver()]
    elif not debug_enabled():
        log.setLevel(max(log.level, logging.WARNING))
    try:
        yield
    finally:
        for name, original in streams.items():
            stream = getattr(sys, name)
            if isinstance(stream, _ToDriver):
                stream.flush()
            setattr(sys, name, original)
        log.handlers = handlers
        log.setLevel(level)


def relay(msg: Any) -> bool:
    """(the driver) Print or log one console message of rank 0; False when ``msg`` is not one."""
    if not isinstance(msg, dict):
        return False
    kind = msg.get("type")
    if kind == "output":
        stream = getattr(sys, msg.get("stream") or "stdout", None) or sys.stdout  # now: rich's Live swaps it
        with tqdm.external_write_mode(file=stream):  # a live bar is cleared, then drawn again below the text
            stream.write(msg["text"])
            stream.flush()
        return True
    if kind == "log":
        logging.getLogger(msg.get("name") or log.name).log(int(msg["level"]), "%s", msg["text"])
        return True
    return False


# What Ray prints (as "(raylet) ...") when a rank process dies: the fit's own failure line already says which rank
# died, where, and what the run does about it (the RankError of a run that stops has the rank's whole story).
WORKER_DEATH_NOTE = "A worker died or was killed while executing a task by an unexpected system error."


@contextlib.contextmanager
def without_worker_death_notes() -> Iterator[None]:
    """(the driver, around a fit) Leave out Ray's ``WORKER_DEATH_NOTE`` from what Ray prints on this console; every
    other line passes. Ray prints its error messages through an internal function: if that is not there as
    expected, nothing changes."""
    try:
        from ray._private import worker as ray_worker

        original = ray_worker.print_to_stdstream
    except (ImportError, AttributeError):
        original = None
    if original is None or debug_enabled():
        yield
        return

    def without_notes(data: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if data.get("pid") == "raylet":
            lines = [line for line in data.get("lines", []) if not str(line).startswith(WORKER_DEATH_NOTE)]
            if not lines:
                return None
            data = {**data, "lines": lines}
        return original(data, *args, **kwargs)

    ray_worker.print_to_stdstream = without_notes
    try:
        yield
    finally:
        if ray_worker.print_to_stdstream is without_notes:
            ray_worker.print_to_stdstream = original
