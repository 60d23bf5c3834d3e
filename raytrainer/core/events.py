"""The run's events log: one JSON object per line in ``<run dir>/events.jsonl``.

Each event has ``time`` (unix seconds), ``event`` (start, failure, restart, resize,
snapshot_fallback, checkpoint, preemption, finish), ``world_size``, ``step``, ``epoch`` and
``cause``; failures add ``rank`` and ``node``, checkpoints ``path``. The driver prints a one-line
summary of each that changes the run (``ECHOED``) as it happens, the others only with ``RAYTRAINER_LOG=debug``.
Works on local paths and on any pyarrow filesystem URI (the file is rewritten whole on object stores, which cannot
append; a run has few events).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from raytrainer.utilities import log

EVENT_KINDS = ("start", "failure", "restart", "resize", "snapshot_fallback", "checkpoint", "preemption", "finish")
# the events whose line the console shows; checkpoints and snapshot fallbacks are in the file (and at debug level)
ECHOED = ("start", "failure", "restart", "resize", "preemption", "finish")
FILENAME = "events.jsonl"


class NoEvents:
    """The events log of a run that is not the user's (a tuner's trial): it records nothing."""

    def emit(self, *args: Any, **kwargs: Any) -> None:
        """Drop the event."""


class EventLog:
    """Appends events to ``<run_dir>/events.jsonl`` and echoes each as one line (INFO for ``ECHOED``, else DEBUG)."""

    def __init__(self, run_dir: str, echo: bool = True) -> None:
        self.run_dir = run_dir
        self.echo = echo
        self.events: list[dict[str, Any]] = []

    @property
    def path(self) -> str:
        from raytrainer.io import storage

        return storage.join(self.run_dir, FILENAME)

    def emit(self, event: str, *, world_size: int, step: int, epoch: int = 0, cause: str | None = None,
             **extra: Any) -> dict[str, Any]:
        """Record one event; unknown kinds are refused so readers can rely on the vocabulary."""
        if event not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {event!r}; expected one of {EVENT_KINDS}")
        record = {"time": round(time.time(), 3), "event": event, "world_size": int(world_size), "step": int(step),
                  "epoch": int(epoch), "cause": cause, **extra}
        self.events.append(record)
        self._write(record)
        if self.echo:
            log.log(logging.INFO if event in ECHOED else logging.DEBUG, "%s", summarize(record))
        return record

    def _write(self, record: dict[str, Any]) -> None:
        from raytrainer.io import storage

        line = json.dumps(record, default=str) + "\n"
        if "://" not in self.run_dir or self.run_dir.startswith("file://"):
            path = self.path[len("file://"):] if self.path.startswith("file://") else self.path
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:
                f.write(line)
            return
        text = "".join(json.dumps(r, default=str) + "\n" for r in read_events(self.run_dir, missing_ok=True)
                       if r not in self.events[:-1]) + "".join(json.dumps(r, default=str) + "\n" for r in self.events)
        storage.makedirs(self.run_dir)
        storage.write_bytes_atomic(self.path, text.encode(), manifest=False)


def command_fields() -> dict[str, Any]:
    """How this run was started, so `raytrainer status` can print the command that resumes it."""
    fields: dict[str, Any] = {"argv": list(sys.argv)}
    if os.environ.get("RAYTRAINER_COMMAND"):
        fields["command"] = json.loads(os.environ["RAYTRAINER_COMMAND"])
    return fields


def summarize(record: dict[str, Any]) -> str:
    """One human line for an event, as the driver prints it."""
    parts = [f"[{record['event']}]", f"step {record['step']}", f"epoch {record['epoch']}",
             f"world size {record['world_size']}"]
    for key in ("rank", "node", "path"):
        if record.get(key) not in (None, ""):
            parts.append(f"{key} {record[key]}")
    if record.get("cause"):
        parts.append(f"cause: {record['cause']}")
    return " | ".join(parts)


def read_events(run_dir: str, missing_ok: bool = False) -> list[dict[str, Any]]:
    """All events of a run directory (local path or URI), oldest first."""
    from raytrainer.io import storage

    path = storage.join(run_dir, FILENAME)
    if not storage.exists(path):
        if missing_ok:
            return []
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a raytrainer run directory "
                                "(expected lightning_logs/version_N with an events.jsonl).")
    fs, p = storage.resolve(path)
    with fs.open_input_stream(p) as f:
        text = f.read().decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
